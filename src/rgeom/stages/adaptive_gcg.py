"""``rgeom adaptive-gcg``: GCG optimised against one checkpoint on a few behaviours."""

from __future__ import annotations

from typing import Any

from rgeom.layout import BASE
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="GCG optimised against this checkpoint on a few behaviours: the suffixes.",
    example="rgeom adaptive-gcg --model results/sft/checkpoints/step-000010 \\\n"
    "    --behaviors results/data/harmbench.parquet \\\n"
    "    --out results/sft/step-000010/adaptive_gcg_cases.parquet \\\n"
    '    --params \'{"arm": "sft", "step": 10, "attacks": {"adaptive": {"n_behaviors": 2}}}\'',
    args=(
        arg("--model", required=True),
        arg("--behaviors", required=True, help="behaviour set (prompt Parquet)"),
        arg("--out", required=True, help="suffixes and their token ids"),
        arg("--targets", default=None, help="HarmBench targets JSON"),
    ),
)


def attacked_cell(params: dict[str, Any]) -> tuple[str, int]:
    """The (arm, step) an adaptive attack runs against; without them, the base model."""
    return params.get("arm", BASE), int(params.get("step", 0))


def run(model: str, behaviors: str, out: str, targets: str | None, params: dict[str, Any]) -> None:
    from rgeom.attacks.testcases import AdaptiveJob, adaptive_gcg_search

    seed = seed_stage(params)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    arm, step = attacked_cell(params)
    job = AdaptiveJob(
        behaviours_path=behaviors,
        out=out,
        params=params.get("attacks", {}).get("adaptive", {}),
        seed=seed,
        arm=arm,
        step=step,
        meta=stage_meta(params, model=model, arm=arm, step=step),
        targets=targets,
    )
    adaptive_gcg_search(lm, tokenizer, job)
