"""The import layers contract (pyproject.toml, [tool.importlinter]) holds, and would catch a wrong-way import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(source_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(source_root / "src")}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", "--config", str(source_root / "pyproject.toml")],
                          cwd=source_root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def lint_available() -> None:
    if not LINT.exists():
        pytest.fail(f"lint-imports is not installed beside {sys.executable}: install the test extras (make setup).")


def test_the_package_keeps_its_layers(lint_available):
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("path", "line", "wrong", "broken"), [
    # a method reaching up to the wrapper, inside a function (the kind of import that tangled the package)
    ("methods/lora/layers.py", "def pattern_value(", "deltatune.peft_model",
     "deltatune.methods is not allowed to import deltatune.peft_model"),
    # the quantized backends reaching up to a method
    ("quantized/__init__.py", "def backend_for(", "deltatune.methods.lora.layers",
     "deltatune.quantized is not allowed to import deltatune.methods"),
    # data reaching the wrapper
    ("data/formats.py", "def detect_format(", "deltatune.peft_model",
     "deltatune.data is not allowed to import deltatune.peft_model"),
])
def test_a_wrong_way_import_breaks_the_contract(lint_available, tmp_path, path, line, wrong, broken):
    """In a scratch copy of the package, one import inside a function, pointing up the layers, fails the check."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    module = tmp_path / "src" / "deltatune" / path
    text = module.read_text()
    assert line in text, f"{line!r} moved: update this test"
    head, tail = text.split(line, 1)
    signature, body = tail.split("\n", 1)
    module.write_text(f"{head}{line}{signature}\n    import {wrong}  # noqa: F401\n{body}")
    result = lint(tmp_path)
    assert result.returncode != 0 and broken in result.stdout, result.stdout + result.stderr
