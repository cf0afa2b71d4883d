"""The package's layers, checked on its source: who may import whom, no cycles, no private names.

``engine`` (the LRP machinery) imports nothing above it and reads transformers only in
``engine/hf.py`` and the role detection; ``results`` and ``render`` sit on the engine; ``api`` may
import those; ``evaluation`` may import ``api`` as well; only ``cli`` imports ``demo``. Imports
inside functions count as much as those at the top of a file (a cycle hidden behind a
function-level import is still a cycle); imports under ``if TYPE_CHECKING:`` do not, since they
never run. The moved import paths (``lxt_plus/rules.py`` and the others) are one-release shims and
are checked separately.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "lxt_plus"

# old import path -> new home
MOVED = {
    "functional": "engine.functional",
    "attention": "engine.attention",
    "modes": "engine.modes",
    "rules": "engine.rules",
    "install": "engine.install",
    "detect": "engine.detect",
    "plan": "engine.plan",
    "hf": "engine.hf",
    "patching": "engine.patching",
    "explain": "api.explain",
    "generation": "api.generation",
    "capture": "api.capture",
    "dataset": "api.dataset",
    "targets": "api.targets",
    "pipelines": "api.pipelines",
    "evaluate": "evaluation.evaluate",
    "baselines": "evaluation.baselines",
    "audit": "evaluation.audit",
    "tune": "evaluation.tune",
    "result": "results.result",
    "serialize": "results.serialize",
    "words": "results.words",
    "models": "demo",
}
SHIMS = {f"lxt_plus.{old}" for old in MOVED} | {"lxt_plus._moved"}

# layer of a module (its first component below lxt_plus) -> the layers it may import
ALLOWED = {
    "errors": set(),
    "engine": {"engine", "errors"},
    "results": {"results", "render", "engine", "errors"},
    "render": {"render", "results", "engine", "errors"},
    "api": {"api", "results", "render", "engine", "errors"},
    "evaluation": {"evaluation", "api", "results", "render", "engine", "errors"},
    "captum": {"api", "results", "engine", "errors"},
    "inseq": {"captum", "engine", "errors"},
    "demo": {"demo", "engine", "errors"},
    "cli": {"api", "evaluation", "results", "render", "engine", "errors", "demo", "__init__"},
    "__init__": set(),  # lxt_plus/__init__.py imports lazily, by name (checked in test_lazy_names)
}
TRANSFORMERS_IN_ENGINE = {"lxt_plus.engine.hf", "lxt_plus.engine.detect"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) of every import that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_blocks(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
    return found


SOURCES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
LIBRARY = {m: p for m, p in SOURCES.items() if m not in SHIMS}


def resolve(target: str, names: list[str]) -> list[str]:
    """The lxt_plus modules an import statement loads: ``from lxt_plus.render import colors`` is the
    module ``lxt_plus.render.colors``; ``from lxt_plus.engine.rules import Rule`` is ``...rules``."""
    if not target.startswith("lxt_plus"):
        return []
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in SOURCES]
    return subs or [target]


def graph() -> dict[str, set[str]]:
    return {
        m: {d for target, names, _ in imports(p) for d in resolve(target, names) if d != m}
        for m, p in LIBRARY.items()
    }


def test_the_layout_is_what_the_layering_describes() -> None:
    assert {layer(m) for m in LIBRARY} == set(ALLOWED), sorted({layer(m) for m in LIBRARY} ^ set(ALLOWED))
    for old in MOVED:
        assert f"lxt_plus.{old}" in SOURCES, f"the shim lxt_plus/{old}.py is missing"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    bad = []
    for module, path in LIBRARY.items():
        for target, names, line in imports(path):
            for dep in resolve(target, names):
                if dep in SHIMS:
                    bad.append(f"{module}:{line} imports the moved path {dep}")
                elif dep.startswith("lxt_plus") and layer(dep) != layer(module):
                    if layer(dep) not in ALLOWED[layer(module)]:
                        bad.append(f"{module}:{line} ({layer(module)}) imports {dep} ({layer(dep)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(1000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    # a package __init__ that re-exports its submodules is not a cycle with them
    real = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not real, f"import cycles: {real}"


def test_no_module_imports_a_private_name_of_another() -> None:
    bad = []
    for module, path in LIBRARY.items():
        for target, names, line in imports(path):
            if not target.startswith("lxt_plus") or target == module:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    sub = f"{target}.{name}"
                    # a private submodule may be used by its own package only
                    if sub in SOURCES and module.startswith(target + "."):
                        continue
                    bad.append(f"{module}:{line} imports {name} from {target}")
            for part in target.split(".")[1:]:
                if part.startswith("_") and not module.startswith(target.rpartition(".")[0] + "."):
                    bad.append(f"{module}:{line} imports the private module {target}")
    assert not bad, "\n".join(bad)


def test_engine_reads_transformers_only_in_hf_and_role_detection() -> None:
    bad = [
        f"{module}:{line}"
        for module, path in LIBRARY.items()
        if layer(module) == "engine" and module not in TRANSFORMERS_IN_ENGINE
        for target, _, line in imports(path)
        if target.split(".")[0] == "transformers"
    ]
    assert not bad, f"engine modules importing transformers: {bad}"


def test_only_cli_imports_demo() -> None:
    users = {m for m, deps in graph().items() if any(layer(d) == "demo" for d in deps) and layer(m) != "demo"}
    assert users == {"lxt_plus.cli"}, users


def test_lazy_names_point_at_the_new_homes() -> None:
    import lxt_plus

    lazy = lxt_plus._LAZY  # the package's own table
    for name, home in lazy.items():
        assert f"lxt_plus.{home}" in LIBRARY, (name, home)
        assert getattr(lxt_plus, name) is getattr(importlib.import_module(f"lxt_plus.{home}"), name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_paths_still_work_and_warn(old: str) -> None:
    new = importlib.import_module(f"lxt_plus.{MOVED[old]}")
    shim = importlib.import_module(f"lxt_plus.{old}")
    public = [n for n in getattr(new, "__all__", dir(new)) if not n.startswith("_")]
    assert public, old
    name = public[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(shim, name)
    assert value is getattr(new, name)
    assert any(
        issubclass(w.category, DeprecationWarning) and f"lxt_plus.{MOVED[old]}.{name}" in str(w.message)
        for w in caught
    ), [str(w.message) for w in caught]
    with pytest.raises(AttributeError, match="no attribute"):
        _ = shim.no_such_name
