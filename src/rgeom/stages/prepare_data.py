"""``rgeom prepare-data``: one prompt set from its upstream format into rgeom's schema."""

from __future__ import annotations

from typing import Any

from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import seed_stage, stage_meta

COMMAND = StageCommand(
    help="Read one prompt set from its upstream format into rgeom's prompt schema.",
    example="rgeom prepare-data --name xstest --out results/data/xstest.parquet \\\n"
    '    --params \'{"spec": {"format": "xstest_csv", '
    '"path": "xstest/xstest_prompts.csv"}}\'',
    args=(
        arg("--name", required=True, help="set name (key of data.sets)"),
        arg("--out", required=True, help="output Parquet file"),
        arg("--tokenizer", default=None, help="model dir whose tokenizer checks lengths"),
    ),
)


def run(name: str, out: str, tokenizer: str | None, params: dict[str, Any]) -> None:
    """``params`` holds the set's ``spec`` and the ``data`` keys ``shared_dir`` and
    ``max_prompt_tokens`` at its top level."""
    from rgeom.data import prepare_set

    seed = seed_stage(params)
    if not isinstance(params.get("spec"), dict):
        raise RgeomError(f"--params: key 'spec' (the dataset spec of set {name!r}) is required")
    tok = None
    if tokenizer:
        from rgeom.models import load_plain_tokenizer, load_tokenizer

        # Only token counts are needed: tokenizer.json read directly spares the job
        # importing torch and transformers where that gives transformers' ids.
        tok = load_plain_tokenizer(tokenizer) or load_tokenizer(tokenizer)
    prepare_set(
        name=name,
        spec=params["spec"],
        shared_dir=params.get("shared_dir", schema_default("data.shared_dir")),
        seed=seed,
        out=out,
        meta=stage_meta(params, dataset=name),
        tokenizer=tok,
        max_prompt_tokens=params.get("max_prompt_tokens", schema_default("data.max_prompt_tokens")),
    )
