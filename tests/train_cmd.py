"""The ``rgeom train`` command line of a test run, built once for every test that starts
training in its own processes (torchrun, srun tasks, a run killed and resumed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def train_args(
    root: Path, model: Path, data: Path, params: dict, arm: str = "sft", extra: Sequence[str] = ()
) -> list[str]:
    """``train`` and its flags, with checkpoints, resume state and log under ``root``;
    ``extra`` are further flags (``--extra NAME=PATH`` pairs) placed before ``--params``."""
    return [
        "train",
        "--arm",
        arm,
        "--model",
        str(model),
        "--data",
        str(data),
        "--out-dir",
        str(root / "checkpoints"),
        "--state-dir",
        str(root / "train_state"),
        "--log-table",
        str(root / "train_log.parquet"),
        *extra,
        "--params",
        json.dumps(params),
    ]
