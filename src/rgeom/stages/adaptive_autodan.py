"""``rgeom adaptive-autodan``: AutoDAN evolved against one checkpoint."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import load_model_and_tokenizer, seed_stage, stage_meta
from rgeom.stages.adaptive_gcg import attacked_cell

COMMAND = StageCommand(
    help="AutoDAN evolved against this checkpoint on the adaptive subset: the jailbreaks.",
    example="rgeom adaptive-autodan --model results/sft/checkpoints/step-000010 \\\n"
    "    --behaviors results/data/harmbench.parquet \\\n"
    "    --out results/sft/step-000010/adaptive_autodan_cases.parquet \\\n"
    '    --params \'{"arm": "sft", "step": 10, "attacks": {"adaptive": {"n_behaviors": 2}}}\'',
    args=(
        arg("--model", required=True),
        arg("--behaviors", required=True, help="behaviour set (prompt Parquet)"),
        arg("--out", required=True, help="evolved templates and test cases"),
        arg("--targets", default=None, help="HarmBench targets JSON"),
        arg("--templates", default=None, help="AutoDAN prototypes JSONL"),
    ),
)


def run(
    model: str,
    behaviors: str,
    out: str,
    targets: str | None,
    templates: str | None,
    params: dict[str, Any],
) -> None:
    from rgeom.attacks.testcases import AdaptiveJob, adaptive_autodan_search

    seed = seed_stage(params)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    arm, step = attacked_cell(params)
    attacks = params.get("attacks", {})
    job = AdaptiveJob(
        behaviours_path=behaviors,
        out=out,
        params=attacks.get("adaptive", {}),
        seed=seed,
        arm=arm,
        step=step,
        meta=stage_meta(params, model=model, arm=arm, step=step),
        targets=targets,
    )
    adaptive_autodan_search(
        lm, tokenizer, job, autodan=attacks.get("autodan", {}), prototypes=templates
    )
