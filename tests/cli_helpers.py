"""Running the commands as users do, in a fresh process: one helper for every test module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_command(command: str, *args, env: dict | None = None, timeout: float = 600, threads: int | None = None,
                cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``command``: a module (``repvgg_tools.cli.convert``), a script path (``tools/x.py``) or a console script
    installed beside this interpreter (``repvgg-convert``); ``threads`` sets OMP_NUM_THREADS for tiny models."""
    if command.endswith(".py"):
        head = [sys.executable, command]
    elif command.startswith("repvgg-"):
        head = [str(Path(sys.executable).parent / command)]
    else:
        head = [sys.executable, "-m", command]
    env = dict(env if env is not None else os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(head + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


def run_convert(*args, **kw) -> subprocess.CompletedProcess:
    """``repvgg-convert ARGS``."""
    return run_command("repvgg_tools.cli.convert", *args, **kw)


def run_export(*args, **kw) -> subprocess.CompletedProcess:
    """``repvgg-export ARGS`` on one torch thread (tiny models run fastest so)."""
    return run_command("repvgg_tools.cli.export", *args, threads=1, **kw)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2, words: str = "") -> None:
    """The command failed with ``code`` and said why in one ``error:`` line containing ``words``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
