"""The architecture, checked: where private torch APIs live, module sizes, import directions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [ROOT / "grassfx", ROOT / "passes"]  # grassfx.passes ships from passes/
APP = ROOT / "recipes"  # grassfx.recipes: application code on the public API
COMPAT = ROOT / "grassfx" / "_compat.py"
ENTRY_POINTS = {ROOT / "grassfx" / "cli.py", ROOT / "grassfx" / "train.py"}  # may dispatch to the recipes
MAX_LINES = 600

# private torch: underscore modules, private Module/Tensor attributes, engine and frame internals
PRIVATE_TORCH = re.compile(
    r"torch\._[a-z]|functorch|_c10d_functional|_functional_collectives|\._parameters\b|\._buffers\b|\._modules\b"
    r"|\._version\b|_getframe|_execution_engine|\._schema\b|_qualified_op_name|_foreach_|__class__\s*="
)


def _modules(*roots):
    return sorted(p for root in roots for p in root.rglob("*.py"))


def _imports(path: Path) -> set:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = _package_of(path)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("passes", "recipes"):
        parts = ["grassfx", *parts]
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def _code(path: Path) -> str:
    """The source without comments and docstrings (prose may name private APIs)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_private_torch_apis_only_in_compat():
    offenders = {str(p.relative_to(ROOT)): sorted(set(PRIVATE_TORCH.findall(_code(p))))
                 for p in _modules(*LIBRARY, APP) if p != COMPAT and PRIVATE_TORCH.search(_code(p))}
    assert offenders == {}
    assert PRIVATE_TORCH.search(_code(COMPAT))  # the check itself sees them where they are


@pytest.mark.parametrize("path", _modules(*LIBRARY, APP), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_over_600_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_library_imports_nothing_from_the_recipes():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("grassfx.recipes"))
                 for p in _modules(*LIBRARY) if p not in ENTRY_POINTS}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package, forbidden", [
    ("grassfx/optim", ("grassfx.instrument.model", "grassfx.compiler", "grassfx.distributed", "grassfx.debug")),
    ("grassfx/compiler", ("grassfx.instrument", "grassfx.optim", "grassfx.distributed", "grassfx.debug")),
    ("passes", ("grassfx.instrument.model", "grassfx.compiler", "grassfx.optim", "grassfx.distributed", "grassfx.debug")),
    ("grassfx/instrument", ("grassfx.compiler.backend", "grassfx.optim.adamw", "grassfx.debug")),
])
def test_one_way_dependencies(package, forbidden):
    """The optimizer does not know the model, the compiler does not know the runtime, passes know neither."""
    found = {}
    for path in _modules(ROOT / package):
        bad = sorted(n for n in _imports(path) if n.startswith(forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}


def test_every_package_is_shipped():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {"grassfx." + ".".join(p.parent.relative_to(ROOT / "grassfx").parts) if p.parent != ROOT / "grassfx"
                else "grassfx" for p in (ROOT / "grassfx").rglob("__init__.py")}
    packages |= {"grassfx.passes", "grassfx.recipes"}
    assert packages == set(config["packages"])
    assert config["package-dir"] == {"grassfx": "grassfx", "grassfx.passes": "passes", "grassfx.recipes": "recipes"}


def test_test_files_have_unique_basenames():
    """tests/ has no __init__.py: pytest imports test files by basename, so two files with one
    name in different folders fail collection of the whole suite."""
    from collections import Counter

    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names


# -- the floors of the house (tools/house.py draws them; docs/architecture.md shows the drawing) --
def _house():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grassfx_house", ROOT / "tools" / "house.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOUSE = _house()
GRAPH = {name: HOUSE.imports_of(name, path, HOUSE.modules()) for name, path in HOUSE.modules().items()}


def test_the_house_sees_every_module_and_import():
    assert "grassfx.core.ops" in GRAPH and "grassfx.passes.sparsify_wgrad" in GRAPH
    assert "grassfx.core.ops" in GRAPH["grassfx.passes.sparsify_wgrad"]
    assert "grassfx.instrument.registry" in GRAPH["grassfx.optim.base"]
    # a function-level import counts as much as a module-level one
    assert "grassfx.compiler" in GRAPH["grassfx.api"]


def test_no_import_cycles_anywhere():
    """Module-level and function-level imports both count (tools/house.py)."""
    assert HOUSE.cycles(GRAPH) == []
    assert HOUSE.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check sees one


def test_instrument_never_imports_the_compiler():
    found = {m: sorted(t for t in ts if t.startswith("grassfx.compiler"))
             for m, ts in GRAPH.items() if m.startswith("grassfx.instrument")}
    assert {m: ts for m, ts in found.items() if ts} == {}


def test_passes_import_only_the_ground_floor_and_their_infrastructure():
    allowed = ("grassfx.passes", "grassfx.core", "grassfx._compat", "grassfx.errors")
    found = {m: sorted(t for t in ts if not t.startswith(allowed))
             for m, ts in GRAPH.items() if m.startswith("grassfx.passes")}
    assert {m: ts for m, ts in found.items() if ts} == {}


def test_no_import_runs_up_a_floor_or_across_rooms_or_breaks_a_rule():
    house = HOUSE.house()
    assert house["up"] == [] and house["across"] == [] and house["broken"] == []
    assert house["climbs"] == []  # an optimizer step never goes back up
