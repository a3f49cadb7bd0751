"""The import map of the product points one way, with no cycles.

kscan's packages form layers (scanner/__init__.py draws the data path): a module may
import its own layer and the layers below, never above, and no chain of imports may
come back to where it started — imports inside functions and under TYPE_CHECKING
included. No module is named like a standard-library module (shadowing `inspect` or
`profile` once broke `python scanner/cli.py`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kscan", "translate", "store", "scanner")

#: Layer of each package, lowest first. Equal numbers may not import each other
#: unless they are the same package (translate and store know nothing of each other).
LAYERS = {
    "kscan": 0,
    "translate": 1,
    "store": 1,
    "scanner": 2,  # scanner.errors, scanner.hashing: shared by all sub-packages
    "scanner.qemu": 3,
    "scanner.vm": 4,
    "scanner.image": 5,
    "scanner.check": 6,
    "scanner.examine": 7,
    "scanner.run": 8,
    "scanner.commands": 9,
}
#: Entry points, above everything.
ENTRY_POINTS = {"scanner.__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Product modules `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # `from pkg import sub` depends on pkg.sub; `from pkg import name` on pkg.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        for t in targets:
            # The module itself, or the nearest enclosing product module.
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer_of(mod: str) -> str:
    best = ""
    for layer in LAYERS:
        if (mod == layer or mod.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    assert best, f"{mod} belongs to no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    mods = product_modules()
    known = set(mods)
    return {m: imports_of(p, m, known) for m, p in mods.items()}


def upward_arrows(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        if mod in ENTRY_POINTS:
            continue
        a = layer_of(mod)
        for dep in deps:
            b = layer_of(dep)
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and a != b):
                bad.append(f"{mod} ({a}) imports {dep} ({b})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_imports_point_down_the_layers() -> None:
    assert upward_arrows(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_module_shadows_the_standard_library() -> None:
    shadowing = [m for m in product_modules()
                 if m.rpartition(".")[2] in sys.stdlib_module_names and "." in m]
    assert shadowing == []


def test_few_modules_stay_directly_in_scanner() -> None:
    top = [p.name for p in (ROOT / "scanner").glob("*.py")]
    assert len(top) <= 5, top


# -- the checker itself catches what it must ---------------------------------------


def test_checker_finds_an_upward_arrow_and_a_cycle() -> None:
    g = {"scanner.check.verify": {"scanner.run.engine"}, "scanner.run.engine": set()}
    assert upward_arrows(g) == [
        "scanner.check.verify (scanner.check) imports scanner.run.engine (scanner.run)"]
    assert upward_arrows({"translate.paging": {"store.db"}, "store.db": set()})
    g = {"scanner.run.a": {"scanner.run.b"}, "scanner.run.b": {"scanner.run.c"},
         "scanner.run.c": {"scanner.run.a"}}
    assert cycles(g) == [["scanner.run.a", "scanner.run.b", "scanner.run.c"]]


@pytest.mark.parametrize("src, expect", [
    ("from scanner.vm import VmHandle\n", {"scanner.vm"}),
    ("from scanner.vm.live import AttachedVm\n", {"scanner.vm.live"}),
    ("def f():\n    from scanner.run.engine import Engine\n", {"scanner.run.engine"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import scanner.run\n",
     {"scanner.run"}),
    ("from . import live\n", {"scanner.vm.live"}),
])
def test_imports_are_found_wherever_they_hide(tmp_path: Path, src: str,
                                               expect: set[str]) -> None:
    f = tmp_path / "x.py"
    f.write_text(src)
    known = {"scanner.vm", "scanner.vm.live", "scanner.run", "scanner.run.engine"}
    assert imports_of(f, "scanner.vm.x", known) == expect


def test_verdict_code_imports_nothing_of_qemu() -> None:
    """check/ judges vCPU state and memory from any hypervisor (issue 16 §7)."""
    g = graph()
    bad = sorted(f"{m} imports {d}" for m, deps in g.items() if layer_of(m) == "scanner.check"
                 for d in deps if layer_of(d) == "scanner.qemu")
    assert bad == []
