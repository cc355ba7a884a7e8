"""``rgeom generate``: greedy completions for one benchmark cell."""

from __future__ import annotations

from typing import Any

from rgeom.config import setting
from rgeom.errors import RgeomError
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import (
    cell_fields,
    load_model_and_tokenizer,
    model_settings,
    seed_stage,
    stage_meta,
)

GENERATE_BACKENDS = ("hf", "vllm")

COMMAND = StageCommand(
    help="Greedy, batched, left-padded completions for one benchmark cell.",
    example="rgeom generate --model results/model/base --prompts results/data/xstest.parquet \\\n"
    "    --out gen.parquet",
    args=(
        arg("--model", required=True),
        arg("--prompts", required=True),
        arg("--out", required=True),
    ),
)


def run(model: str, prompts: str, out: str, params: dict[str, Any]) -> None:
    seed = seed_stage(params)
    settings = params.get("generate", {})
    backend = setting(params, "generate.backend")
    meta = stage_meta(params, model=model, **cell_fields(params), benchmark=params.get("benchmark"))
    if backend == "vllm":
        # Imported here only: with the default hf backend vLLM is never imported.
        from rgeom.vllm_backend import generate_table as vllm_table

        vllm_table(
            model_dir=model,
            prompts=prompts,
            out=out,
            params=settings,
            model_settings=model_settings(params),
            seed=seed,
            meta=meta,
        )
        return
    if backend != "hf":
        raise RgeomError(
            f"generate.backend {backend!r} is unknown; choose one of {list(GENERATE_BACKENDS)}"
        )
    from rgeom.generation import generate_table

    lm, tokenizer = load_model_and_tokenizer(model, params)
    generate_table(
        model=lm, tokenizer=tokenizer, prompts=prompts, out=out, params=settings, meta=meta
    )
