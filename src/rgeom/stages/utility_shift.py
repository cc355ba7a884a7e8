"""``rgeom utility-shift``: cross-entropy and KL against the base model's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rgeom.stages import StageCommand, arg
from rgeom.stages._common import cell_fields, load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Cross-entropy and KL(base || checkpoint) on the base model's greedy harmless answers.",
    example="rgeom utility-shift --model results/sft/checkpoints/step-000010 \\\n"
    "    --base results/model/base \\\n"
    "    --reference results/base/step-000000/generations/utility.parquet \\\n"
    "    --out results/sft/step-000010/utility_shift.parquet",
    args=(
        arg("--model", required=True, help="checkpoint to measure"),
        arg("--base", required=True, help="the base model"),
        arg("--reference", nargs="+", required=True, help="the base model's generation tables"),
        arg("--out", required=True),
    ),
)


def run(model: str, base: str, reference: list[str], out: str, params: dict[str, Any]) -> None:
    from rgeom.utility_shift import utility_shift_table

    seed = seed_stage(params)
    lm, tokenizer = load_model_and_tokenizer(model, params)
    same = Path(base).resolve() == Path(model).resolve()
    base_lm = lm if same else load_model_and_tokenizer(base, params)[0]
    utility_shift_table(
        model=lm,
        base=base_lm,
        tokenizer=tokenizer,
        references=reference,
        out=out,
        params=params.get("utility_shift", {}),
        seed=seed,
        meta=stage_meta(params, model=model, base=base, **cell_fields(params)),
    )
