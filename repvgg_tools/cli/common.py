"""What every command shares: one-line usage errors, one-line error messages, the exit codes, and the one place
that turns exceptions and termination signals into them (:func:`run_command`).

``repvgg-convert``, ``repvgg-export`` and the scripts in ``tools/`` build their parsers with :class:`Parser`, run
their bodies through :func:`run_command`, and check all their output paths at once, before anything is written, with
:func:`repvgg_tools.io.paths.check_outputs`.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

from ..io.errors import one_line

__all__ = ["Parser", "one_line", "error", "run_command", "Interrupted", "EXIT_OK", "EXIT_VERIFY", "EXIT_USAGE",
           "INPUT_ERRORS"]

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2

#: What a bad input or argument raises: ``ValueError`` covers ``CheckpointError``, ``ConversionError``,
#: ``ExportError``, ``PrecisionError``, ``RecipeError`` and ``BuildRefused``; ``OSError`` a missing or unreadable
#: file; ``UnpicklingError`` a checkpoint the unpickler refuses.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, pickle.UnpicklingError)

#: Signals that end a command: each becomes :class:`Interrupted`, so that every ``finally`` and every
#: ``atomic_write`` cleanup runs; SIGINT keeps Python's own ``KeyboardInterrupt``.
_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def error(message: BaseException | str) -> None:
    """Print ``error: MESSAGE`` on one line of stderr."""
    print(f"error: {one_line(message, whole=True)}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error: ...`` line and exit code 2 (no usage block).

    Every command gets a hidden ``--traceback``: an unexpected error then shows Python's traceback instead of the
    one-line ``internal error`` (see :func:`run_command`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)

    def error(self, message: str) -> NoReturn:
        error(f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM from ``timeout`` or a job scheduler, SIGHUP) raised as an exception."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup of the first one short
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only: Python runs signal
    handlers there); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in _TERMINATING:
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN:  # started with the signal ignored (nohup): keep it so
            continue
        previous[signum] = handler
        signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_command(body: Callable[[], int], *, traceback: bool = False,
                expected: tuple[type[BaseException], ...] = INPUT_ERRORS,
                verification: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body and map what it raises to one ``error:`` line and an exit code (every command's one
    catch-all).

    Args:
        body: the command after argument parsing; returns its exit code.
        traceback: re-raise input and internal errors (the hidden ``--traceback`` flag).
        expected: input errors: their message is the line, exit code 2.
        verification: failed checks: ``error: MESSAGE; nothing written``, exit code 1.

    Returns:
        ``body``'s exit code; 1 for a failed check; 2 for an input error or an unexpected exception (``error:
        internal error (...); rerun with --traceback``); 130 after SIGINT, 143 after SIGTERM, 129 after SIGHUP
        (``error: interrupted``), once every cleanup has run.
    """
    try:
        with _signals_as_exceptions():
            return body()
    except verification as exc:
        error(f"{one_line(exc)}; nothing written")
        return EXIT_VERIFY
    except KeyboardInterrupt as exc:
        error("interrupted")
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except expected as exc:
        if traceback:
            raise
        error(exc)
        return EXIT_USAGE
    except Exception as exc:  # a bug, not the user's fault: still one line, with a way to see more
        if traceback:
            raise
        error(f"internal error ({type(exc).__name__}: {one_line(exc)}); rerun with --traceback")
        return EXIT_USAGE
