"""Which config keys a stage's results depend on.

Snakemake reruns a job when its tracked parameters change, so these functions decide which
config edits rerun which jobs. They are research decisions (does ``train.max_steps``
change a checkpoint at step 6?), so they live here, unit-tested without Snakemake
(``tests/test_stage_params.py``), and ``workflow/rules/common.smk`` only calls them.
``tests/test_caching.py`` checks the resulting rerun sets on a real workflow. Imports no
torch: Snakemake loads this while parsing the DAG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The model keys that change what a model computes; threads and paths do not.
MODEL_RESULT_KEYS = ("dtype", "device", "trust_remote_code")
#: Schedules whose learning rate at step t does not depend on the total number of steps.
STEP_INDEPENDENT_SCHEDULES = ("constant", "constant_with_warmup")
#: Training keys that change how often state is saved, never what is trained.
NON_RESULT_TRAIN_KEYS = ("save_every", "save_margin_s")
#: R2D2 keys naming shared files: tracked by the files' content, not by their paths.
R2D2_FILE_KEYS = ("behaviours", "targets")


def model_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` keys every model job depends on."""
    return {k: cfg["model"][k] for k in MODEL_RESULT_KEYS}


def training_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` keys a checkpoint at any step depends on.

    ``max_steps`` only matters under a decaying schedule; dropping it otherwise is what lets
    a later anchor (and a larger ``max_steps``) reuse the earlier segments.
    """
    settings = {k: v for k, v in train.items() if k not in NON_RESULT_TRAIN_KEYS}
    if settings.get("lr_scheduler", "constant") in STEP_INDEPENDENT_SCHEDULES:
        settings.pop("max_steps", None)
    return settings


def train_params(cfg: Mapping[str, Any], arm: str, step: int) -> dict[str, Any]:
    """One training segment's parameters: the setup and its own anchor, not the others, so
    a new anchor leaves the earlier segments (and their cells) up to date. Only the r2d2 arm
    carries the ``r2d2`` section: tuning R2D2 never retrains the SFT arm. The R2D2 files'
    content is the caller's to add (it needs their digests)."""
    sections: dict[str, Any] = {
        "model": model_params(cfg),
        "train": training_settings(cfg["train"]),
        "anchors": [int(step)],
    }
    if arm == "r2d2":
        sections["r2d2"] = {k: v for k, v in cfg["r2d2"].items() if k not in R2D2_FILE_KEYS}
    return sections
