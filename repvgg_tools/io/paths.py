"""Output-path rules every command shares, without importing torch (so argument errors stay fast)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import CheckpointError

__all__ = ["CheckpointError", "check_output_path", "check_outputs", "same_file"]


def check_output_path(output: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Fail before any work when ``output`` cannot or must not be written (every command's one output check).

    Raises:
        CheckpointError: ``output`` is one of ``inputs`` (never overwritten, even with ``force``), a directory, exists
            without ``force``, or its directory is missing or not writable.
    """
    output = Path(output)
    for given in inputs:
        given = Path(given)
        if same_file(output, given):
            raise CheckpointError(f"{output}: is the input file {given}; choose another name (inputs are never "
                                  "overwritten)")
    if output.is_dir():
        raise CheckpointError(f"{output}: is a directory")
    if output.exists() and not force:
        raise CheckpointError(f"{output}: already exists (use --force to overwrite)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{output}: directory {parent} is not writable")
    return output


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path once symlinks are resolved, or (both existing) one inode."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a symlink loop: compare the paths as written
        return os.path.abspath(a) == os.path.abspath(b)


PathArg = str | os.PathLike | None


def check_outputs(outputs: Mapping[str, PathArg], inputs: Iterable[PathArg] = (), force: bool = False, *,
                  updated: Mapping[str, PathArg] | None = None) -> None:
    """Check every output path of one command at once, before anything is written.

    Args:
        outputs: ``{what: path}`` for every file the command writes (``None`` is skipped: pass it for stdout); the
            names (``OUTPUT``, ``--json``...) appear in the messages.
        inputs: files the command reads; never overwritten, even with ``force``.
        force: outputs may exist.
        updated: ``{what: path}`` for files read and rewritten (a timing cache): they may exist without ``force``,
            but must not be an input or another output.

    Raises:
        CheckpointError: two outputs name one file (symlinks and hard links included), an output is an input, or
            one of :func:`check_output_path`'s reasons.
    """
    given = [(what, Path(p), False) for what, p in outputs.items() if p is not None]
    given += [(what, Path(p), True) for what, p in (updated or {}).items() if p is not None]
    reads = [Path(p) for p in inputs if p is not None]
    for i, (what, path, _) in enumerate(given):
        for other, other_path, _ in given[:i]:
            if same_file(path, other_path):
                raise CheckpointError(f"{path}: named as two outputs ({other} and {what}); choose different names")
    for _, path, may_exist in given:
        check_output_path(path, force or may_exist, tuple(reads))
