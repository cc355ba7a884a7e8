"""``rgeom directions``: difference-in-means refusal directions."""

from __future__ import annotations

from typing import Any

from rgeom.io import read_meta
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import recorded, stage_meta

COMMAND = StageCommand(
    help="Difference-in-means refusal directions per layer and position.",
    example="rgeom directions --activations acts.parquet --out directions.parquet",
    args=(
        arg("--activations", required=True),
        arg("--out", required=True),
        arg(
            "--prompt-filter",
            default=None,
            help="the source model's prompt filter (rgeom prompt-filter)",
        ),
    ),
)


def run(
    activations: str, out: str, params: dict[str, Any], prompt_filter: str | None = None
) -> None:
    from rgeom.geometry import diff_in_means_table

    source = read_meta(activations)
    diff_in_means_table(
        activations=activations,
        out=out,
        meta=stage_meta(params, **recorded(source, "model", "arm", "step")),
        prompt_filter=prompt_filter,
    )
