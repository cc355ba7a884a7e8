"""The judge and metrics stages: label a generation table, then its metrics from the labels.

The metrics are a job of their own (:func:`metrics_table`), reading only the labels and
their metadata, so a new bootstrap count never reruns a judge model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom.config import section_with_defaults
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.judges import harmfulness
from rgeom.judges.aggregate import compute_metrics
from rgeom.judges.labels import label_completions
from rgeom.judges.refusal import JUDGE_VERSION
from rgeom.judges.validation import builtin_error_rates
from rgeom.schemas import LABEL_SCHEMA, METRIC_SCHEMA

BUILTIN_RATES_SOURCE = "builtin:rgeom (test split)"


def judge_table(
    generations: str,
    labels_out: str,
    metrics_out: str | None,
    params: dict[str, Any],
    seed: int,
    meta: dict[str, Any],
    prompts: str | None = None,
    loader=None,
) -> None:
    """Label every completion in ``generations``; write the labels and, with
    ``metrics_out``, the metrics table (:func:`metrics_table` on the labels).

    The embedded matcher labels every row; model judges switched on in ``params``
    (``harmbench``, ``xstest``, ``strongreject``) then add their labels. ``prompts`` (the
    prompt set) supplies the original behaviour and context the HarmBench classifier and
    the rubric judge read; without it the generation's own prompt is used.

    The workflow passes no ``metrics_out``: ``judge.bootstrap`` only sizes the intervals,
    so the metrics are a job of their own and a new bootstrap count never reruns a judge
    model. Everything the metrics need besides the labels (the copyright behaviours the
    loader left out, the judges' error rates) goes into the labels' metadata.
    """
    params = section_with_defaults("judge", params)
    name = params["name"]
    # Checked before any judge model runs, not after.
    n_boot = bootstrap_count(params) if metrics_out is not None else None
    if not Path(generations).exists():
        raise RgeomError(f"missing file: {generations}")
    table = read_table(generations)
    labels, judges = label_completions(table, generations, params, prompts, loader)
    extra_meta: dict[str, Any] = {}
    if judges:
        extra_meta["model_judges"] = {k: v.get("path") for k, v in judges.items()}
    left_out = copyright_left_out(prompts)
    if left_out:
        extra_meta["copyright_left_out"] = left_out
    extra_meta["judge_error_rates"] = _error_rates(name, params, generations)
    judge_meta = {
        **meta,
        **extra_meta,
        "judge": "+".join([name, *_judges_used(params, judges)]),
        "judge_version": JUDGE_VERSION,
        "judge_kind": "string/feature matcher"
        + (" + model judges" if judges else " (not a model judge)"),
        "source": str(generations),
    }
    write_table(labels_out, labels, LABEL_SCHEMA, judge_meta)
    if n_boot is not None:
        metrics_table(labels_out, metrics_out, n_boot, seed, {})


def _error_rates(name: str, params: dict[str, Any], generations: str) -> dict[str, Any]:
    """The built-in error rates of the ASR judges and of XSTest's any-refusal, with their
    source, for the labels' metadata."""
    # A judge's error rates depend on how much of each answer it sees: measured on the
    # labelled test responses cut to the generation length these completions were cut at.
    cut_at = (read_meta(generations) or {}).get("max_new_tokens")
    asr_judges = [name] + [harmfulness.JUDGE_NAME] * (params["harmbench"] == harmfulness.JUDGE_NAME)
    rates = {k: builtin_error_rates(k, cut_at) for k in asr_judges}
    rates["any_refusal"] = builtin_error_rates("any_refusal")
    source = BUILTIN_RATES_SOURCE + (f", cut at {cut_at} new tokens" if cut_at else "")
    return {"source": source, **rates}


def bootstrap_count(params: dict[str, Any]) -> int:
    """``judge.bootstrap`` from a judge section, checked (the schema default when absent)."""
    n_boot = section_with_defaults("judge", params)["bootstrap"]
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise RgeomError(f"judge.bootstrap must be an integer >= 0, got {n_boot!r}")
    return n_boot


def metrics_table(
    labels: str, out: str, bootstrap: int, seed: int, meta: dict[str, Any]
) -> pa.Table:
    """The metrics table (METRIC_SCHEMA, bootstrap CIs) of a labels table the judge wrote.

    Reads only the labels and their metadata (the copyright behaviours the prompt set's
    loader left out, the judges' error rates for the corrected rates), so the same labels
    give the same table whichever job computes it. ``meta`` (this stage's provenance) is
    laid over the labels' own.
    """
    bootstrap = bootstrap_count({"bootstrap": bootstrap})
    if not Path(labels).exists():
        raise RgeomError(f"missing file: {labels}")
    table = read_table(labels, LABEL_SCHEMA)
    source = read_meta(labels) or {}
    rates = {
        k: v
        for k, v in (source.get("judge_error_rates") or {}).items()
        if k != "source" and isinstance(v, dict)
    }
    try:
        left_out = int(source.get("copyright_left_out") or 0)
    except (TypeError, ValueError):
        raise RgeomError(
            f"{labels}: metadata copyright_left_out must be an integer, "
            f"got {source.get('copyright_left_out')!r}"
        ) from None
    metrics = compute_metrics(
        table, bootstrap, seed, copyright_left_out=left_out, error_rates=rates
    )
    record = {**source, **meta, "bootstrap": bootstrap, "labels": str(labels)}
    write_table(out, metrics, METRIC_SCHEMA, record)
    return metrics


def copyright_left_out(prompts: str | None) -> int:
    """How many copyright behaviours the prompt set's loader left out (HarmBench's CSV with
    ``copyright: false``), as its provenance records; 0 without a prompt set."""
    if not prompts or not Path(prompts).exists():
        return 0
    return int(read_meta(prompts).get("dataset_copyright_left_out") or 0)


def _judges_used(params: dict[str, Any], model: dict[str, Any]) -> list[str]:
    extra = [harmfulness.JUDGE_NAME] if params["harmbench"] == harmfulness.JUDGE_NAME else []
    return [*extra, *model]
