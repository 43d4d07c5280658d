"""The package layout: no import cycles (imports inside functions included), and each stage
imports only the stages below it (as each subpackage's ``__init__`` docstring says)."""
from __future__ import annotations

import ast
import inspect
import pathlib
import sys

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# what each part may import (besides itself and the shared leaf modules errors / gc_hold)
ALLOWED = {
    "capture": set(),
    "analysis": {"capture"},
    "deploy": set(),
    "planning": {"analysis", "capture", "deploy"},
    "passes": {"analysis", "capture", "deploy", "planning", "top"},
}
LEAVES = {"vitgraph.errors", "vitgraph.gc_hold", "vitgraph.atomic"}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for base, pkg in (("vitgraph", "vitgraph"), ("passes", "vitgraph.passes")):
        for p in (ROOT / base).rglob("*.py"):
            rel = p.relative_to(ROOT / base).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            mods[".".join((pkg, *rel))] = p
    return mods


def import_graph() -> nx.DiGraph:
    """Module -> module edges for every import statement anywhere in the file.

    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``; importing a
    submodule is not counted as importing its package's ``__init__`` (as import-linter counts).
    """
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs + ([mod] if len(subs) < len(node.names) else [])
            for t in targets:
                if t in mods and t != name:
                    g.add_edge(name, t)
    return g


def part(module: str) -> str:
    """The stage a module belongs to: capture / analysis / planning / deploy / passes / top / leaf."""
    if module in LEAVES:
        return "leaf"
    bits = module.split(".")
    if len(bits) >= 2 and bits[1] in ALLOWED:
        return bits[1]
    return "top"


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles[:5]]}"


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_imports_only_the_stages_below(stage):
    g = import_graph()
    bad = []
    for mod in g:
        if part(mod) != stage:
            continue
        for dep in nx.descendants(g, mod):  # transitively: nothing below may reach upwards
            p = part(dep)
            if p not in (stage, "leaf") and p not in ALLOWED[stage]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad[:10]


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """The graph counts an import inside a function: a cycle written that way is found."""
    pkg = tmp_path / "vitgraph"
    (pkg / "capture").mkdir(parents=True)
    (tmp_path / "passes").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "capture" / "__init__.py").write_text("")
    (pkg / "capture" / "a.py").write_text("from vitgraph.capture.b import x\n")
    (pkg / "capture" / "b.py").write_text("def x():\n    from vitgraph.capture import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert list(nx.simple_cycles(import_graph())) != []


def test_results_are_written_under_the_repository():
    from vitgraph.deploy.measure import REPO_ROOT

    assert (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "benchmarks").is_dir()


def test_no_two_library_modules_share_a_file_name():
    names = [p.name for base in ("vitgraph", "passes") for p in (ROOT / base).rglob("*.py") if p.name != "__init__.py"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_no_submodule_is_shadowed_by_a_function():
    """``import vitgraph.x as m`` gives the module: no attribute of the package hides one."""
    import importlib

    import vitgraph

    for mod in sorted(m for m in _modules() if m.count(".") == 1 and m.startswith("vitgraph.")):
        name = mod.split(".")[1]
        importlib.import_module(mod)
        assert inspect.ismodule(getattr(vitgraph, name)), f"vitgraph.{name} is {getattr(vitgraph, name)!r}"
