"""``rgeom summary``: the summary table, the paper-style tables and every report figure.

The stage's logic is :func:`rgeom.report.summary_cmd`.
"""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg

COMMAND = StageCommand(
    help="The summary table, the paper-style tables (behaviour, geometry, interventions, "
    "verdict; CSV, Markdown, LaTeX) and every report figure (PNG + SVG).",
    example="rgeom summary --metrics results/*/step-*/metrics/*.parquet \\\n"
    "    --directions results/*/step-*/directions.parquet \\\n"
    "    --carriers results/*/step-*/carriers.parquet --drift-dir results/drift \\\n"
    "    --interventions results/interventions/interventions.parquet \\\n"
    '    --out-dir results/summary --params \'{"arms": ["sft", "r2d2"]}\'',
    args=(
        arg("--metrics", nargs="+", required=True),
        arg("--directions", nargs="+", required=True),
        arg("--train-logs", nargs="*", default=[]),
        arg("--utility-shift", nargs="*", default=[], help="utility_shift.parquet of every cell"),
        arg("--carriers", nargs="*", default=[], help="every cell's carriers"),
        arg("--drift-dir", default=None, help="folder of drift/angles/verdict"),
        arg("--interventions", default=None, help="all cells' interventions"),
        arg("--validation", default=None, help="validate_judges' judge_agreement.parquet"),
        arg("--out-dir", required=True),
    ),
)


def run(**kwargs: Any) -> None:
    """:func:`rgeom.report.summary_cmd`, with the same keyword arguments."""
    from rgeom.report import summary_cmd

    summary_cmd(**kwargs)
