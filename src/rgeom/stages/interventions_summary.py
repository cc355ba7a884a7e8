"""``rgeom interventions-summary``: all cells' intervention tables in one, and frontiers."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import stage_meta

COMMAND = StageCommand(
    help="All cells' intervention tables in one, and a refusal-vs-KL frontier figure per arm.",
    example="rgeom interventions-summary --tables results/*/step-*/interventions.parquet \\\n"
    "    --out-dir results/interventions",
    args=(
        arg("--tables", nargs="+", required=True),
        arg("--out-dir", required=True),
    ),
)


def run(tables: list[str], out_dir: str, params: dict[str, Any]) -> None:
    from rgeom.causal import interventions_summary

    interventions_summary(tables=tables, out_dir=out_dir, params=params, meta=stage_meta(params))
