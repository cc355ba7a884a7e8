"""``rgeom interventions``: ablation, activation addition and rank-k ablation at one cell's
carrier."""

from __future__ import annotations

from typing import Any

from rgeom.io import read_meta
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import cell_fields, load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Ablation, activation addition and rank-k ablation at one cell's carrier: refusal "
    "score, judged generations, KL, cross-entropy and utility under each.",
    example="rgeom interventions --model results/model/base \\\n"
    "    --directions results/base/step-000000/directions.parquet \\\n"
    "    --carriers results/base/step-000000/carriers.parquet \\\n"
    "    --activations results/base/step-000000/activations.parquet \\\n"
    "    --val-harmful results/data/val_harmful.parquet \\\n"
    "    --val-harmless results/data/val_harmless.parquet \\\n"
    "    --generate-set results/data/harmbench.parquet \\\n"
    "    --utility-set results/data/utility.parquet \\\n"
    "    --out results/base/step-000000/interventions.parquet",
    args=(
        arg("--model", required=True),
        arg("--directions", required=True),
        arg("--carriers", required=True),
        arg("--activations", required=True, help="for the rank-k subspace"),
        arg("--val-harmful", required=True),
        arg("--val-harmless", required=True),
        arg("--generate-set", required=True, help="harmful prompts to generate on"),
        arg("--utility-set", required=True, help="prompts with checkable answers"),
        arg("--out", required=True),
    ),
)


def run(  # noqa: PLR0913 (one keyword per CLI flag: argparse's dests)
    model: str,
    directions: str,
    carriers: str,
    activations: str,
    val_harmful: str,
    val_harmless: str,
    generate_set: str,
    utility_set: str,
    out: str,
    params: dict[str, Any],
) -> None:
    from rgeom.causal import InterventionInputs, interventions_table

    seed_stage(params)
    source = read_meta(directions)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    interventions_table(
        model=lm,
        tokenizer=tokenizer,
        inputs=InterventionInputs(
            directions=directions,
            carriers=carriers,
            activations=activations,
            val_harmful=val_harmful,
            val_harmless=val_harmless,
            generate_prompts=generate_set,
            utility_prompts=utility_set,
        ),
        out=out,
        params=params,
        meta=stage_meta(params, model=model, **cell_fields(params, source)),
    )
