"""``rgeom validate-judge``: the configured judge scored on a human-labelled file."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import seed_stage, stage_meta

COMMAND = StageCommand(
    help="Score a human-labelled file with the configured judge: accuracy, kappa, confusion.",
    example="rgeom validate-judge --labelled builtin:xstest \\\n"
    "    --agreement results/validation/judge_agreement.parquet \\\n"
    "    --confusion results/validation/judge_confusion.parquet \\\n"
    "    --predictions results/validation/judge_predictions.parquet \\\n"
    "    --markdown results/validation/judge_validation.md",
    args=(
        arg("--labelled", required=True, help="labelled JSONL/CSV/Parquet or builtin:xstest"),
        arg("--prompts", default=None, help="XSTest CSV or prompt Parquet (by prompt_id)"),
        arg("--agreement", required=True, help="output Parquet: accuracy and kappa"),
        arg("--confusion", required=True, help="output Parquet: confusion counts"),
        arg("--predictions", required=True, help="output Parquet: per-item labels"),
        arg("--markdown", required=True, help="output markdown report"),
    ),
)


def run(
    labelled: str,
    agreement: str,
    confusion: str,
    predictions: str,
    markdown: str,
    params: dict[str, Any],
    prompts: str | None = None,
) -> None:
    from rgeom.judges.validation import validate_judge

    seed_stage(params)
    print(
        validate_judge(
            labelled=labelled,
            prompts=prompts,
            outputs={
                "agreement": agreement,
                "confusion": confusion,
                "predictions": predictions,
                "markdown": markdown,
            },
            params=params.get("judge", {}),
            meta=stage_meta(params, labelled=labelled),
            # No check unless asked: the workflow passes validate.max_invalid_rate.
            max_invalid_rate=params.get("validate", {}).get("max_invalid_rate"),
        )
    )
