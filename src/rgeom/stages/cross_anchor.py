"""``rgeom cross-anchor``: every source cell's carrier direction applied to one target cell."""

from __future__ import annotations

from typing import Any

from rgeom.errors import RgeomError
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Apply every source cell's carrier direction to one target cell's model.",
    example="rgeom cross-anchor --model results/sft/checkpoints/step-000020 \\\n"
    "    --directions results/{base,sft}/step-*/directions.parquet \\\n"
    "    --carriers results/{base,sft}/step-*/carriers.parquet \\\n"
    "    --val-harmful results/data/val_harmful.parquet \\\n"
    "    --val-harmless results/data/val_harmless.parquet \\\n"
    "    --out results/sft/step-000020/cross_anchor.parquet \\\n"
    '    --params \'{"arm": "sft", "step": 20}\'',
    args=(
        arg("--model", required=True),
        arg("--directions", nargs="+", required=True),
        arg("--carriers", nargs="+", required=True),
        arg("--val-harmful", required=True),
        arg("--val-harmless", required=True),
        arg("--out", required=True),
    ),
)


def run(
    model: str,
    directions: list[str],
    carriers: list[str],
    val_harmful: str,
    val_harmless: str,
    out: str,
    params: dict[str, Any],
) -> None:
    from rgeom.causal import CrossAnchorInputs, cross_anchor_table

    seed_stage(params)
    if params.get("arm") is None or params.get("step") is None:
        raise RgeomError("--params: 'arm' and 'step' (the target cell) are required")
    lm, tokenizer = load_model_and_tokenizer(model, params)
    cross_anchor_table(
        model=lm,
        tokenizer=tokenizer,
        inputs=CrossAnchorInputs(
            directions=directions,
            carriers=carriers,
            val_harmful=val_harmful,
            val_harmless=val_harmless,
        ),
        out=out,
        params=params,
        meta=stage_meta(params, model=model, arm=params["arm"], step=int(params["step"])),
    )
