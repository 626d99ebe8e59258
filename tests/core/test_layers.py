"""The package's folders form layers: core, data, model, evaluation, commands; none imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from glomeruli.core.stage_deps import PACKAGE_DIR, _imported_modules

LAYERS = ("core", "data", "model", "evaluation", "commands")
MODULES = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts and p.parent != PACKAGE_DIR)


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE_DIR).parts[0]


def test_every_module_lives_in_a_layer_folder():
    top_level = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert top_level == ["__init__.py"]
    assert {layer_of(p) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_no_module_imports_a_later_layer(module):
    own = LAYERS.index(layer_of(module))
    upward = sorted(str(m.relative_to(PACKAGE_DIR)) for m in _imported_modules(module)
                    if m.parent != PACKAGE_DIR and LAYERS.index(layer_of(m)) > own)
    assert not upward, f"{module.relative_to(PACKAGE_DIR)} imports {upward}, which sit above {layer_of(module)}/"


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_folder_holds_a_docstring_and_no_code(layer):
    tree = ast.parse((PACKAGE_DIR / layer / "__init__.py").read_text())
    assert ast.get_docstring(tree), f"{layer}/__init__.py: say what the folder holds and what it may import"
    assert len(tree.body) == 1, f"{layer}/__init__.py runs code on import; keep it to its docstring"
    assert "Imports:" in ast.get_docstring(tree)


def test_the_unfreeze_bound_is_the_number_of_blocks_the_network_has():
    import keras

    from glomeruli.core.params import MAX_UNFREEZE_BLOCKS
    from glomeruli.model.efficientnet import N_BLOCKS

    base = keras.applications.EfficientNetB3(include_top=False, weights=None, input_shape=(64, 64, 3))
    blocks = {int(layer.name[5]) for layer in base.layers if layer.name.startswith("block")}
    assert blocks == set(range(1, N_BLOCKS + 1))
    assert MAX_UNFREEZE_BLOCKS == N_BLOCKS
