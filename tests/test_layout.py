"""The results layout and the (arm, step) grid live in rgeom.layout only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rgeom import layout
from rgeom.status import expected_paths

SRC = Path(__file__).resolve().parents[1] / "src" / "rgeom"
RULES = Path(__file__).resolve().parents[1] / "workflow" / "rules"


def test_step_tags():
    assert layout.step_tag(0) == "000000"
    assert layout.step_tag(12) == "000012"
    assert layout.step_dir(500) == "step-000500"
    with pytest.raises(ValueError, match=">= 0"):
        layout.step_tag(-1)


@pytest.mark.parametrize(
    ("arms", "anchors", "grid"),
    [
        (
            ["sft", "r2d2"],
            [0, 6, 12],
            [("base", 0), ("sft", 6), ("sft", 12), ("r2d2", 6), ("r2d2", 12)],
        ),
        (["sft"], [5, 10], [("sft", 5), ("sft", 10)]),  # no step 0: no base cell
        (["r2d2"], [0], [("base", 0)]),
    ],
)
def test_cells(arms, anchors, grid):
    assert layout.cells(arms, anchors) == grid


def test_paths():
    assert layout.cell_dir("sft", 6) == Path("results/sft/step-000006")
    assert layout.cell_dir("base", 0, "out") == Path("out/base/step-000000")
    assert layout.model_dir("base", 0) == Path("results/model/base")
    assert layout.model_dir("r2d2", 12, "r") == Path("r/r2d2/checkpoints/step-000012")


def test_status_expects_the_layouts_cells_and_models(tmp_path):
    cfg = {
        "anchors": [0, 6],
        "arms": ["sft"],
        "benchmarks": ["xstest"],
        "data": {"sets": {}},
        "attacks": {},
    }
    rows = expected_paths(cfg, tmp_path)
    models = {(arm, step): path for arm, step, artefact, _, path, _ in rows if artefact == "model"}
    assert models == {
        cell: layout.model_dir(*cell, tmp_path) for cell in layout.cells(["sft"], [0, 6])
    }
    carriers = [path for _, _, artefact, _, path, _ in rows if artefact == "carriers"]
    assert carriers == [layout.cell_dir(a, s, tmp_path) / "carriers.parquet" for a, s in models]


def test_the_base_arm_and_the_step_format_are_spelled_once():
    # Defined in layout.py; everything else imports it. A second definition could drift.
    definition = re.compile(r'^\s*(BASE|BASE_ARM)\s*=\s*"base"', re.M)
    step_format = re.compile(r'f"step-\{[^}]*:06d\}"')
    offenders = []
    for path in [*SRC.rglob("*.py"), *RULES.glob("*.smk")]:
        if path.name == "layout.py":
            continue
        text = path.read_text()
        if definition.search(text) or step_format.search(text):
            offenders.append(str(path))
    assert not offenders
