"""The package's input error and the one way an exception becomes a one-line message (no torch import: commands
print usage errors at once)."""

from __future__ import annotations

__all__ = ["CheckpointError", "one_line"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message says why in one line."""


def one_line(exc: object, limit: int = 500, *, whole: bool = False) -> str:
    """An exception's message (or any text) as one line, at most ``limit`` characters; the exception type's name when
    the message is empty. Every command's ``error:`` line and every error recorded in a report goes through it.

    Args:
        whole: fold every line of the message into one (a command's own error line: the message is ours and all of
            it matters); by default the first non-empty line only (errors of other libraries, whose later lines are
            context: a traceback, a graph dump).
    """
    text = str(exc)
    parts = [" ".join(text.split())] if whole else [" ".join(p.split()) for p in text.splitlines() if p.strip()]
    line = parts[0] if parts and parts[0] else ""
    if not line:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
