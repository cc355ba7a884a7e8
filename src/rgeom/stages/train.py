"""``rgeom train``: one arm up to its anchors, a checkpoint at each."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg, key_value
from rgeom.stages._common import seed_stage, stage_meta

COMMAND = StageCommand(
    help="Train one arm up to its anchors (resuming from --state-dir) and write a checkpoint "
    "at each; the workflow runs one job per anchor.",
    example="rgeom train --arm sft --model results/model/base \\\n"
    "    --data results/data/sft_train.parquet --out-dir results/sft/checkpoints \\\n"
    "    --state-dir results/sft/train_state --log-table results/sft/train_log.parquet \\\n"
    '    --params \'{"train": {"max_steps": 20}, "anchors": [10, 20]}\'',
    args=(
        arg("--arm", required=True),
        arg("--model", required=True),
        arg("--data", required=True),
        arg("--out-dir", required=True, help="folder of the anchor checkpoints"),
        arg("--state-dir", required=True, help="resume state kept across reruns"),
        arg("--log-table", help="also write the per-step metrics Parquet here"),
        arg("--extra", action="append", type=key_value, default=[], help="NAME=PATH extra inputs"),
        arg(
            "--time-limit-min",
            type=float,
            help="the job's time limit in minutes; under SLURM the run saves and "
            "stops train.save_margin_s before it",
        ),
        arg("--save-every", type=int, help="overrides train.save_every"),
        arg("--save-margin-s", type=float, help="overrides train.save_margin_s"),
    ),
)


def run(  # noqa: PLR0913 (one keyword per CLI flag: argparse's dests)
    arm: str,
    model: str,
    data: str,
    out_dir: str,
    state_dir: str,
    log_table: str | None,
    extra: list[tuple[str, str]],
    params: dict[str, Any],
    time_limit_min: float | None = None,
    save_every: int | None = None,
    save_margin_s: float | None = None,
) -> None:
    import os

    from rgeom.train import train_arm
    from rgeom.train.runner import ArmFiles

    seed_stage(params)
    # Passed beside --params: when state is saved changes no result, so the workflow keeps
    # these out of the job's parameters (no rerun when they change).
    saving = {"save_every": save_every, "save_margin_s": save_margin_s}
    saving = {k: v for k, v in saving.items() if v is not None}
    if saving:
        params = {**params, "train": {**params.get("train", {}), **saving}}
    # Only SLURM enforces the limit; a workstation run with the rule's runtime must not stop.
    limit = time_limit_min * 60 if time_limit_min and os.environ.get("SLURM_JOB_ID") else None
    train_arm(
        arm=arm,
        # Without --log-table the metrics stay in the state folder (rule train_log's part).
        files=ArmFiles(model, data, out_dir, state_dir, log_table),
        params=params,
        extra=dict(extra),
        meta=stage_meta(params, model=model, arm=arm),
        time_limit_s=limit,
    )
