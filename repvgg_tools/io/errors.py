"""The package's input error and the one way an exception becomes a one-line message (no torch import: commands
print usage errors at once)."""

from __future__ import annotations

__all__ = ["CheckpointError", "one_line"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message says why in one line."""


def one_line(exc: object, limit: int = 500) -> str:
    """An exception's message (or any text) folded into one line: whitespace collapsed, at most ``limit`` characters
    (the start kept: it says what went wrong); the exception type's name when the message is empty. Every command's
    ``error:`` line and every error recorded in a report goes through this one function."""
    line = " ".join(str(exc).split())
    if not line:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
