"""The code's style is checked, not hoped for: ruff's lint rules and its formatter (pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command: list[str]):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is missing: install the dev extra (pip install -e '.[dev]')"
    done = subprocess.run([ruff, *command], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
