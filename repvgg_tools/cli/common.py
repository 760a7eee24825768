"""What every command shares: one-line usage errors, one-line error messages, and the exit codes.

``repvgg-convert``, ``repvgg-export`` and the scripts in ``tools/`` build their parsers with :class:`Parser`, print
errors with :func:`error`, and check output paths with :func:`repvgg_tools.checkpoint.check_output_path`.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["Parser", "one_line", "error", "EXIT_OK", "EXIT_VERIFY", "EXIT_USAGE"]

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


def one_line(exc: BaseException | str) -> str:
    """An exception's message folded into one line (its type's name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def error(message: BaseException | str) -> None:
    """Print ``error: MESSAGE`` on one line of stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error: ...`` line and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        error(f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)
