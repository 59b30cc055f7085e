"""docs/design.md's import layering, as the code imports: schedulers <- custom_pipelines <- training, one way only.

Every import is seen: top-level and inner (`def f(): from x import y`), relative ones resolved to their module, and
`importlib.import_module(...)` / `__import__(...)` calls, whose argument must be a string the checker can read (a
literal, an f-string or a module-level string constant); an argument it cannot read is itself a violation.

Rules: the math (`schedulers/tutorial_math.py`) is a leaf, and the grids (`tutorial_grids.py`) import only it; samplers
sit side by side (each `scheduling_tutorial_*.py` imports only a base module, the math and leaf helpers, never another
sampler); the likelihoods (`schedulers/tutorial_likelihood.py`) are plain functions beside the math that import only
the math, the grids and the ODE helper, and no sampler imports them (pipelines do); `schedulers` never imports
`custom_pipelines` or `training`; `custom_pipelines` never imports `training`. The shipped folders under
`training/pretrained/` are generated copies of library files, checked by `training/export_shipped.py --check`
(tests/training/test_shipped_code_in_sync.py), so they are not walked here.
"""

import ast
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["schedulers", "custom_pipelines", "training"]
GENERATED = [ROOT / "training" / "pretrained"]
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
# Inside `schedulers/`: the siblings each module may import. Samplers side by side: a sampler file imports a base,
# the math and the leaf helpers; the math and the helpers import nothing above them. A new module needs a line here.
MATH = "tutorial_math"
GRIDS = "tutorial_grids"  # the math of timestep grids, on top of tutorial_math and nothing else
BASES = {"tutorial_discrete_base", "tutorial_continuous"}
LEAF_HELPERS = {"tutorial_scheduler_common", "tutorial_ode"}
SCHEDULER_SIBLINGS = {
    "__init__": None,  # the package's front door re-exports everything
    MATH: set(),
    GRIDS: {MATH},
    "tutorial_scheduler_common": {MATH},  # the output class and the mixin under both bases
    "tutorial_ode": {MATH, GRIDS},
    "tutorial_discrete_base": {MATH, GRIDS, "tutorial_scheduler_common"},  # both bases stand on the shared mixin
    "tutorial_continuous": {MATH, GRIDS, "tutorial_scheduler_common"},
    "gaussian_mixture": {MATH, GRIDS},  # exact test data for the tutorial and the tests
    "tutorial_likelihood": {MATH, GRIDS, "tutorial_ode"},  # the ELBO and the PF-ODE likelihood
}
SAMPLER_PREFIX = "scheduling_tutorial_"
SAMPLER_SIBLINGS = BASES | {MATH, GRIDS} | LEAF_HELPERS


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _string_of(node: ast.AST, constants: dict) -> Optional[str]:
    """The text of a string expression when it can be read statically; `{...}` marks a part that cannot."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                text = _string_of(value.value, constants)
                parts.append("{...}" if text is None else text)
            else:
                parts.append(_string_of(value, constants) or "")
        return "".join(parts)
    return None


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module" and isinstance(func.value, ast.Name) and func.value.id == "importlib"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def imports_of(path: Path, package: Optional[str] = None) -> Iterator[Tuple[str, int]]:
    """(absolute module name, line) of everything `path` imports, anywhere in it.

    `package` is the package `path` belongs to (derived from its place in the repository when not given); relative
    imports resolve against it, `from . import name` to the submodule `package.name`. A dynamic import whose argument
    cannot be read yields `?` followed by its source text.
    """
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    if package is None:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module, node.lineno
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            if node.module:
                yield ".".join(base + [node.module]), node.lineno
            else:
                for alias in node.names:
                    yield ".".join(base + [alias.name]), node.lineno
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            text = _string_of(node.args[0], constants) if node.args else None
            top = None if text is None else text.split(".")[0]
            if text is None or not top or "{" in top:
                yield "?" + ast.get_source_segment(source, node), node.lineno
            else:
                yield text, node.lineno


def _layer_files(layer: str):
    return sorted(p for p in (ROOT / layer).rglob("*.py") if not any(p.is_relative_to(g) for g in GENERATED))


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_downwards(layer):
    files = _layer_files(layer)
    assert files, f"{layer}/ has no Python files"
    violations = []
    for path in files:
        for name, line in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            top = name.split(".")[0]
            if name.startswith("?"):
                violations.append(f"{where} imports something the checker cannot read: {name[1:]}")
            elif top in LAYERS and top not in ALLOWED[layer]:
                violations.append(f"{where} imports {name}")
            elif top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                violations.append(f"{where} imports {name}")
    assert not violations, "\n".join(violations)


def test_samplers_sit_side_by_side_on_the_base_and_the_math():
    violations = []
    for path in _layer_files("schedulers"):
        stem = path.stem
        if stem.startswith(SAMPLER_PREFIX):
            allowed = SAMPLER_SIBLINGS
        elif stem in SCHEDULER_SIBLINGS:
            allowed = SCHEDULER_SIBLINGS[stem]
        else:
            violations.append(f"{path.relative_to(ROOT)}: a new module; say what it may import in SCHEDULER_SIBLINGS")
            continue
        if allowed is None:
            continue
        for name, line in imports_of(path):
            package, _, sibling = name.partition(".")
            if package == "schedulers" and sibling not in allowed:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {name} (allowed: {sorted(allowed)})")
    assert not violations, "\n".join(violations)


def test_the_math_is_a_leaf():
    math_file = ROOT / "schedulers" / f"{MATH}.py"
    project = set(LAYERS)
    assert [n for n, _ in imports_of(math_file) if n.split(".")[0] in project] == []


def test_the_checker_sees_every_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text(
        "import importlib\n"
        "import os\n"
        "PACKAGE = 'schedulers'\n"
        "from training import train_unconditional\n"
        "from .sibling import y\n"
        "from . import tutorial_math as tm\n"
        "from ..other import z\n"
        "def f(stem):\n"
        "    from custom_pipelines import tutorial_likelihood\n"
        "    importlib.import_module('training.settings')\n"
        "    importlib.import_module(f'{PACKAGE}.{stem}')\n"
        "    importlib.import_module(stem)\n"
        "    return __import__('accelerate')\n"
    )
    names = [n for n, _ in imports_of(bad, package="schedulers.sub")]
    assert names[:6] == [
        "importlib",
        "os",
        "training",
        "schedulers.sub.sibling",
        "schedulers.sub.tutorial_math",
        "schedulers.other",
    ]
    assert sorted(names[6:]) == sorted(
        [
            "custom_pipelines",
            "training.settings",
            "schedulers.{...}",
            "?importlib.import_module(stem)",
            "accelerate",
        ]
    )
