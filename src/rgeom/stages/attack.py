"""``rgeom attack``: one fixed-source attack method's test cases (logic in
:mod:`rgeom.attacks.testcases`)."""

from __future__ import annotations

from typing import Any

from rgeom.errors import RgeomError
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import load_model_and_tokenizer, seed_stage, stage_meta

COMMAND = StageCommand(
    help="Build one fixed-source attack method's test cases (against the source model).",
    example="rgeom attack --method GCG-transfer --behaviors results/data/harmbench.parquet \\\n"
    "    --model results/model/base --out results/attacks/GCG-transfer.parquet \\\n"
    '    --params \'{"attacks": {"gcg": {"n_behaviors": 4, "steps": 5, "search_width": 32}}}\'',
    args=(
        arg("--method", required=True, help="DirectRequest, Templates, GCG-transfer or AutoDAN"),
        arg("--behaviors", required=True, help="behaviour set (prompt Parquet)"),
        arg("--out", required=True, help="output test-case Parquet"),
        arg("--model", default=None, help="source model dir (GCG-transfer, AutoDAN)"),
        arg(
            "--templates",
            default=None,
            help="templates JSONL, or AutoDAN prototypes (default: ours)",
        ),
        arg("--targets", default=None, help="HarmBench targets JSON"),
    ),
)


def parse_chunk(value) -> tuple[int, int] | None:
    """``--params``' ``chunk`` ([k, n]: the k-th of n jobs) as a checked pair."""
    if value is None:
        return None
    try:
        k, n = (int(v) for v in value)
    except (TypeError, ValueError):
        raise RgeomError(f"params chunk must be [k, n], got {value!r}") from None
    if not 0 <= k < n:
        raise RgeomError(f"params chunk [k, n] needs 0 <= k < n, got {value!r}")
    return k, n


def run(
    method: str,
    behaviors: str,
    out: str,
    model: str | None,
    templates: str | None,
    targets: str | None,
    params: dict[str, Any],
) -> None:
    from rgeom.attacks.testcases import MODEL_METHODS, MethodJob, build_method

    seed = seed_stage(params)
    section = params.get("attacks", {})
    source = section.get("source_model") or model or "none"
    lm = tokenizer = None
    if method in MODEL_METHODS and model:
        lm, tokenizer = load_model_and_tokenizer(model, params)
    job = MethodJob(
        method=method,
        behaviours_path=behaviors,
        out=out,
        params=section,
        seed=seed,
        source_model=str(source),
        meta=stage_meta(params, model=model),
        templates=templates,
        targets=targets,
        chunk=parse_chunk(params.get("chunk")),
    )
    build_method(job, model=lm, tokenizer=tokenizer)
