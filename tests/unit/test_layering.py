"""The package imports only downward: the layers of docs/architecture.md, read from the code's imports.

Every module of megatron_dsv3 belongs to a unit (a top-level module, or a subpackage); a unit
may import from its own modules and from units on lower layers, never from its own layer's
other units or from above. Imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_dsv3"

# docs/architecture.md: layer of each unit, lowest first.
LAYERS = {
    "config": 0,
    "weight_grad": 1, "distributed": 1, "cpu": 1, "safe_load": 1, "datasets": 1,
    "attention": 2, "routing": 2, "fp8": 2,
    "overlap": 3,
    "specs": 4,
    "pipeline": 5, "convert": 5,
    "training": 6, "launch": 6, "generate": 6,
    "bench": 7,
}
FACE = "__init__"  # megatron_dsv3/__init__.py: hands on names of the config layer only, so it sits just above it


def _layer(unit: str) -> float:
    return 0.5 if unit == FACE else LAYERS[unit]


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    """The megatron_dsv3 units `path` imports (absolute imports; the package has no relative ones)."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "megatron_dsv3":
                continue
            if len(parts) > 1 and parts[1] in LAYERS:
                units.add(parts[1])
            elif name == "megatron_dsv3" and isinstance(node, ast.Import) or len(parts) == 2:  # the face, or a name it hands on
                units.add(FACE)
    return units


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(path) for path in MODULES} - {FACE}
    assert units == set(LAYERS), "place new units in LAYERS and in docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_run_downward(path):
    unit = _unit(path)
    upward = {imported for imported in _imported_units(path) - {unit} if _layer(imported) >= _layer(unit)}
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {_layer(unit)}) imports {sorted(upward)} from its layer or above"
