"""``rgeom drift``: carrier relocation, effective rank and principal angles."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import seed_stage, stage_meta

COMMAND = StageCommand(
    help="Carrier relocation, effective rank and principal angles across anchors and arms.",
    example="rgeom drift --directions results/*/step-*/directions.parquet \\\n"
    "    --carriers results/*/step-*/carriers.parquet \\\n"
    "    --activations results/*/step-*/activations.parquet --out-dir results/drift",
    args=(
        arg("--directions", nargs="+", required=True),
        arg("--carriers", nargs="+", required=True),
        arg("--activations", nargs="*", default=[], help="for the label-shuffled null"),
        arg(
            "--cross-anchor",
            nargs="*",
            default=[],
            help="cross-anchor tables (rgeom cross-anchor) for the verdict",
        ),
        arg("--out-dir", required=True),
    ),
)


def run(
    directions: list[str],
    carriers: list[str],
    activations: list[str],
    out_dir: str,
    params: dict[str, Any],
    cross_anchor: list[str] | None = None,
) -> None:
    from rgeom.drift import build_drift

    seed_stage(params)
    tables = build_drift(
        directions=directions,
        carriers=carriers,
        out_dir=out_dir,
        params=params,
        meta=stage_meta(params),
        activations=activations or None,
        cross_anchor=cross_anchor or None,
    )
    for row in tables["verdict"].to_pylist():
        print(f"{row['arm']}: {row['verdict']} ({row['detail']})")
