"""``rgeom adaptive-judge``: adaptive-attack completions judged per behaviour."""

from __future__ import annotations

from typing import Any

from rgeom.io import read_meta
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import seed_stage, stage_meta

COMMAND = StageCommand(
    help="Judge adaptive-attack completions: per-behaviour labels and success.",
    example="rgeom adaptive-judge \\\n"
    "    --completions results/sft/step-000010/adaptive_gcg_completions.parquet \\\n"
    "    --out results/sft/step-000010/adaptive_gcg.parquet",
    args=(
        arg("--completions", required=True),
        arg("--out", required=True, help="per-behaviour labels and success"),
        arg("--metrics", default=None, help="also write the ASR table (rgeom adaptive-metrics)"),
        arg("--prompts", default=None, help="behaviour set: the text a model judge reads"),
    ),
)


def run(
    completions: str,
    out: str,
    metrics: str | None,
    params: dict[str, Any],
    prompts: str | None = None,
) -> None:
    from rgeom.attacks.testcases import judge_adaptive

    seed = seed_stage(params)
    source = read_meta(completions)
    judge_adaptive(
        completions=completions,
        out=out,
        metrics_out=metrics,
        judge=params.get("judge", {}),
        seed=seed,
        meta=stage_meta(params, model=source.get("model")),
        prompts=prompts,
    )
