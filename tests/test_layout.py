"""The layout: at most 12 top-level modules and no name prefix standing in for a package, no import cycle among
repvgg_tools' modules (imports inside functions count), no module over 400 lines, every console script importable and
answering --help, tools/ holds shims that do not edit sys.path."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "repvgg_tools"
MAX_LINES = 400
MAX_TOP_LEVEL = 12


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is package)}`` for every module of repvgg_tools."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the repvgg_tools modules it imports, anywhere in its body. ``from pkg import name`` is an edge to
    ``pkg.name`` when that is a module, else to ``pkg``; importing ``a.b.c`` also runs ``a`` and ``a.b`` (a
    module's own parent packages excepted: they are already being imported)."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names]
                deps.update(s for s in subs if s in mods)
                if any(s not in mods for s in subs) and mod in mods:
                    deps.add(mod)
        for dep in list(deps):
            parts = dep.split(".")
            deps.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts)))
                        if p in mods and not name.startswith(p + "."))
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # walk inside the component from its first module back to it
        start = min(comp)
        path, seen = [start], {start}
        while True:
            nxt = sorted(graph[path[-1]] & comp)
            back = start in nxt
            if back:
                cycles.append(path + [start])
                break
            step = next((w for w in nxt if w not in seen), nxt[0])
            if step in seen:
                cycles.append(path[path.index(step):] + [step])
                break
            path.append(step)
            seen.add(step)
    return cycles


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_top_level_modules_are_few_and_prefixes_are_not_packages():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} top-level modules: {top}"
    prefixes: dict[str, list[str]] = {}
    for name in top:
        if "_" in name.strip("_"):
            prefixes.setdefault(name.strip("_").split("_")[0], []).append(name)
    crowded = {p: names for p, names in prefixes.items() if len(names) >= 3}
    assert not crowded, f"a name prefix doing a package's job: {crowded}"


def test_no_module_over_400_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def _scripts() -> dict[str, str]:
    """pyproject.toml's ``[project.scripts]`` table (read by hand: tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', table, flags=re.M))


SCRIPTS = _scripts()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_resolves_and_answers_help(script):
    module, _, func = SCRIPTS[script].partition(":")
    assert module.startswith("repvgg_tools.cli.")
    assert callable(getattr(importlib.import_module(module), func))
    # python -m with cwd=ROOT runs this checkout's code (an installed console script may point at another copy)
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script} "), proc.stdout[:200]


def test_every_tool_is_a_script_entry_point_without_sys_path_edits():
    for path in sorted((ROOT / "tools").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path"
    shims = {SCRIPTS[s].partition(":")[0].rsplit(".", 1)[1] for s in SCRIPTS} - {"convert", "export"}
    for name in shims:
        text = (ROOT / "tools" / f"{name}.py").read_text()
        assert f"from repvgg_tools.cli.{name} import main" in text and len(text.splitlines()) <= 15, name
