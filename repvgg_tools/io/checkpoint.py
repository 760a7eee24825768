"""Safe checkpoint I/O: ``weights_only`` loading, safetensors, atomic writes that never clobber by accident."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap as _mmap
import os
import stat
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .paths import CheckpointError, check_output_path
from .safe_pickle import PickleLimitError, UnsafePickleError, to_plain

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "atomic_write", "read_state_dict", "read_checkpoint",
    "CheckpointContents", "strip_prefixes", "release_pages", "shared_memory_keys", "check_output_path",
    "MODEL_KEYS", "EMA_KEYS", "DROPPED_KEYS", "remove_leftovers", "metadata_text", "tensors_in",
]

log = logging.getLogger(__name__)


def _sniff_format(path: Path) -> str:
    """The format from the file's bytes: ``safetensors`` (its header parses), ``zip`` (torch >= 1.6), ``pickle``
    (legacy torch), else ``unknown``. Safetensors is tried first: its 8-byte header length may start with any byte,
    0x80 (a pickle's first byte) included."""
    with open(path, "rb") as f:
        head = f.read(16)
        if _is_safetensors(f, head, path.stat().st_size):
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2 marker; legacy torch files start with a pickled magic number
        return "pickle"
    return "unknown"


def _is_safetensors(f, head: bytes, size: int) -> bool:
    """Whether the file starts with a safetensors header: a little-endian length, then that many bytes of JSON
    object that lie inside the file."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    if n < 2 or 8 + n > size or n > 100 << 20:  # safetensors' own header limit is 100 MB
        return False
    f.seek(8)
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = True) -> Any:
    """Load a ``.pth/.pt/.ckpt`` (torch zip or legacy) or ``.safetensors`` file without running code from it.

    The format is recognized from the file's bytes, so a misnamed file still loads. A torch zip file has its records
    checked against its pickle before anything is mapped (:mod:`repvgg_tools.io.torch_zip`); its pickle is read by
    torch's ``weights_only`` unpickler, and files that it refuses (training checkpoints holding configs, argument
    namespaces, NumPy values, whole model objects) by :mod:`repvgg_tools.io.safe_pickle` under the same rules: other
    classes become plain data, nothing from the file is ever called. A legacy (non-zip) file is read only if
    ``weights_only`` reads it. See :func:`read_checkpoint` for which classes were replaced.

    Args:
        path: the file.
        map_location: where tensors go.
        mmap: memory-map torch zip files (tensors are paged in on use; halves peak RAM on big checkpoints).
            Writing to a memory-mapped tensor never changes the file (private mapping).

    Raises:
        CheckpointError: missing, a directory, empty, unreadable, truncated or corrupt, a pickle that would run code,
            or one past the reader's limits.
    """
    return _load(Path(path), map_location, mmap)[0]


def _load(path: Path, map_location: str | torch.device, mmap: bool) -> tuple[Any, list[str], bool]:
    """``(object, names of the classes replaced by plain data, whether every tensor is memory-mapped)``."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: file is empty")
        kind = _sniff_format(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj, replaced, mapped = load_file(str(path)), [], False
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    elif kind == "unknown":
        what = "a safetensors file with a broken header" if path.suffix == ".safetensors" else \
            "neither a PyTorch zip/pickle file nor safetensors"
        raise CheckpointError(f"{path}: not a checkpoint ({what})")
    else:
        try:
            obj, replaced, mapped = _read_torch(path, kind, mmap)
        except CheckpointError:
            raise
        except Exception as exc:  # UnpicklingError, EOFError, RuntimeError from a rebuild, ...
            raise _load_error(path, kind, exc) from None
    try:
        obj = to_plain(obj)  # bounded nesting; shared references stay shared
    except PickleLimitError as exc:
        raise CheckpointError(f"{path}: refused to load: {exc}") from None
    if replaced:
        log.info("%s: read as plain data: %s", path, ", ".join(replaced))
    if torch.device(map_location).type != "cpu":
        obj, mapped = _to_device(obj, torch.device(map_location), {}), False
    return obj, replaced, mapped


def _read_torch(path: Path, kind: str, mmap: bool) -> tuple[Any, list[str], bool]:
    from .torch_zip import NotTorchZip, read_torch_zip

    if kind == "zip":
        try:
            return read_torch_zip(path, mmap)
        except NotTorchZip as exc:
            if "byte order" not in str(exc):
                raise
    # a legacy (non-zip) file, or a big-endian archive: only what torch's weights_only loader reads
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False), [], False


def _to_device(obj: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, Mapping):
        return type(obj)((k, _to_device(v, device, memo)) for k, v in obj.items()) \
            if isinstance(obj, (dict, OrderedDict)) else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, memo) for v in obj)
    return obj


def _load_error(path: Path, kind: str, exc: BaseException) -> CheckpointError:
    from .torch_zip import CorruptCheckpoint, NotTorchZip

    if isinstance(exc, (UnsafePickleError, PickleLimitError)):
        return CheckpointError(f"{path}: refused to load: {exc}")
    msg = _first_line(exc)
    if isinstance(exc, (CorruptCheckpoint, NotTorchZip)):
        return CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg})")
    if kind == "pickle" and "Weights only load failed" in str(exc):
        return CheckpointError(f"{path}: refused to load: a legacy (non-zip) torch file is read only when torch's "
                               "weights_only loader accepts it, and it does not (re-save it with a current torch)")
    if kind == "zip" or "EOF" in msg or isinstance(exc, EOFError):
        return CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {msg})")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {msg})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.split(". ")[0][:200]


def atomic_write(path: str | os.PathLike, write_fn, force: bool = False) -> Path:
    """Call ``write_fn(tmp_path)`` then rename the temp file onto ``path``, so a crash never leaves half a file.

    Raises:
        CheckpointError: ``path`` exists and ``force`` is false, or its directory is missing or not writable.
    """
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{path}: directory {parent} does not exist")
    remove_leftovers(path)
    try:
        # the writer's pid in the name: a later run can tell a killed run's leftover from a live write
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}{os.getpid()}-", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror})") from None
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would (the existing file's, else umask's)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(parent, directory=True)  # the rename itself survives a crash
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


TEMP_TAG = ".partial-"  # temp files are ``.NAME.partial-PID-XXXX.tmp``


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files that runs killed while writing ``path`` left beside it (SIGKILL, power loss).

    A temp file is ``.NAME.partial-PID-XXXX.tmp``; it is removed when process PID no longer exists (a write still
    in progress is never touched). Returns the files removed.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    stem = f".{path.name}{TEMP_TAG}"
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(stem) and n.endswith(".tmp")]
    except OSError:
        return removed
    for name in names:
        pid = name[len(stem):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                (parent / name).unlink()
                removed.append(parent / name)
                log.warning("removed %s, left by a run that was killed while writing %s", parent / name, path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some platforms cannot open directories; the data itself is already synced
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike, force: bool = False) -> Path:
    """Save atomically: ``.safetensors`` (a flat name->tensor dict; other entries become string metadata) or torch.

    Raises:
        CheckpointError: see :func:`atomic_write`.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
        metadata = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                text = metadata_text(v)
                if text is None:
                    log.warning("%s: entry %r left out of the safetensors metadata (over %d characters)", path,
                                k, METADATA_CHARS)
                else:
                    metadata[str(k)] = text
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or None), force)
    return atomic_write(path, lambda tmp: torch.save(dict(obj), tmp), force)


METADATA_CHARS = 1 << 16  # per entry: safetensors metadata is a small JSON header, not a place for logs


def metadata_text(value: Any, limit: int = METADATA_CHARS) -> str | None:
    """``value`` as text for safetensors metadata (strings as they are, the rest as ``repr``-like text), or
    ``None`` when it would exceed ``limit`` characters. Stops as soon as the limit is passed, so a small structure
    of shared references (exponentially large when written out) costs no more than ``limit``."""
    if isinstance(value, str):
        return value if len(value) <= limit else None
    parts: list[str] = []
    left = [limit]

    def emit(text: str) -> None:
        left[0] -= len(text)
        if left[0] < 0:
            raise OverflowError
        parts.append(text)

    def walk(v: Any) -> None:
        if isinstance(v, Mapping):
            emit("{")
            for i, (k, item) in enumerate(v.items()):
                emit(", " if i else "")
                walk(k)
                emit(": ")
                walk(item)
            emit("}")
        elif isinstance(v, (list, tuple, set, frozenset)):
            open_, close = {list: "[]", tuple: "()"}.get(type(v), "{}")
            emit(open_)
            for i, item in enumerate(v):
                emit(", " if i else "")
                walk(item)
            emit(close)
        elif isinstance(v, torch.Tensor):
            emit(f"tensor(shape={tuple(v.shape)}, dtype={v.dtype})")
        else:
            emit(repr(v)[: left[0] + 1])

    try:
        walk(value)
    except (OverflowError, RecursionError):
        return None
    return "".join(parts)


# Where state dicts hide in the containers seen in the wild, in the order they are tried.
MODEL_KEYS = ("state_dict", "model", "module", "net", "network")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")
# Training-graph state that means nothing after conversion.
DROPPED_KEYS = (
    "optimizer", "optimizer_state_dict", "optimizers", "optim", "scheduler", "lr_scheduler", "lr_schedulers",
    "scaler", "grad_scaler", "amp", "optimizer_states", "param_schedulers",
)
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class CheckpointContents:
    """A model state dict taken out of its container.

    Attributes:
        state_dict: name -> tensor, prefixes ``module.``/``_orig_mod.`` stripped.
        extras: the container's other entries (epoch, arch, args, ...), optimizer state and other state dicts dropped.
        container_key: the key the state dict was found under (``None`` for a bare state dict).
        dropped: names of the entries left out of ``extras``.
        format: ``zip``, ``pickle`` or ``safetensors``.
        replaced: qualified names of the classes that were read as plain data (see :mod:`repvgg_tools.io.safe_pickle`).
        mapped: every tensor is a view of the file's private memory mapping (its pages can be given back).
    """

    state_dict: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)
    container_key: str | None = None
    dropped: list[str] = field(default_factory=list)
    format: str = "zip"
    replaced: list[str] = field(default_factory=list)
    mapped: bool = False


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: Mapping, keys: tuple[str, ...], depth: int = 0) -> tuple[str, Mapping] | None:
    """The first ``keys`` entry holding a state dict, looking through nested containers (``{"model": {...}}``)."""
    for key in keys:
        value = obj.get(key)
        if _is_state_dict(value):
            return key, value
        if isinstance(value, Mapping) and depth < 2:
            inner = _find_state_dict(value, MODEL_KEYS, depth + 1)
            if inner is not None:
                return key, inner[1]
    return None


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = STRIPPED_PREFIXES) -> dict:
    """Remove DataParallel/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes, only at a key's start.

    Raises:
        CheckpointError: stripping makes two keys equal.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        start, found = 0, True
        while found:  # an index, not repeated slicing: linear even for a key of a million prefixes
            found = False
            for p in prefixes:
                if key.startswith(p, start):
                    start, found = start + len(p), True
        new = key[start:]
        if new in out:
            raise CheckpointError(f"key {key[:200]!r} collides with another key once its prefix is stripped")
        out[new] = value
    return out


def read_checkpoint(path: str | os.PathLike, ema: bool = False, mmap: bool = True) -> CheckpointContents:
    """Load a checkpoint and take the model state dict out of its container.

    Accepts a bare state dict, or a dict holding one under ``state_dict``, ``model``, ``module`` (or, with ``ema``,
    ``model_ema``, ``state_dict_ema``, ``ema``) next to other entries.

    Args:
        path: a file :func:`load_checkpoint` reads.
        ema: take the EMA weights.
        mmap: memory-map torch zip files.

    Raises:
        CheckpointError: unreadable file, no state dict in it, or ``ema`` without EMA weights.
    """
    path = Path(path)
    obj, replaced, mapped = _load(path, "cpu", mmap)
    fmt = _sniff_format(path)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or a dict containing one")
    container_key = None
    if fmt == "safetensors":
        sd, extras = dict(obj), _safetensors_metadata(path)
    elif ema:
        found = _find_state_dict(obj, EMA_KEYS)
        if found is None:
            raise CheckpointError(f"{path}: --ema given but the file has no EMA weights (looked for "
                                  f"{', '.join(EMA_KEYS)}; top-level keys: {_preview(obj)})")
        container_key, sd = found[0], dict(found[1])
        extras = {}
    else:
        found = _find_state_dict(obj, MODEL_KEYS)
        if found is not None:
            container_key, sd = found[0], dict(found[1])
            extras = {}
        else:  # a bare state dict, possibly with a few non-tensor entries next to the tensors
            sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            extras = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
            if not sd:
                raise CheckpointError(f"{path}: no state dict found (top-level keys: {_preview(obj)})")
    dropped: list[str] = []
    if container_key is not None:
        for key, value in obj.items():
            if key == container_key:
                continue
            if key in DROPPED_KEYS or key in MODEL_KEYS or key in EMA_KEYS or _is_state_dict(value):
                dropped.append(key)
            else:
                extras[key] = value
    else:
        for key in [k for k in extras if k in DROPPED_KEYS]:
            dropped.append(key)
            del extras[key]
    if not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: state dict keys must be strings")
    if dropped:
        log.info("dropped %s (training state that does not apply after conversion)", ", ".join(map(str, dropped)))
    return CheckpointContents(strip_prefixes(sd), extras, container_key, dropped, fmt, replaced, mapped)


def read_state_dict(path: str | os.PathLike, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, extras)`` of a checkpoint: see :func:`read_checkpoint`.

    Raises:
        CheckpointError: see :func:`read_checkpoint`.
    """
    contents = read_checkpoint(path, ema=ema)
    return contents.state_dict, contents.extras


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _preview(obj: Mapping, n: int = 6) -> str:
    keys = [str(k) for k in list(obj)[:n]]
    return ", ".join(keys) + (", ..." if len(obj) > n else "")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` addresses of the bytes a (possibly strided) tensor can reach."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    reach = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    lowest = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True) if st < 0)
    start = t.data_ptr() + lowest * t.element_size()
    return start, start + (reach + 1) * t.element_size()


def shared_memory_keys(sd: Mapping[str, torch.Tensor]) -> set[str]:
    """Keys whose bytes overlap another key's bytes (tied weights, views of one buffer that overlap).

    Tensors that are views of one flat buffer but do not overlap are not in the set: writing to one, or dropping
    its whole pages (:func:`release_pages`), leaves the others intact.
    """
    spans = sorted((*_byte_span(t), k) for k, t in sd.items() if isinstance(t, torch.Tensor) and t.numel()
                   and t.device.type != "meta")
    shared: set[str] = set()
    reach_end, reach_key = -1, None
    for start, end, key in spans:
        if start < reach_end:
            shared.update((key, reach_key))
        if end > reach_end:
            reach_end, reach_key = end, key
    return shared


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a loaded structure (dicts, lists, tuples, sets), each once."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
        elif isinstance(item, (Mapping, list, tuple, set, frozenset)) and id(item) not in seen:
            seen.add(id(item))
            todo.extend(item.values() if isinstance(item, Mapping) else item)
            if isinstance(item, Mapping):
                todo.extend(k for k in item if isinstance(k, torch.Tensor))
    return list(found.values())


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (stride 0, or strides that fold back onto each other)."""
    span = 1
    for stride, n in sorted((abs(st), n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1):
        if stride < span:
            return True
        span += stride * (n - 1)
    return False


def release_pages(tensor: torch.Tensor) -> int:
    """Give the memory pages that lie wholly inside a memory-mapped checkpoint tensor back to the OS (Linux;
    elsewhere a no-op).

    Only for tensors from :func:`load_checkpoint` with ``mmap=True`` (a private file mapping) that were never
    written, will not be read again, and share no bytes with a live tensor (see :func:`shared_memory_keys`): the
    pages are dropped from this process (reading would fetch the file's bytes again). Only the pages inside the
    tensor's own bytes are released, never the rest of its storage, so neighbours in the same buffer (or a fused
    kernel written into one) keep their pages. Lets a converter stay within the checkpoint's size of RAM.

    Returns:
        Bytes released.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.numel():
        return 0
    start, end = _byte_span(tensor)
    page = _mmap.PAGESIZE
    first = -(-start // page) * page
    last = end // page * page
    if last - first < page:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madv_dontneed = 4
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), madv_dontneed) != 0:
        return 0
    return last - first
