"""The package's input error and the one way an exception becomes a one-line message (no torch import: commands
print usage errors at once)."""

from __future__ import annotations

__all__ = ["CheckpointError", "one_line"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message says why in one line."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or of a text), whitespace collapsed, at most ``limit``
    characters; the exception type's name when the message is empty."""
    text = str(exc)
    line = next((" ".join(part.split()) for part in text.splitlines() if part.strip()), "")
    if not line:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
