"""DESIGN.md's import layering: schedulers <- custom_pipelines <- training; arrows point one way only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["schedulers", "custom_pipelines", "training"]
# What each layer may import from this project (its own package included).
ALLOWED = {
    "schedulers": {"schedulers"},
    "custom_pipelines": {"schedulers", "custom_pipelines"},
    "training": set(LAYERS),
}
FORBIDDEN_THIRD_PARTY = {
    "schedulers": {"accelerate", "datasets", "transformers"},
    "custom_pipelines": {"accelerate", "datasets"},
}


def imported_top_levels(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_downwards(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"{layer}/ has no Python files"
    violations = []
    for path in files:
        for name, line in imported_top_levels(path):
            if name in LAYERS and name not in ALLOWED[layer]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if name in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom training import train_unconditional\nfrom .sibling import y\n")
    assert [n for n, _ in imported_top_levels(bad)] == ["os", "training"]
