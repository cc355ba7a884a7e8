"""Judging adaptive attacks: success labels of the completions, then the ASR per checkpoint.

The labels come from the judge stage's own path (:func:`rgeom.judges.label_completions`),
the metrics from its :func:`~rgeom.judges.compute_metrics`, so an adaptive attack's
``{benchmark}.asr`` means what every benchmark's ASR means.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom.attacks.adaptive import ADAPTIVE_BENCHMARK
from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.judges import (
    METRIC_SCHEMA,
    attack_success,
    bootstrap_count,
    compute_metrics,
    label_completions,
)
from rgeom.schemas import ADAPTIVE_COMPLETION_SCHEMA, ADAPTIVE_SCHEMA

log = logging.getLogger(__name__)

ADAPTIVE_METRICS = ("asr", "n_classifier_invalid", "n_copyright_excluded")


def _one_checkpoint(table: pa.Table, path: str) -> tuple[str, int]:
    """The (arm, step) every row of an adaptive table belongs to."""
    steps = set(table.column("step").to_pylist())
    arms = set(table.column("arm").to_pylist())
    if len(steps) != 1 or len(arms) != 1:
        raise RgeomError(f"{path}: expected one (arm, step), got {arms} x {steps}")
    return arms.pop(), int(steps.pop())


def judge_adaptive(
    completions: str,
    out: str,
    metrics_out: str | None,
    judge: Mapping[str, Any],
    seed: int,
    meta: Mapping[str, Any],
    prompts: str | None = None,
    loader=None,
) -> pa.Table:
    """Label adaptive-attack completions with the configured judge; write ADAPTIVE_SCHEMA
    and, with ``metrics_out``, the ASR (:func:`adaptive_metrics_table`).

    The benchmark (``adaptive_gcg`` or ``adaptive_autodan``) is the one the attack's own job
    recorded in the completions' metadata; ``adaptive_gcg`` where none is recorded.

    The labels come from :func:`rgeom.judges.label_completions`, the judge stage's own path:
    with ``judge.harmbench: harmbench_classifier`` the classifier decides success (reading
    the original behaviour and context from ``prompts``), else the embedded matcher. The
    workflow computes the metrics in a job of its own, so ``judge.bootstrap`` never reruns
    a judge model.
    """
    n_boot = bootstrap_count(dict(judge)) if metrics_out is not None else None
    if not Path(completions).exists():
        raise RgeomError(f"missing file: {completions}")
    table = read_table(completions, ADAPTIVE_COMPLETION_SCHEMA)
    benchmark = (read_meta(completions) or {}).get("benchmark") or ADAPTIVE_BENCHMARK
    arm, step = _one_checkpoint(table, completions)
    generations = as_generations(table, benchmark)
    labels, judges = label_completions(generations, completions, dict(judge), prompts, loader)
    success = [bool(s) for s in attack_success(labels)]
    cols = labels.to_pydict()
    labelled = table.select(ADAPTIVE_COMPLETION_SCHEMA.names)
    for field, values in (
        ("judge", cols["judge"]),
        ("refusal", cols["refusal"]),
        ("refused", cols["refused"]),
        ("degenerate", cols["degenerate"]),
        # A copyright behaviour the classifier leaves out counts as no success here and is
        # left out of the ASR.
        ("success", success),
        ("verdict", cols["verdict"]),
        ("excluded", cols["excluded"]),
    ):
        field = ADAPTIVE_SCHEMA.field(field)
        labelled = labelled.append_column(field, pa.array(values, field.type))
    name = "+".join([judge.get("name", schema_default("judge.name")), *judges])
    record = {**meta, "arm": arm, "step": step, "benchmark": benchmark, "judge": name}
    record["source"] = str(completions)
    write_table(out, labelled, ADAPTIVE_SCHEMA, record)
    if n_boot is not None:
        adaptive_metrics_table(out, metrics_out, n_boot, seed, {})
    return labelled


def as_generations(table: pa.Table, benchmark: str) -> pa.Table:
    """Adaptive completions (ADAPTIVE_COMPLETION_SCHEMA) as the generation columns a judge
    reads: each behaviour a harmful prompt whose test case is the prompt."""
    n = table.num_rows
    return pa.table(
        {
            "prompt_id": table.column("behavior_id"),
            "label": ["harmful"] * n,
            "category": table.column("category"),
            "prompt": table.column("test_case"),
            "target": table.column("target"),
            "completion": table.column("completion"),
            "arm": table.column("arm"),
            "step": table.column("step"),
            "benchmark": [benchmark] * n,
        }
    )


def _as_labels(table: pa.Table, benchmark: str) -> pa.Table:
    """Judged adaptive completions (ADAPTIVE_SCHEMA) as the label columns compute_metrics
    reads, as the judge's label table has them."""
    n = table.num_rows
    return pa.table(
        {
            "prompt_id": table.column("behavior_id"),
            "label": ["harmful"] * n,
            "category": table.column("category"),
            "judge": table.column("judge"),
            "refusal": table.column("refusal"),
            "refused": table.column("refused"),
            "degenerate": table.column("degenerate"),
            "verdict": table.column("verdict"),
            "excluded": table.column("excluded"),
            "arm": table.column("arm"),
            "step": table.column("step"),
            "benchmark": [benchmark] * n,
            "has_target": [False] * n,
            "correct": pa.nulls(n, pa.bool_()),
        }
    )


def adaptive_metrics_table(
    labelled: str, out: str, bootstrap: int, seed: int, meta: Mapping[str, Any]
) -> pa.Table:
    """The ASR of judged adaptive-attack completions (ADAPTIVE_SCHEMA) as a metrics table.

    The judges' METRIC_SCHEMA (``benchmark``, metric ``asr`` and, with the classifier, its
    ``n_`` counts), so the summary shows ``{benchmark}.asr`` like any benchmark metric. One
    test case per behaviour: the per-behaviour mean is the success. The labels' metadata
    (benchmark, judge) carries over; ``meta`` is laid over it.
    """
    bootstrap = bootstrap_count({"bootstrap": bootstrap})
    if not Path(labelled).exists():
        raise RgeomError(f"missing file: {labelled}")
    table = read_table(labelled, ADAPTIVE_SCHEMA)
    source = {k: v for k, v in (read_meta(labelled) or {}).items() if k != "num_rows"}
    benchmark = source.get("benchmark") or ADAPTIVE_BENCHMARK
    metrics = compute_metrics(_as_labels(table, benchmark), bootstrap, seed)
    keep = pa.array([m in ADAPTIVE_METRICS for m in metrics.column("metric").to_pylist()])
    metrics = metrics.filter(keep)
    record = {**source, **meta, "bootstrap": bootstrap, "labels": str(labelled)}
    write_table(out, metrics, METRIC_SCHEMA, record)
    by_metric = dict(zip(*metrics.select(["metric", "value"]).to_pydict().values(), strict=True))
    arm, step = source.get("arm"), source.get("step")
    log.info(
        "%s %s step %s: ASR %s over %d behaviours (%s)",
        benchmark,
        arm,
        step,
        by_metric.get("asr"),
        table.num_rows,
        source.get("judge"),
    )
    return metrics
