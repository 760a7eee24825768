"""Safe checkpoint I/O: ``weights_only`` loading, safetensors, atomic writes that never clobber by accident."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import METADATA_CHARS, TEMP_TAG, atomic_write, metadata_text, remove_leftovers, save_checkpoint
from .errors import CheckpointError, one_line
from .memory import overlaps_itself, release_pages, shared_memory_keys, tensors_in
from .paths import check_output_path
from .pickle_rules import PickleLimitError, UnsafePickleError
from .plain import to_plain

# reading lives here; writing (io.atomic) and memory sharing (io.memory) are re-exported: one import for the
# checkpoint API
__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "atomic_write", "read_state_dict", "read_checkpoint",
    "CheckpointContents", "strip_prefixes", "release_pages", "shared_memory_keys", "check_output_path",
    "MODEL_KEYS", "EMA_KEYS", "DROPPED_KEYS", "remove_leftovers", "metadata_text", "tensors_in", "overlaps_itself",
    "TEMP_TAG", "METADATA_CHARS",
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
            raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
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
    msg = one_line(exc)
    if isinstance(exc, (CorruptCheckpoint, NotTorchZip)):
        return CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg})")
    if kind == "pickle" and "Weights only load failed" in str(exc):
        return CheckpointError(f"{path}: refused to load: a legacy (non-zip) torch file is read only when torch's "
                               "weights_only loader accepts it, and it does not (re-save it with a current torch)")
    if kind == "zip" or "EOF" in msg or isinstance(exc, EOFError):
        return CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {msg})")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {msg})")


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


