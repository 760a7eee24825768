"""Reading a ``torch.save`` zip file with its integrity checked before any byte of it is trusted.

``torch.load(mmap=True)`` maps each tensor's storage at the offset the zip directory gives, for the size the pickle
declares, without looking at the record: a record 16 bytes short makes the next zip header part of a weight, and a
deflated record is mapped as its compressed bytes. Here every storage record is checked first (its local header
agrees with the directory, it lies inside the file, its size is the storage's size); stored records are memory-mapped
(a private mapping: writing to a tensor never reaches the file), compressed ones are inflated, bounded by the size
the tensor needs.

The pickle is read by torch's own ``weights_only`` unpickler; a file it refuses (configs, argument namespaces, NumPy
values) is read again by :class:`repvgg_tools.io.safe_pickle.SafeUnpickler`, which keeps the same rules.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .pickle_rules import DEFAULT_LIMITS, Limits, UnsafePickleError
from .safe_pickle import SafeUnpickler

__all__ = ["CorruptCheckpoint", "NotTorchZip", "read_torch_zip"]

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature .. extra length: 30 bytes
INFLATE_BUDGET = 256 << 20  # bytes that compressed records may inflate to, beyond the file's own size


class CorruptCheckpoint(ValueError):
    """The zip file's records do not agree with what its pickle declares (truncated, tampered, or damaged)."""


class NotTorchZip(ValueError):
    """A zip file that is not a ``torch.save`` archive, or one this reader leaves to ``torch.load`` (big-endian)."""


@dataclass
class _Record:
    name: str
    offset: int  # of the data, in the file
    size: int  # uncompressed
    compressed_size: int
    stored: bool


def _records(zf: zipfile.ZipFile, f: io.BufferedReader, file_size: int) -> tuple[str, dict[str, _Record]]:
    """``(prefix, {name: record})`` of a torch archive, every local header checked against the directory."""
    pickles = [i.filename for i in zf.infolist() if i.filename.rpartition("/")[2] == "data.pkl"
               and i.filename.count("/") <= 1]
    if len(pickles) != 1:
        raise NotTorchZip("not a torch.save archive (no single data.pkl record)")
    prefix = pickles[0][: -len("data.pkl")]
    records = {}
    for info in zf.infolist():
        if not info.filename.startswith(prefix):
            continue
        f.seek(info.header_offset)
        raw = f.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size:
            raise CorruptCheckpoint(f"record {info.filename} lies past the end of the file")
        sig, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
        local_name = f.read(name_len)
        if sig != b"PK\x03\x04" or local_name != info.filename.encode("utf-8", "surrogateescape") \
                or method != info.compress_type:
            raise CorruptCheckpoint(f"record {info.filename}: its local header does not match the zip directory")
        offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if offset + info.compress_size > file_size:
            raise CorruptCheckpoint(f"record {info.filename} runs past the end of the file")
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.compress_size != info.file_size:
            raise CorruptCheckpoint(f"record {info.filename}: stored, but its sizes disagree")
        records[info.filename[len(prefix):]] = _Record(info.filename, offset, info.file_size, info.compress_size,
                                                       stored)
    return prefix, records


class _Storages:
    """``persistent_load`` for a torch archive: each storage record checked, mapped or inflated once."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, f: io.BufferedReader, records: dict[str, _Record],
                 mmap: bool, file_size: int) -> None:
        self.zf, self.f, self.records = zf, f, records
        self.loaded: dict[str, torch.storage.TypedStorage] = {}
        self.inflate_left = INFLATE_BUDGET + file_size
        self.mapped = None
        self.all_mapped = True  # every storage a view of the private file mapping (none read into memory)
        if mmap and any(r.stored and r.size for k, r in records.items() if k.startswith("data/")):
            self.mapped = torch.UntypedStorage.from_file(str(path), False, file_size)  # private (copy-on-write)

    def __call__(self, pid: Any) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError("a persistent id must be a ('storage', type, key, location, size) tuple")
        kind, storage_type, key, _location, numel = pid
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
        if kind != "storage" or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        if isinstance(storage_type, torch.serialization.StorageType):
            dtype = storage_type.dtype
        elif storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        else:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.60}")
        if key in self.loaded:
            return self.loaded[key]
        nbytes = numel * torch._utils._element_size(dtype)
        record = self.records.get(f"data/{key}")
        if record is None:
            raise CorruptCheckpoint(f"storage {key!r} has no record in the archive")
        if record.size != nbytes:
            raise CorruptCheckpoint(f"record data/{key} holds {record.size} bytes but its tensor storage needs "
                                    f"{nbytes} (truncated or tampered)")
        if record.stored and self.mapped is not None:
            untyped = self.mapped[record.offset: record.offset + nbytes]
        else:
            untyped, self.all_mapped = self._read(record, nbytes), False
        typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        self.loaded[key] = typed
        return typed

    def _read(self, record: _Record, nbytes: int) -> torch.UntypedStorage:
        buf = bytearray(nbytes)
        if record.stored:
            self.f.seek(record.offset)
            got = self.f.readinto(buf)
        else:
            self.inflate_left -= nbytes
            if self.inflate_left < 0:
                raise CorruptCheckpoint("compressed records inflate to far more than the file's size")
            try:
                with self.zf.open(record.name) as src:
                    got = src.readinto(buf)
                    extra = src.read(1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                raise CorruptCheckpoint(f"record {record.name} cannot be inflated ({exc})") from None
            if extra:
                got = -1
        if got != nbytes:
            raise CorruptCheckpoint(f"record {record.name} is shorter or longer than its {nbytes} bytes")
        return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if nbytes else torch.UntypedStorage(0)


def read_torch_zip(path: Path, mmap: bool, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, list[str], bool]:
    """``(object, names of the classes read as placeholders, whether every storage is memory-mapped)`` of a
    ``torch.save`` zip file.

    Raises:
        NotTorchZip: not a torch archive, or one to leave to ``torch.load`` (a big-endian file).
        CorruptCheckpoint: records that disagree with the pickle or the directory.
        UnsafePickleError, PickleLimitError: the pickle breaks :mod:`repvgg_tools.io.safe_pickle`'s rules.
        pickle.UnpicklingError, EOFError: a malformed pickle.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CorruptCheckpoint(f"not a readable zip archive ({exc})") from None
        with zf:
            prefix, records = _records(zf, f, file_size)
            if "byteorder" in records and _small(zf, records["byteorder"]) not in (b"", sys.byteorder.encode()):
                raise NotTorchZip("written on a machine of the other byte order")
            pkl = records["data.pkl"]
            if pkl.size > limits.max_bytes:
                raise CorruptCheckpoint(f"its pickle declares {pkl.size} bytes")
            data = _small(zf, pkl)
            storages = _Storages(path, zf, f, records, mmap, file_size)
            try:
                obj = _unpickle_weights_only(data, storages)
                return obj, [], storages.all_mapped and storages.mapped is not None
            except pickle.UnpicklingError as exc:
                if isinstance(exc, UnsafePickleError):
                    raise
                log.debug("weights_only refused %s (%s); reading it with the restricted reader", path, exc)
            reader = SafeUnpickler(io.BytesIO(data), storages, limits=limits)
            obj = reader.load()
            return obj, sorted(reader.replaced), storages.all_mapped and storages.mapped is not None


def _small(zf: zipfile.ZipFile, record: _Record) -> bytes:
    try:
        with zf.open(record.name) as src:
            data = src.read(record.size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise CorruptCheckpoint(f"record {record.name} cannot be read ({exc})") from None
    if len(data) != record.size:
        raise CorruptCheckpoint(f"record {record.name} does not hold its declared {record.size} bytes")
    return data


def _unpickle_weights_only(data: bytes, storages: _Storages) -> Any:
    """torch's own ``weights_only`` unpickler over ``data``, storages from ``storages``."""
    from torch import _weights_only_unpickler

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = storages
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        result = unpickler.load()
    validate = getattr(torch._utils, "_validate_loaded_sparse_tensors", None)
    if validate is not None:
        validate()
    return result
