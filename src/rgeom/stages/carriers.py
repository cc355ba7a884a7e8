"""``rgeom carriers``: the causal carrier search on the validation sets."""

from __future__ import annotations

from typing import Any

from rgeom.io import read_meta
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import cell_fields, load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Causal carrier search: ablate/add each candidate direction on the validation sets.",
    example="rgeom carriers --model results/model/base \\\n"
    "    --directions results/base/step-000000/directions.parquet \\\n"
    "    --val-harmful results/data/val_harmful.parquet \\\n"
    "    --val-harmless results/data/val_harmless.parquet \\\n"
    "    --out results/base/step-000000/carriers.parquet \\\n"
    '    --params \'{"carrier": {"layer_stride": 3, "positions": [-1]}}\'',
    args=(
        arg("--model", required=True),
        arg("--directions", required=True),
        arg("--val-harmful", required=True),
        arg("--val-harmless", required=True),
        arg("--out", required=True),
        arg(
            "--prompt-filter",
            default=None,
            help="the source model's prompt filter (rgeom prompt-filter)",
        ),
        arg("--activations", default=None, help="the cell's activations, for the rank-k carriers"),
    ),
)


def run(
    model: str,
    directions: str,
    val_harmful: str,
    val_harmless: str,
    out: str,
    params: dict[str, Any],
    prompt_filter: str | None = None,
    activations: str | None = None,
) -> None:
    from rgeom.carrier_table import CarrierInputs
    from rgeom.interventions import carrier_search_table

    seed = seed_stage(params)
    source = read_meta(directions)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    carrier_search_table(
        model=lm,
        tokenizer=tokenizer,
        inputs=CarrierInputs(
            directions=directions,
            harmful=val_harmful,
            harmless=val_harmless,
            prompt_filter=prompt_filter,
            activations=activations,
        ),
        out=out,
        params=params.get("carrier", {}),
        meta=stage_meta(params, model=model, **cell_fields(params, source), directions=directions),
        seed=seed,
    )
