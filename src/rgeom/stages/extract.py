"""``rgeom extract``: residual-stream activations at post-instruction positions."""

from __future__ import annotations

from typing import Any

from rgeom.stages import StageCommand, arg, key_value
from rgeom.stages._common import cell_fields, load_model_and_tokenizer, seed_stage, stage_meta
from rgeom.stages.prompt_filter import direction_filter

COMMAND = StageCommand(
    help="Capture residual-stream activations at post-instruction positions to Parquet.",
    example="rgeom extract --model results/model/base --set dir_harmful=h.parquet \\\n"
    "    --set dir_harmless=b.parquet --out acts.parquet",
    args=(
        arg("--model", required=True),
        arg("--set", action="append", type=key_value, required=True, dest="sets"),
        arg("--out", required=True),
    ),
)


def run(model: str, sets: list[tuple[str, str]], out: str, params: dict[str, Any]) -> None:
    from rgeom.activations import extract_activations

    seed_stage(params)
    # Scores are only worth their extra forward where the prompt filter is decided: the
    # workflow asks for them on the source model only.
    scores, _ = direction_filter(params)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    extract_activations(
        model=lm,
        tokenizer=tokenizer,
        sets=dict(sets),
        out=out,
        params=params.get("activations", {}),
        meta=stage_meta(params, model=model, **cell_fields(params)),
        refusal_scores=scores,
    )
