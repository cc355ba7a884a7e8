"""The results layout and the (arm, step) grid, defined once.

The workflow's rules (through ``workflow/rules/common.smk``), ``rgeom status`` and the
report read these; no other module spells a cell's folder or the base arm's name. Imports
nothing heavy: Snakemake loads it while parsing the DAG.

    results/model/base/                      the prepared source model (step 0)
    results/{arm}/checkpoints/step-{step}/   a trained anchor (step > 0)
    results/{arm}/step-{step}/...            everything measured on one cell
    results/base/step-000000/...             step 0, measured once for every arm

``{step}`` is the anchor zero-padded to six digits, so cells sort by step as text too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

#: The arm name under which step 0 (the source model) is measured once and shared by
#: every arm's curve.
BASE = "base"
RESULTS = Path("results")


def step_tag(step: int) -> str:
    """``12`` -> ``"000012"``: the zero-padded anchor in every cell path."""
    step = int(step)
    if step < 0:
        raise ValueError(f"an anchor step is >= 0, got {step}")
    return f"{step:06d}"


def step_dir(step: int) -> str:
    """``12`` -> ``"step-000012"``."""
    return f"step-{step_tag(step)}"


def cells(arms: Sequence[str], anchors: Iterable[int]) -> list[tuple[str, int]]:
    """Every measured (arm, step): the base once at step 0 (if 0 is an anchor), then each
    arm at each trained anchor, in the config's order."""
    steps = [int(a) for a in anchors]
    grid = [(BASE, 0)] if 0 in steps else []
    grid += [(arm, step) for arm in arms for step in steps if step > 0]
    return grid


def cell_dir(arm: str, step: int, results: Path | str = RESULTS) -> Path:
    """The folder of one cell's tables: ``results/{arm}/step-{step}``."""
    return Path(results) / arm / step_dir(step)


def model_dir(arm: str, step: int, results: Path | str = RESULTS) -> Path:
    """The model a cell measures: the prepared source model for the base cell, else the
    arm's exported checkpoint at that anchor."""
    if arm == BASE:
        return Path(results) / "model" / BASE
    return Path(results) / arm / "checkpoints" / step_dir(step)
