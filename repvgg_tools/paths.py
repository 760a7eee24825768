"""Output-path rules every command shares, without importing torch (so argument errors stay fast)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointError", "check_output_path"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message says why in one line."""


def check_output_path(output: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Fail before any work when ``output`` cannot or must not be written (every command's one output check).

    Raises:
        CheckpointError: ``output`` is one of ``inputs`` (never overwritten, even with ``force``), a directory, exists
            without ``force``, or its directory is missing or not writable.
    """
    output = Path(output)
    for given in inputs:
        given = Path(given)
        if (output.exists() and given.exists() and os.path.samefile(output, given)) or output.resolve() == \
                given.resolve():
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
