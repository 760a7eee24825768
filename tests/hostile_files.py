"""Checkpoints as an attacker or a damaged disk provides them, built byte by byte.

Each builder writes a file next to a real state dict (so the damage is the only thing wrong with it). Pickle
programs are assembled from opcodes, because ``pickle.dumps`` never emits the sequences an attacker writes.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch

PROTO2 = b"\x80\x02"


def unicode(text: str) -> bytes:
    """BINUNICODE: push ``text``."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def global_(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name``."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def namespace() -> bytes:
    """An ``argparse.Namespace()`` (what timm's train.py saves): weights_only refuses it, so the file goes to our
    restricted reader."""
    return global_("argparse", "Namespace") + b")\x81}b"  # cls, (), NEWOBJ, {}, BUILD


def set_defaults_of_rebuild() -> bytes:
    """BUILD on torch's tensor-rebuild function: ``(None, {'__defaults__': (...)})`` sets an attribute of it (the
    attack that poisoned every later ``torch.load`` in the process), then POP."""
    value = b"\x88N\x86"  # (True, None): requires_grad=True by default for the rest of the process
    return global_("torch._utils", "_rebuild_tensor_v2") + b"N}" + unicode("__defaults__") + value + b"s\x86b0"


def records(path: Path) -> dict[str, bytes]:
    """The records of a torch zip file, by name."""
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_zip(path: Path, recs: dict[str, bytes], deflate: bool = False) -> Path:
    """A zip with ``recs``: data records deflated when asked, the rest stored (as torch's own writer stores all)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in recs.items():
            method = zipfile.ZIP_DEFLATED if deflate and "/data/" in name else zipfile.ZIP_STORED
            z.writestr(name, data, compress_type=method)
    return path


def data_pkl_name(recs: dict[str, bytes]) -> str:
    return next(n for n in recs if n.endswith("/data.pkl"))


def with_prefix_ops(src: Path, dst: Path, ops: bytes) -> Path:
    """``src`` with ``ops`` run before its pickle (which still builds the real object): ops must leave the stack
    as they found it."""
    recs = records(src)
    name = data_pkl_name(recs)
    pkl = recs[name]
    assert pkl.startswith(PROTO2)
    recs[name] = PROTO2 + ops + pkl[2:]
    return write_zip(dst, recs)


def with_extra_entry(src: Path, dst: Path, key: str, value_ops: bytes) -> Path:
    """``src`` (a dict at the top of its pickle) with ``key: <value_ops>`` set on it before STOP."""
    recs = records(src)
    name = data_pkl_name(recs)
    pkl = recs[name]
    assert pkl.endswith(b".")
    recs[name] = pkl[:-1] + unicode(key) + value_ops + b"s."
    return write_zip(dst, recs)


def shared_list_tower(levels: int) -> bytes:
    """``a = []; a = [a, a]`` ``levels`` times, through the memo: a few bytes per level, 2**levels leaves when
    copied without a memo. Uses a high memo slot, clear of the ones torch's own pickle uses."""
    slot = struct.pack("<I", 1_000_000)
    ops = b"]r" + slot + b"0"  # EMPTY_LIST, LONG_BINPUT, POP
    for _ in range(levels):
        ops += b"](j" + slot + b"j" + slot + b"er" + slot + b"0"  # [], MARK, GET, GET, APPENDS -> [a, a], PUT, POP
    return ops + b"j" + slot


def deep_nesting(levels: int) -> bytes:
    """A list nested ``levels`` deep: ``[[[...]]]``, built with MARK ... LIST pairs."""
    return b"(" * levels + b"l" * levels


def legacy_file(path: Path, main_ops: bytes) -> Path:
    """A legacy (non-zip) torch file whose main pickle is ``main_ops`` (a program ending in STOP), no storages."""
    buf = io.BytesIO()
    for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(value, buf, protocol=2)
    buf.write(main_ops)
    pickle.dump([], buf, protocol=2)
    path.write_bytes(buf.getvalue())
    return path


def safetensors_with_header_byte(path: Path, tensors: dict[str, torch.Tensor], first_byte: int) -> Path:
    """A valid safetensors file whose 8-byte header length starts with ``first_byte`` (padding the metadata)."""
    from safetensors.torch import save_file

    for pad in range(0, 2048):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == first_byte:
            return path
    raise AssertionError("no padding gives that header byte")
