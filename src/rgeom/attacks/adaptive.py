"""Adaptive attacks: GCG and AutoDAN re-optimised against each checkpoint itself.

A fixed-source suffix says little about a model that was trained against GCG (R2D2), so
on a small seeded subset of behaviours the search runs against every checkpoint. Each
attack is three jobs, so that each setting reruns only what it changes: the search
(:func:`adaptive_gcg_search`, :func:`adaptive_autodan_search`), the completions
(:func:`adaptive_completions`), then the judge (:mod:`rgeom.attacks.judging`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom.attacks.behaviours import (
    load_gcg_targets,
    read_behaviours,
    select_behaviours,
    target_for,
)
from rgeom.attacks.fingerprints import resume_fingerprint
from rgeom.attacks.optimised import AttackJob, GCGRunner, autodan_cases
from rgeom.config import schema_default, section_with_defaults
from rgeom.errors import RgeomError
from rgeom.io import keyed_shards, read_meta, read_table, write_table
from rgeom.models import encode_chat
from rgeom.schemas import ADAPTIVE_CASES_SCHEMA, ADAPTIVE_COMPLETION_SCHEMA, ADAPTIVE_SHARD_SCHEMA

log = logging.getLogger(__name__)

ADAPTIVE_BENCHMARK = "adaptive_gcg"
ADAPTIVE_AUTODAN_BENCHMARK = "adaptive_autodan"
ADAPTIVE_METHODS = {"gcg": ADAPTIVE_BENCHMARK, "autodan": ADAPTIVE_AUTODAN_BENCHMARK}


@dataclass(frozen=True)
class AdaptiveJob:
    """One adaptive search against one checkpoint: what it attacks and where it writes.

    ``behaviours_path`` is the behaviour set (a seeded subset is attacked), ``targets`` the
    HarmBench targets JSON (None: the behaviours' own); ``params`` is ``attacks.adaptive``
    and ``seed`` the run's. ``arm`` and ``step`` name the attacked checkpoint in every row;
    the results go to ``out`` (each behaviour a resumable shard) with ``meta`` as provenance.
    """

    behaviours_path: str
    out: str
    params: Mapping[str, Any]
    seed: int
    arm: str
    step: int
    meta: Mapping[str, Any]
    targets: str | None = None


def _cases_table(arm: str, step: int, found: Mapping[str, Sequence[Any]]) -> pa.Table:
    """ADAPTIVE_CASES_SCHEMA: one checkpoint's search results, columns ``behavior_id`` to
    ``prompt_ids`` in ``found``."""
    n = len(found["behavior_id"])
    return pa.table({"arm": [arm] * n, "step": [step] * n, **found}, schema=ADAPTIVE_CASES_SCHEMA)


def _n_behaviors(params: Mapping[str, Any]) -> int:
    """``attacks.adaptive.n_behaviors``, the schema's default where ``params`` lacks it."""
    return params.get("n_behaviors", schema_default("attacks.adaptive.n_behaviors"))


def _gcg_shard(attack: GCGRunner, behaviour: Mapping[str, Any], target: str) -> pa.Table:
    """GCG on one behaviour as its ADAPTIVE_SHARD_SCHEMA row, the exact ids kept."""
    r = attack(behaviour, target)
    log.info("adaptive GCG %s: loss %.3f -> %.3f", behaviour["prompt_id"], r.initial_loss, r.loss)
    row = {
        "behavior_id": behaviour["prompt_id"],
        "suffix": r.suffix_text,
        "test_case": r.user_text,
        "loss": r.loss,
        "initial_loss": r.initial_loss,
        "prompt_ids": r.prompt_ids,
    }
    return pa.Table.from_pylist([row], schema=ADAPTIVE_SHARD_SCHEMA)


def adaptive_gcg_search(model, tokenizer, job: AdaptiveJob) -> pa.Table:
    """GCG against this checkpoint on a seeded subset of behaviours: the suffixes.

    ``job.params`` is ``attacks.adaptive``. The subset depends only on the seed, so every anchor
    is attacked on the same behaviours. Writes ADAPTIVE_CASES_SCHEMA with the exact token ids
    GCG optimised; :func:`adaptive_completions` generates from them (no text round trip).
    Generation settings are not an input: a new ``generate.max_new_tokens`` reruns the
    completions, never the search.

    Each behaviour's GCG result is one shard of ``job.out`` (as for GCG-transfer), so a
    killed job resumes at the behaviour it was attacking.
    """
    where = "attacks.adaptive"
    behaviours = read_behaviours(job.behaviours_path)
    chosen = select_behaviours(behaviours, _n_behaviors(job.params), job.seed)
    if not chosen:
        raise RgeomError(f"{job.behaviours_path}: no harmful behaviours for {where}")
    by_id = load_gcg_targets(job.targets)
    tgts = [target_for(b, by_id, where) for b in chosen]
    attack = GCGRunner(model, tokenizer, job.params, job.seed, section="attacks.adaptive")

    def one(index: int) -> tuple[pa.Table, None]:
        return _gcg_shard(attack, chosen[index], tgts[index]), None

    fingerprint = resume_fingerprint(
        "adaptive_gcg",
        job.behaviours_path,
        job.params,
        job.seed,
        job.meta,
        arm=job.arm,
        step=job.step,
        targets=tgts,
    )
    parts, _, shards = keyed_shards(
        job.out,
        fingerprint,
        [b["prompt_id"] for b in chosen],
        ADAPTIVE_SHARD_SCHEMA,
        one,
        job.meta,
        desc="adaptive GCG behaviours",
    )
    results = pa.concat_tables(parts).to_pydict()
    found = {
        "behavior_id": [b["prompt_id"] for b in chosen],
        "category": [b["category"] for b in chosen],
        "target": tgts,
        **{k: results[k] for k in ("suffix", "test_case", "loss", "initial_loss", "prompt_ids")},
    }
    table = _cases_table(job.arm, job.step, found)
    record = {**job.meta, "benchmark": ADAPTIVE_BENCHMARK, "targets": job.targets}
    write_table(job.out, table, ADAPTIVE_CASES_SCHEMA, record)
    shards.finish()
    return table


def adaptive_autodan_search(
    model,
    tokenizer,
    job: AdaptiveJob,
    autodan: Mapping[str, Any],
    prototypes: str | None = None,
) -> pa.Table:
    """AutoDAN against this checkpoint on the adaptive subset: the evolved jailbreaks.

    The paper reports that step 50 "remains closed under both adaptive GCG and AutoDAN":
    this is the AutoDAN half, evolved against the checkpoint itself rather than replayed
    from the source model. ``job.params`` is ``attacks.adaptive`` (its ``n_behaviors`` picks the
    same seeded subset as adaptive GCG); ``autodan`` is ``attacks.autodan`` (population,
    generations, ...). ``suffix`` holds the evolved template, ``test_case`` the user
    message. The search's early stop generates ``attacks.autodan.early_stop_tokens`` tokens
    of its own, so ``generate.max_new_tokens`` (the completions :func:`adaptive_completions`
    writes) is no input here. Writes ADAPTIVE_CASES_SCHEMA, each behaviour one resumable
    shard, as for AutoDAN.
    """
    where = "attacks.adaptive (autodan)"
    behaviours = read_behaviours(job.behaviours_path)
    section = {**autodan, "n_behaviors": _n_behaviors(job.params)}
    fingerprint = resume_fingerprint(
        "adaptive_autodan",
        job.behaviours_path,
        section,
        job.seed,
        job.meta,
        arm=job.arm,
        step=job.step,
    )
    attack = AttackJob(
        behaviours=behaviours,
        targets=load_gcg_targets(job.targets),
        params=section,
        seed=job.seed,
        source_model=str(job.meta.get("model") or "checkpoint"),
        out=job.out,
        fingerprint=fingerprint,
        meta=job.meta,
    )
    cases, record, shards = autodan_cases(
        model, tokenizer, attack, prototypes=prototypes, where=where
    )
    history = record["behaviours"]
    found = {
        "behavior_id": [c["behavior_id"] for c in cases],
        "category": [c["category"] for c in cases],
        "target": [c["target"] for c in cases],
        "suffix": [history[c["behavior_id"]]["template"] for c in cases],
        "test_case": [c["test_case"] for c in cases],
        "loss": [c["loss"] for c in cases],
        "initial_loss": [c["initial_loss"] for c in cases],
        "prompt_ids": [None] * len(cases),
    }
    table = _cases_table(job.arm, job.step, found)
    record = {
        **job.meta,
        "benchmark": ADAPTIVE_AUTODAN_BENCHMARK,
        "targets": job.targets,
        "autodan": record,
    }
    write_table(job.out, table, ADAPTIVE_CASES_SCHEMA, record)
    shards.finish()
    return table


def adaptive_completions(
    model,
    tokenizer,
    cases: str,
    out: str,
    generate: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> pa.Table:
    """Greedy completions of an adaptive search's test cases (ADAPTIVE_CASES_SCHEMA):
    from GCG's exact ids where the search kept them, else from the test case through the
    chat template. Writes ADAPTIVE_COMPLETION_SCHEMA; the provenance is the search's (its
    benchmark, targets, AutoDAN history) with this stage's laid over it."""
    # Imported here: generation imports torch, which the model-free attack stages never need.
    from rgeom.generation import generate_from_ids

    if not Path(cases).exists():
        raise RgeomError(f"missing file: {cases}")
    table = read_table(cases, ADAPTIVE_CASES_SCHEMA)
    ids = table.column("prompt_ids").to_pylist()
    texts = table.column("test_case").to_pylist()
    encoded = [
        i if i is not None else encode_chat(tokenizer, t).ids
        for i, t in zip(ids, texts, strict=True)
    ]
    generate = section_with_defaults("generate", generate)
    completions, _, _ = generate_from_ids(
        model,
        tokenizer,
        encoded,
        batch_size=int(generate["batch_size"]),
        max_new_tokens=int(generate["max_new_tokens"]),
    )
    found = table.select([n for n in ADAPTIVE_COMPLETION_SCHEMA.names if n != "completion"])
    done = found.append_column(
        ADAPTIVE_COMPLETION_SCHEMA.field("completion"), pa.array(completions, pa.string())
    )
    source = {k: v for k, v in (read_meta(cases) or {}).items() if k != "num_rows"}
    record = {**source, **meta, "cases": str(cases)}
    write_table(out, done, ADAPTIVE_COMPLETION_SCHEMA, record)
    return done
