"""Safe checkpoint I/O: ``weights_only`` loading, safetensors, atomic writes that never clobber by accident."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "atomic_write"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message says why in one line."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = True) -> Any:
    """Load a ``.pth/.pt/.ckpt`` (torch zip or legacy) or ``.safetensors`` file without unpickling code.

    Args:
        path: the file.
        map_location: where tensors go.
        mmap: memory-map torch zip files (tensors are paged in on use; halves peak RAM on big checkpoints).

    Raises:
        CheckpointError: missing, a directory, empty, unreadable, truncated, or a pickle that would run code.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # legacy (non-zip) files cannot be memory-mapped
            return load_checkpoint(path, map_location, mmap=False)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # UnpicklingError, EOFError, zipfile errors, ...
        msg = _first_line(exc)
        if "Weights only load failed" in msg or "weights_only" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load: the file contains Python objects other than tensors and plain "
                "containers (loading it could run arbitrary code)"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {msg})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
