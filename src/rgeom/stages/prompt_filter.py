"""``rgeom prompt-filter``: Arditi et al.'s prompt filter, decided on the source model."""

from __future__ import annotations

from typing import Any

from rgeom.config import setting
from rgeom.errors import RgeomError
from rgeom.io import read_meta
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import recorded, stage_meta

COMMAND = StageCommand(
    help="Arditi's prompt filter, decided once on the source model's activations (with "
    "baseline refusal scores) for every cell's directions and carrier search.",
    example="rgeom prompt-filter --activations results/base/step-000000/activations.parquet \\\n"
    '    --out results/prompt_filter.parquet --params \'{"carrier": {"min_prompts": 8}}\'',
    args=(
        arg("--activations", required=True),
        arg("--out", required=True),
    ),
)


def direction_filter(params: dict[str, Any]) -> tuple[bool, int]:
    """``carrier.filter_prompts`` and ``carrier.min_prompts``, checked."""
    enabled = setting(params, "carrier.filter_prompts")
    if not isinstance(enabled, bool):
        raise RgeomError(f"carrier.filter_prompts must be true or false, got {enabled!r}")
    least = setting(params, "carrier.min_prompts")
    if not isinstance(least, int) or isinstance(least, bool) or least < 1:
        raise RgeomError(f"carrier.min_prompts must be an integer >= 1, got {least!r}")
    return enabled, least


def run(activations: str, out: str, params: dict[str, Any]) -> None:
    """Arditi et al.'s prompt filter, decided once on the source model's activation table
    (with its baseline refusal scores) for every cell's directions and carrier search."""
    from rgeom.geometry import prompt_filter_table

    _, min_prompts = direction_filter(params)
    source = read_meta(activations)
    prompt_filter_table(
        activations,
        out,
        stage_meta(params, **recorded(source, "model", "arm", "step")),
        min_prompts=min_prompts,
    )
