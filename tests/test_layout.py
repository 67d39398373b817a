"""The package's folders follow the flow of a run; imports may only point backwards along it.

sources -> plan -> statistics -> solve -> methods -> output -> pipeline -> search -> entry points.
`errors` and `config` sit below everything. A module may import its own stage and earlier ones;
an import from a later stage (statistics importing methods, sources importing plan, ...) fails here,
and so does an import cycle between modules at import time.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "bmmstream"

STAGES = {
    "errors": 0,
    "config": 0,
    "sources": 1,
    "plan": 2,
    "statistics": 3,
    "solve": 4,
    "methods": 5,
    "output": 6,
    "pipeline": 7,
    "executors": 7,  # where units are computed (Ray): beside the pipeline it drives
    "search": 8,
    "api": 9,
    "cli": 9,
    "demo": 9,
    "__main__": 9,
    "__init__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return STAGES["__init__"]
    return STAGES[parts[1]]


def _imports(path: Path, module: str, top_level_only: bool) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "bmmstream"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bmmstream":
                continue
            if target == "bmmstream" and all(a.name == "__version__" for a in node.names):
                continue  # the package's version string, not its entry points
            for a in node.names:  # `from bmmstream.x import y` may name submodule y
                sub = f"{target}.{a.name}"
                found.append((sub if sub in _modules() else target, node.lineno))
    return found


def test_package_root_is_only_entry_points():
    roots = sorted(p.name for p in PKG.glob("*.py"))
    assert len(roots) <= 8, roots
    assert set(roots) <= {"__init__.py", "__main__.py", "api.py", "cli.py", "config.py", "errors.py",
                          "pipeline.py", "demo.py"}, roots
    for sub in ("sources", "plan", "statistics", "solve", "methods", "output", "executors", "search"):
        doc = ast.get_docstring(ast.parse((PKG / sub / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{sub}/__init__.py must say its job and what it may import"


def test_imports_point_backwards_along_the_flow():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        for target, line in _imports(path, mod, top_level_only=False):
            assert target in mods, f"{path}:{line} imports unknown module {target}"
            if _stage(target) > _stage(mod):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} (stage {_stage(mod)}) imports "
                           f"{target} (stage {_stage(target)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_import_time():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(p, m, top_level_only=True) if t != m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The walker must catch a late-stage import written inside a function (lazy imports count)."""
    fake = tmp_path / "bmmstream" / "sources"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from bmmstream.methods.registry import get_method\n")
    found = _imports(fake / "bad.py", "bmmstream.sources.bad", top_level_only=False)
    assert found and all(_stage(t) > _stage("bmmstream.sources.bad") for t, _ in found)
