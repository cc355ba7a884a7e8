"""``rgeom judge``: label completions (and, with ``--metrics``, score them)."""

from __future__ import annotations

from typing import Any

from rgeom.io import read_meta
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import recorded, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Label completions (and, with --metrics, compute the benchmark's metrics).",
    example="rgeom judge --generations gen.parquet --labels labels.parquet",
    args=(
        arg("--generations", required=True),
        arg("--labels", required=True),
        arg("--metrics", default=None, help="also write the metrics (rgeom metrics)"),
        arg("--prompts", default=None, help="the prompt set (behaviour text for model judges)"),
    ),
)


def run(
    generations: str,
    labels: str,
    metrics: str | None,
    params: dict[str, Any],
    prompts: str | None = None,
) -> None:
    from rgeom.judges import judge_table

    seed = seed_stage(params)
    source = read_meta(generations)
    judge_table(
        generations=generations,
        labels_out=labels,
        metrics_out=metrics,
        params=params.get("judge", {}),
        seed=seed,
        meta=stage_meta(params, **recorded(source, "model", "arm", "step", "benchmark")),
        prompts=prompts,
    )
