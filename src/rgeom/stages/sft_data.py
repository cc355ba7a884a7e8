"""``rgeom sft-data``: the supervised training set."""

from __future__ import annotations

from typing import Any

from rgeom.config import setting
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Build the supervised training set: refusals for harmful prompts, "
    "the base model's own answers for harmless ones.",
    example="rgeom sft-data --model results/model/base --harmful h.parquet --harmless b.parquet"
    " \\\n    --out sft.parquet",
    args=(
        arg("--model", required=True),
        arg("--harmful", required=True),
        arg("--harmless", required=True),
        arg("--out", required=True),
    ),
)


def run(model: str, harmful: str, harmless: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.train.data import build_sft_data

    seed_stage(params)
    lm = tokenizer = None
    # The reference's utility data are the set's own answers: no model to load.
    if setting(params, "train.utility_source") == "self_distill":
        lm, tokenizer = load_model_and_tokenizer(model, params)
    build_sft_data(
        model=lm,
        tokenizer=tokenizer,
        harmful=harmful,
        harmless=harmless,
        out=out,
        params=params,
        meta=stage_meta(params, model=model),
    )
