"""The package layout follows the data flow: a module imports only from its own stage or below.

Stages, lowest first: base (errors, log, cache, host) -> kernels -> vm -> memory -> reports ->
workflows -> the front ends (cli, plugin) -> scenarios. Lazy imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "harness"
RANK = {"base": 0, "kernels": 1, "vm": 2, "memory": 3, "reports": 4, "workflows": 5, "front": 6, "scenarios": 7}
BASE = {"errors", "log", "cache", "host", "__init__"}
FRONT = {"cli", "plugin", "__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(HARNESS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and (HARNESS / parts[1]).is_dir()):
        return parts[1]
    leaf = parts[-1] if len(parts) > 1 else "__init__"
    if leaf in BASE:
        return "base"
    if leaf in FRONT:
        return "front"
    raise AssertionError(f"{mod}: a top-level module that is neither base ({sorted(BASE)}) nor a front end "
                         f"({sorted(FRONT)}); put it in a stage package")


def imports(path: Path, known: Set[str]) -> Set[str]:
    """Every harness module `path` imports, at any depth of the file."""
    out: Set[str] = set()
    for n in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "harness" and n.level == 0:
            names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        elif isinstance(n, ast.Import):
            names = [a.name for a in n.names if a.name.split(".")[0] == "harness"]
        out.update(x for x in names if x in known)
    return out


def graph() -> Dict[str, Set[str]]:
    files = {module_name(p): p for p in HARNESS.rglob("*.py")}
    return {m: imports(p, set(files)) - {m} for m, p in files.items()}


def test_the_layout_is_read_from_real_files():
    g = graph()
    assert "harness.vm.machine" in g and "harness.kernels.kernel" in g and "harness.memory.expect" in g
    assert any(g.values()), "no imports found: the walker is broken"


def test_no_upward_imports():
    bad = []
    for mod, deps in graph().items():
        for d in deps:
            if d == "harness" or mod == "harness":
                continue
            if RANK[stage(d)] > RANK[stage(mod)]:
                bad.append(f"{mod} ({stage(mod)}) imports {d} ({stage(d)})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("mod,deps,upward", [
    ("harness.vm.machine", {"harness.memory.parsers"}, True),
    ("harness.memory.observe", {"harness.vm.guest"}, False),
    ("harness.kernels.kernel", {"harness.cache"}, False),
    ("harness.cache", {"harness.kernels.kernel"}, True),
])
def test_the_rank_rule_itself(mod, deps, upward):
    assert any(RANK[stage(d)] > RANK[stage(mod)] for d in deps) is upward
