"""The ``rgeom attack``, ``rgeom test-cases``, ``rgeom adaptive-gcg``, ``rgeom adaptive-autodan``,
``rgeom adaptive-generate``, ``rgeom adaptive-judge`` and ``rgeom adaptive-metrics`` stages
(thin glue).

The logic lives in :mod:`rgeom.attacks.testcases`; these functions unpack ``--params``,
seed, load the model when one is needed and assemble provenance, like :mod:`rgeom.stages`.
"""

from __future__ import annotations

from typing import Any

from rgeom.errors import RgeomError
from rgeom.layout import BASE
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
    chunk = params.get("chunk")
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
        chunk=_chunk(chunk),
    )


def _chunk(value) -> tuple[int, int] | None:
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


def attack_merge(
    method: str, parts: list[str], behaviors: str, out: str, params: dict[str, Any]
) -> None:
    """Merge the chunk files of one method (``rgeom attack`` with ``chunk`` [k, n] in
    ``--params``, one SLURM job each) into the table one unchunked job writes: rows in the
    behaviour file's order, provenance of the unchunked parameters. Every chunk 0..n-1 must
    be there exactly once, and no behaviour twice."""
    import pyarrow as pa

    from rgeom.attacks.testcases import TEST_CASE_SCHEMA, read_behaviours
    from rgeom.io import read_meta, read_table, write_table

    order = {b["prompt_id"]: i for i, b in enumerate(read_behaviours(behaviors))}
    seen: dict[int, str] = {}
    sizes = set()
    tables, owner = [], {}
    for part in parts:
        meta = read_meta(part)
        if meta.get("method") != method or "chunk" not in meta:
            raise RgeomError(f"{part}: not a {method} chunk (no chunk in its provenance)")
        k, n = _chunk(meta["chunk"])
        if k in seen:
            raise RgeomError(f"{part}: chunk {k} of {n} is also {seen[k]}")
        seen[k] = part
        sizes.add(n)
        table = read_table(part)
        for i, bid in enumerate(table.column("behavior_id").to_pylist()):
            if bid not in order:
                raise RgeomError(f"{part}: row {i}: behaviour {bid!r} is not in {behaviors}")
            if bid in owner:
                raise RgeomError(f"{part}: row {i}: behaviour {bid!r} is also in {owner[bid]}")
            owner[bid] = part
        tables.append(table)
    if len(sizes) != 1 or set(seen) != set(range(next(iter(sizes)))):
        raise RgeomError(
            f"{method} chunks {sorted(seen)} of {sorted(sizes)} are not one complete set 0..n-1"
        )
    merged = pa.concat_tables(tables) if tables else TEST_CASE_SCHEMA.empty_table()
    rank = [order[b] for b in merged.column("behavior_id").to_pylist()]
    merged = merged.take(sorted(range(len(rank)), key=rank.__getitem__))
    first = read_meta(parts[0])
    record = {
        **{k: v for k, v in first.items() if k not in ("chunk", "config_hash", "num_rows")},
        **_meta(params, model=first.get("model")),
        "method": method,
        "parts": list(parts),
    }
    write_table(out, merged, TEST_CASE_SCHEMA, record)


def test_cases(cases: list[str], behaviors: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.attacks.testcases import combine_test_cases

    combine_test_cases(parts=cases, behaviours_path=behaviors, out=out, meta=_meta(params))


def adaptive_gcg(
    model: str, behaviors: str, out: str, targets: str | None, params: dict[str, Any]
) -> None:
    from rgeom.attacks.testcases import adaptive_gcg_search

    seed = int(params.get("seed", 0))
    seed_everything(seed)
    lm, tokenizer = _load(model, params)
    arm, step = params.get("arm", BASE), int(params.get("step", 0))
    adaptive_gcg_search(
        model=lm,
        tokenizer=tokenizer,
        behaviours_path=behaviors,
        out=out,
        params=params.get("attacks", {}).get("adaptive", {}),
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
    from rgeom.attacks.testcases import adaptive_autodan_search

    seed = int(params.get("seed", 0))
    seed_everything(seed)
    lm, tokenizer = _load(model, params)
    arm, step = params.get("arm", BASE), int(params.get("step", 0))
    attacks = params.get("attacks", {})
    adaptive_autodan_search(
        model=lm,
        tokenizer=tokenizer,
        behaviours_path=behaviors,
        out=out,
        params=attacks.get("adaptive", {}),
        autodan=attacks.get("autodan", {}),
        seed=seed,
        arm=arm,
        step=step,
        meta=_meta(params, model=model, arm=arm, step=step),
        targets=targets,
        prototypes=templates,
    )


def adaptive_generate(model: str, cases: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.attacks.testcases import adaptive_completions

    seed_everything(int(params.get("seed", 0)))
    lm, tokenizer = _load(model, params)
    adaptive_completions(
        model=lm,
        tokenizer=tokenizer,
        cases=cases,
        out=out,
        generate=params.get("generate", {}),
        meta=_meta(params, model=model),
    )


def adaptive_judge(
    completions: str,
    out: str,
    metrics: str | None,
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


def adaptive_metrics(labels: list[str], out: list[str], params: dict[str, Any]) -> None:
    """Each judged adaptive attack's ASR with its bootstrap CI, ``labels[i]`` -> ``out[i]``."""
    from rgeom.attacks.testcases import adaptive_metrics_table
    from rgeom.judges import bootstrap_count

    if len(labels) != len(out):
        raise RgeomError(f"--labels names {len(labels)} files but --out {len(out)}")
    n_boot = bootstrap_count(params.get("judge", {}))
    for src, dst in zip(labels, out, strict=True):
        adaptive_metrics_table(src, dst, n_boot, int(params.get("seed", 0)), _meta(params))
