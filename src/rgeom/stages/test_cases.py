"""``rgeom test-cases``: per-method (and your own) test-case files merged into one."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import stage_meta

COMMAND = StageCommand(
    help="Merge per-method (and your own) test-case files, checking every behaviour id.",
    example="rgeom test-cases --cases results/attacks/DirectRequest.parquet \\\n"
    "    results/attacks/Templates.parquet --behaviors results/data/harmbench.parquet \\\n"
    "    --out results/attacks/test_cases.parquet",
    args=(
        arg("--cases", nargs="+", required=True, help="test-case Parquet files"),
        arg("--behaviors", required=True, help="behaviour set (prompt Parquet)"),
        arg("--out", required=True),
    ),
)


def run(cases: list[str], behaviors: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.attacks.testcases import combine_test_cases

    combine_test_cases(parts=cases, behaviours_path=behaviors, out=out, meta=stage_meta(params))
