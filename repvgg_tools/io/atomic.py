"""Writing outputs so that nothing is ever lost: a temp file beside the target, synced, renamed; never an existing
file without ``force``; and the leftovers of killed runs recognised and removed by the next run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["atomic_write", "save_checkpoint", "remove_leftovers", "metadata_text", "TEMP_TAG", "METADATA_CHARS"]

log = logging.getLogger(__name__)


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
    tmp = None
    try:
        with _signals_deferred():  # a SIGTERM between creating the temp file and knowing its name would leak it
            # the writer's pid in the name: a later run can tell a killed run's leftover from a live write
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}{os.getpid()}-", suffix=".tmp", dir=parent)
            os.close(fd)
        write_fn(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would (the existing file's, else umask's)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(parent, directory=True)  # the rename itself survives a crash
    except BaseException as exc:
        if tmp is None:
            if isinstance(exc, OSError):
                raise CheckpointError(f"{path}: cannot write ({exc.strerror})") from None
            raise
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


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (their handlers then run as usual), where the platform
    can block signals."""
    block = getattr(signal, "pthread_sigmask", None)
    wanted = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    if block is None:
        yield
        return
    previous = block(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        block(signal.SIG_SETMASK, previous)


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
