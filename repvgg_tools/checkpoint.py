"""Safe checkpoint I/O: ``weights_only`` loading, safetensors, atomic writes that never clobber by accident."""

from __future__ import annotations

import contextlib
import logging
import mmap as _mmap
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .paths import CheckpointError, check_output_path

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "atomic_write", "read_state_dict", "read_checkpoint",
    "CheckpointContents", "strip_prefixes", "release_pages", "shared_memory_keys", "check_output_path",
    "MODEL_KEYS", "EMA_KEYS", "DROPPED_KEYS",
]

log = logging.getLogger(__name__)


def _sniff_format(path: Path) -> str:
    """The format from the first bytes: ``zip`` (torch >= 1.6), ``pickle`` (legacy), ``safetensors``, ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2 marker; legacy torch files start with a pickled magic number
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{":  # 8-byte little-endian header length, then a JSON header
        return "safetensors"
    return "unknown"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = True) -> Any:
    """Load a ``.pth/.pt/.ckpt`` (torch zip or legacy) or ``.safetensors`` file without running code from it.

    The format is recognized from the file's first bytes, so a misnamed file still loads. Files that
    ``weights_only=True`` refuses (training checkpoints holding configs, argument namespaces, NumPy values, whole
    model objects) are read with :mod:`repvgg_tools.safe_pickle`: other classes become plain data, calls of
    non-allowlisted functions are refused. See :func:`read_checkpoint` for which classes were replaced.

    Args:
        path: the file.
        map_location: where tensors go.
        mmap: memory-map torch zip files (tensors are paged in on use; halves peak RAM on big checkpoints).
            Writing to a memory-mapped tensor never changes the file (private mapping).

    Raises:
        CheckpointError: missing, a directory, empty, unreadable, truncated, or a pickle that would run code.
    """
    return _load(Path(path), map_location, mmap)[0]


def _load(path: Path, map_location: str | torch.device, mmap: bool) -> tuple[Any, list[str]]:
    """``(object, names of the classes replaced by plain data)``."""
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
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location)), []
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if kind == "unknown":
        raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch zip/pickle file nor safetensors)")
    try:
        return _torch_load(path, map_location, mmap and kind == "zip", None), []
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError from the zip reader, ...
        if "Weights only load failed" not in str(exc):
            raise _load_error(path, kind, exc) from None
    from .safe_pickle import restricted_pickle_module, to_plain

    module, replaced = restricted_pickle_module()
    try:
        obj = to_plain(_torch_load(path, map_location, mmap and kind == "zip", module))
    except Exception as exc:
        raise _load_error(path, kind, exc) from None
    if replaced:
        log.info("%s: read as plain data: %s", path, ", ".join(sorted(replaced)))
    return obj, sorted(replaced)


def _torch_load(path: Path, map_location, mmap: bool, pickle_module) -> Any:
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        warnings.filterwarnings("ignore", message=".*source code.*")
        if mmap and hasattr(_mmap, "MAP_PRIVATE"):
            # a private mapping: writing to a loaded tensor must never reach the file
            stack.enter_context(torch.serialization.set_default_mmap_options(_mmap.MAP_PRIVATE))
        if pickle_module is None:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap, pickle_module=pickle_module)


def _load_error(path: Path, kind: str, exc: BaseException) -> CheckpointError:
    from .safe_pickle import UnsafePickleError

    if isinstance(exc, UnsafePickleError):
        return CheckpointError(f"{path}: refused to load: {exc}")
    msg = _first_line(exc)
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
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
        metadata = {k: str(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or None), force)
    return atomic_write(path, lambda tmp: torch.save(dict(obj), tmp), force)


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
        replaced: qualified names of the classes that were read as plain data (see :mod:`repvgg_tools.safe_pickle`).
    """

    state_dict: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)
    container_key: str | None = None
    dropped: list[str] = field(default_factory=list)
    format: str = "zip"
    replaced: list[str] = field(default_factory=list)


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
        new = key
        while new.startswith(prefixes):
            new = next(new[len(p):] for p in prefixes if new.startswith(p))
        if new in out:
            raise CheckpointError(f"key {key!r} collides with another key once its prefix is stripped")
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
    obj, replaced = _load(path, "cpu", mmap)
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
    return CheckpointContents(strip_prefixes(sd), extras, container_key, dropped, fmt, replaced)


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
