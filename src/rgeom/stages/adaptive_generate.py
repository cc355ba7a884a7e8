"""``rgeom adaptive-generate``: greedy completions of an adaptive search's test cases."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Greedy completions of an adaptive search's test cases (GCG's exact token ids).",
    example="rgeom adaptive-generate --model results/sft/checkpoints/step-000010 \\\n"
    "    --cases results/sft/step-000010/adaptive_gcg_cases.parquet \\\n"
    "    --out results/sft/step-000010/adaptive_gcg_completions.parquet",
    args=(
        arg("--model", required=True),
        arg("--cases", required=True, help="rgeom adaptive-gcg/-autodan output"),
        arg("--out", required=True, help="the cases with their completions"),
    ),
)


def run(model: str, cases: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.attacks.testcases import adaptive_completions

    seed_stage(params)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    adaptive_completions(
        model=lm,
        tokenizer=tokenizer,
        cases=cases,
        out=out,
        generate=params.get("generate", {}),
        meta=stage_meta(params, model=model),
    )
