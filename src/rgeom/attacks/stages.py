"""The ``rgeom attack``, ``rgeom test-cases``, ``rgeom adaptive-gcg``, ``rgeom adaptive-autodan``
and ``rgeom adaptive-judge`` stages (thin glue).

The logic lives in :mod:`rgeom.attacks.testcases`; these functions unpack ``--params``,
seed, load the model when one is needed and assemble provenance, like :mod:`rgeom.stages`.
"""

from __future__ import annotations

from typing import Any

from rgeom.stages import _load, _meta, seed_everything


def attack(
    method: str,
    behaviors: str,
    out: str,
    model: str | None,
    templates: str | None,
    targets: str | None,
    params: dict[str, Any],
) -> None:
    from rgeom.attacks.testcases import MODEL_METHODS, build_method

    seed = int(params.get("seed", 0))
    seed_everything(seed)
    section = params.get("attacks", {})
    source = section.get("source_model") or model or "none"
    lm = tokenizer = None
    if method in MODEL_METHODS and model:
        lm, tokenizer = _load(model, params)
    build_method(
        method=method,
        behaviours_path=behaviors,
        out=out,
        params=section,
        seed=seed,
        source_model=str(source),
        meta=_meta(params, model=model),
        model=lm,
        tokenizer=tokenizer,
        templates=templates,
        targets=targets,
    )


def test_cases(cases: list[str], behaviors: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.attacks.testcases import combine_test_cases

    combine_test_cases(parts=cases, behaviours_path=behaviors, out=out, meta=_meta(params))


def adaptive_gcg(
    model: str, behaviors: str, out: str, targets: str | None, params: dict[str, Any]
) -> None:
    from rgeom.attacks.testcases import adaptive_gcg_cell

    seed = int(params.get("seed", 0))
    seed_everything(seed)
    lm, tokenizer = _load(model, params)
    arm, step = params.get("arm", "base"), int(params.get("step", 0))
    adaptive_gcg_cell(
        model=lm,
        tokenizer=tokenizer,
        behaviours_path=behaviors,
        out=out,
        params=params.get("attacks", {}).get("adaptive", {}),
        generate=params.get("generate", {}),
        seed=seed,
        arm=arm,
        step=step,
        meta=_meta(params, model=model, arm=arm, step=step),
        targets=targets,
    )


def adaptive_autodan(
    model: str,
    behaviors: str,
    out: str,
    targets: str | None,
    templates: str | None,
    params: dict[str, Any],
) -> None:
    from rgeom.attacks.testcases import adaptive_autodan_cell

    seed = int(params.get("seed", 0))
    seed_everything(seed)
    lm, tokenizer = _load(model, params)
    arm, step = params.get("arm", "base"), int(params.get("step", 0))
    attacks = params.get("attacks", {})
    adaptive_autodan_cell(
        model=lm,
        tokenizer=tokenizer,
        behaviours_path=behaviors,
        out=out,
        params=attacks.get("adaptive", {}),
        autodan=attacks.get("autodan", {}),
        generate=params.get("generate", {}),
        seed=seed,
        arm=arm,
        step=step,
        meta=_meta(params, model=model, arm=arm, step=step),
        targets=targets,
        prototypes=templates,
    )


def adaptive_judge(
    completions: str,
    out: str,
    metrics: str,
    params: dict[str, Any],
    prompts: str | None = None,
) -> None:
    from rgeom.attacks.testcases import ADAPTIVE_BENCHMARK, judge_adaptive
    from rgeom.io import read_meta

    seed = int(params.get("seed", 0))
    seed_everything(seed)
    source = read_meta(completions)
    judge_adaptive(
        completions=completions,
        out=out,
        metrics_out=metrics,
        judge=params.get("judge", {}),
        seed=seed,
        meta=_meta(params, model=source.get("model")),
        prompts=prompts,
        # adaptive_gcg or adaptive_autodan, as the attack's own job recorded it.
        benchmark=source.get("benchmark") or ADAPTIVE_BENCHMARK,
    )
