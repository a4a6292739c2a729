"""The floors of the project, checked two ways: every ``import`` statement of every module, read with ``ast``
(including the ones inside functions, which run at call time), and ``sys.modules`` after importing every module
in a fresh interpreter.

- ``mantranet_torch`` (the ground floor) imports nothing else of ours;
- ``converter`` imports no TensorFlow or Keras, and of ours only ``mantranet_torch``;
- nothing imports the CLI (``mantranet_cli``) but the CLI itself;
- the shipped packages import nothing that the wheel does not ship (``tests``, ``benchmarks``, ``hubconf``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("mantranet_torch", "converter", "reference", "parity_tests", "evaluation", "training", "mantranet_cli")
OURS = (*SHIPPED, "tests", "benchmarks", "hubconf")
TENSORFLOW = ("tensorflow", "keras", "tf_keras")


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports, relative imports resolved to their package."""
    package = path.relative_to(REPO).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found


def violations(packages: tuple[str, ...], allowed: set[str], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for package in packages:
        for path in modules(package):
            bad = sorted(name for name in imported(path) if name in forbidden and name not in allowed)
            out += [f"{path.relative_to(REPO)} imports {name}" for name in bad]
    return out


def test_the_rules_read_the_imports_they_claim_to() -> None:
    """The reader itself, on modules whose imports are known: a reader that found nothing would pass every rule."""
    assert {"converter", "mantranet_torch", "parity_tests"} <= imported(REPO / "parity_tests" / "api.py")
    assert "mantranet_cli" in imported(REPO / "mantranet_cli" / "main.py")  # relative imports count
    assert "tensorflow" in imported(REPO / "reference" / "model.py")


def test_the_model_package_imports_nothing_else_of_ours() -> None:
    assert violations(("mantranet_torch",), {"mantranet_torch"}, OURS) == []


def test_the_converter_never_imports_tensorflow_and_only_the_model_package_of_ours() -> None:
    assert violations(("converter",), {"converter", "mantranet_torch"}, (*OURS, *TENSORFLOW)) == []


def test_nothing_imports_the_command_line_interface() -> None:
    # The suite's own tests of the commands (test_*.py) are the exception: they call mantranet_cli.main.
    libraries = [p for package in SHIPPED if package != "mantranet_cli" for p in modules(package)]
    libraries = [p for p in libraries if not p.name.startswith(("test_", "conftest"))]
    assert len(libraries) > 50
    assert [str(p.relative_to(REPO)) for p in libraries if "mantranet_cli" in imported(p)] == []
    assert "mantranet_cli" not in imported(REPO / "hubconf.py")


def test_the_shipped_packages_import_nothing_the_wheel_does_not_ship() -> None:
    assert violations(SHIPPED, set(), ("tests", "benchmarks", "hubconf")) == []


def python(code: str) -> str:
    """What a fresh interpreter prints running ``code`` from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def library_modules(*packages: str) -> list[str]:
    return [
        module_name(p) for package in packages for p in modules(package) if not p.name.startswith(("test_", "conftest"))
    ]


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """The top-level modules in ``sys.modules`` of one fresh interpreter after it imports every module of the
    ground floor, then of the converter, then of every library package: one snapshot per step (each step's
    imports add to the last's, so a module loaded by a lower floor shows in its own snapshot first)."""
    steps = {
        "model": library_modules("mantranet_torch"),
        "converter": library_modules("converter"),
        "libraries": library_modules("reference", "parity_tests", "evaluation", "training"),
    }
    code = (
        "import importlib, json, sys, warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)  # the renamed modules' aliases are imported too\n"
        "snapshots = {}\n"
        f"for step, names in {steps!r}.items():\n"
        "    for name in names:\n"
        "        importlib.import_module(name)\n"
        "    snapshots[step] = sorted({m.split('.')[0] for m in sys.modules})\n"
        "print(json.dumps(snapshots))\n"
    )
    return {step: set(names) for step, names in json.loads(python(code).strip().splitlines()[-1]).items()}


def test_importing_every_model_module_loads_nothing_else_of_ours(loaded) -> None:
    assert "mantranet_torch" in loaded["model"] and loaded["model"] & set(OURS) == {"mantranet_torch"}


def test_importing_every_converter_module_loads_no_tensorflow(loaded) -> None:
    assert "h5py" in loaded["converter"]  # it did import them
    assert loaded["converter"] & {*TENSORFLOW, *OURS} == {"converter", "mantranet_torch"}


def test_importing_every_library_module_leaves_the_command_line_interface_unloaded(loaded) -> None:
    assert {"tensorflow", "reference", "evaluation"} <= loaded["libraries"]  # the top floors, TensorFlow with them
    assert "mantranet_cli" not in loaded["libraries"] and "tests" not in loaded["libraries"]


RENAMED = {
    "converter.atomic": "mantranet_torch.files",
    "mantranet_torch.image": "mantranet_torch.model_input",
    "mantranet_torch.images": "mantranet_torch.image_files",
}


def test_a_renamed_module_is_still_importable_under_its_old_name_with_a_warning() -> None:
    code = (
        "import importlib, json, warnings\n"
        "found = {}\n"
        f"for old, new in {RENAMED!r}.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        alias = importlib.import_module(old)\n"
        "    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "    found[old] = [alias is importlib.import_module(new), messages]\n"
        "print(json.dumps(found))\n"
    )
    found = json.loads(python(code).strip().splitlines()[-1])
    for old, new in RENAMED.items():
        same, messages = found[old]
        assert same and any(f"{old} is deprecated: import {new}" in m for m in messages), (old, messages)
