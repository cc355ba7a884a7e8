"""The lint gate of ``make lint``, run by the test command so CI catches a red lint.

A rule edit once left ``snakefmt --check`` failing for three commits because only
``make test`` runs in CI; these are the same four commands, from the repository root.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

COMMANDS = {
    "ruff check": ["ruff", "check", "src", "tests", "benchmarks"],
    "ruff format": ["ruff", "format", "--check", "src", "tests", "benchmarks"],
    "snakefmt": ["snakefmt", "--check", "Snakefile", "workflow/rules"],
    "snakemake lint": ["snakemake", "--lint", "--configfile", "config/config.yaml"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_lint_is_clean(name):
    tool, *args = COMMANDS[name]
    exe = BIN / tool if (BIN / tool).exists() else shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[dev]')")
    proc = subprocess.run(
        [str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
