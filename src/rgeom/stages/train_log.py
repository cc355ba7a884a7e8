"""``rgeom train-log``: an arm's per-step training metrics as Parquet."""

from __future__ import annotations

import logging
from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import stage_meta

log = logging.getLogger(__name__)

COMMAND = StageCommand(
    help="The arm's per-step training metrics (loss terms, learning rate, tokens/s) as Parquet.",
    example="rgeom train-log --arm sft --state-dir results/sft/train_state \\\n"
    "    --out results/sft/train_log.parquet",
    args=(
        arg("--arm", required=True),
        arg("--state-dir", required=True),
        arg("--out", required=True),
    ),
)


def run(arm: str, state_dir: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.train.train_log import write_train_log

    table = write_train_log(state_dir, out, stage_meta(params, arm=arm))
    log.info("training log of arm %s: %d steps -> %s", arm, table.num_rows, out)
