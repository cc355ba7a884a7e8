"""The judge-validity table: each judge's agreement on a validation split, beside the
numbers it produced in this run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from rgeom.io import read_meta, read_table
from rgeom.tables_format import Cell, Table, plain_cell

# Which validation task checks which metric, and the metrics each judge produces.
_JUDGED = {"asr": "harmbench", "xstest_any_refusal": "xstest"}
# Embedded judges' error-rate keys (judge metadata) per metric's judge.
_RATE_KEY = {
    ("asr", "refusal_matcher"): "refusal_matcher",
    ("asr", "harmfulness_judge"): "harmfulness_judge",
    ("xstest_any_refusal", "refusal_matcher"): "any_refusal",
}
_NOT_VALIDATED = {
    "validation": "none (raw is the headline)",
    "n": None,
    "accuracy": None,
    "kappa": None,
    "invalid_rate": None,
    "sensitivity": None,
    "specificity": None,
}
_JUDGES_SCHEMA = {
    "benchmark": pl.String,
    "metric": pl.String,
    "judge": pl.String,
    "validation": pl.String,
    "n": pl.Int32,
    "accuracy": pl.Float64,
    "kappa": pl.Float64,
    "invalid_rate": pl.Float64,
    "sensitivity": pl.Float64,
    "specificity": pl.Float64,
    "produced": pl.String,
}
_JUDGES_DISPLAY: list[tuple[str, Cell]] = [
    ("benchmark", plain_cell("benchmark")),
    ("metric", plain_cell("metric")),
    ("judge", plain_cell("judge")),
    ("validated on", plain_cell("validation")),
    ("n", plain_cell("n")),
    ("accuracy", plain_cell("accuracy")),
    ("Cohen's κ", plain_cell("kappa")),
    ("invalid rate", plain_cell("invalid_rate")),
    ("sensitivity", plain_cell("sensitivity")),
    ("specificity", plain_cell("specificity")),
    ("produced (raw→corrected)", plain_cell("produced")),
]
_JUDGES_NOTES = [
    "corrected = Rogan–Gladen (raw + spec − 1)/(sens + spec − 1), clipped to [0, 1], with "
    "the judge's sensitivity/specificity on the validation split; its CI (behaviour "
    "table) bootstraps both the test cases and the validation rows. Judges without "
    "their own validation keep the raw number as the headline.",
    "builtin:rgeom is rgeom's own synthetic labelled set (docs/judges.md): agreement on it "
    "is an upper bound on agreement with people on real model outputs.",
]


def _binary_agreement(c: Mapping[str, int]) -> dict[str, float]:
    n = c["tp"] + c["fn"] + c["tn"] + c["fp"]
    po = (c["tp"] + c["tn"]) / n
    pe = (
        (c["tp"] + c["fn"]) * (c["tp"] + c["fp"]) + (c["tn"] + c["fp"]) * (c["tn"] + c["fn"])
    ) / n**2
    pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    return {
        "n": n,
        "accuracy": po,
        "kappa": 1.0 if pe == 1 else (po - pe) / (1 - pe),
        "sensitivity": c["tp"] / pos if pos else float("nan"),
        "specificity": c["tn"] / neg if neg else float("nan"),
    }


def _error_rates(metric_paths: Sequence[str]) -> tuple[dict[str, dict[str, int]], str | None]:
    """The embedded judges' confusion counts from the metrics files' metadata, and the
    validation split they were measured on."""
    rates: dict[str, dict[str, int]] = {}
    source = None
    for p in metric_paths:
        meta = read_meta(p) or {}
        found = dict(meta.get("judge_error_rates") or {})
        source = found.pop("source", source)
        rates.update(found)
    return rates, source


def _judged(metrics: pl.DataFrame) -> pl.DataFrame:
    """(benchmark, metric, judge) of every judged metric the run produced."""
    if metrics.is_empty():
        return pl.DataFrame(
            {"metric": [], "judge": []}, schema={"metric": pl.String, "judge": pl.String}
        )
    return (
        metrics.filter(pl.col("metric").is_in(list(_JUDGED)))
        .select("benchmark", "metric", "judge")
        .unique()
        .sort(["benchmark", "metric", "judge"])
    )


def _produced(metrics: pl.DataFrame, bench: str, metric: str, judge: str) -> str:
    """What ``judge`` produced for ``bench``'s ``metric``: "arm@step raw→corrected; ..."."""
    mine = (pl.col("benchmark") == bench) & (pl.col("judge") == judge)
    sub = metrics.filter(mine & (pl.col("metric") == metric))
    cor = metrics.filter((pl.col("metric") == f"{metric}_corrected") & (pl.col("judge") == judge))
    fixed = {(r["arm"], r["step"], r["benchmark"]): r["value"] for r in cor.iter_rows(named=True)}
    cells = []
    for r in sub.sort(["arm", "step", "benchmark"]).iter_rows(named=True):
        c = fixed.get((r["arm"], r["step"], r["benchmark"]))
        text = f"{r['arm']}@{r['step']} {r['value']:.2f}"
        cells.append(text + (f"→{c:.2f}" if c is not None else ""))
    return "; ".join(cells)


def _validity_rows(
    base: Mapping[str, Any],
    rates: Mapping[str, Mapping[str, int]],
    source: str | None,
    agree: pl.DataFrame | None,
) -> list[dict[str, Any]]:
    """``base``'s judge on each validation that measured it, or one row saying none did."""
    rows: list[dict[str, Any]] = []
    key = _RATE_KEY.get((base["metric"], base["judge"]))
    if key in rates:
        rows.append(
            {
                **base,
                "validation": source or "builtin:rgeom",
                "invalid_rate": 0.0,
                **_binary_agreement(rates[key]),
            }
        )
    if agree is not None:
        task = _JUDGED[base["metric"]]
        mine = (pl.col("task") == task) & (pl.col("judge") == base["judge"])
        for a in agree.filter(mine).iter_rows(named=True):
            rows.append(
                {
                    **base,
                    "validation": "validate_judges",
                    "n": a["n"],
                    "accuracy": a["accuracy"],
                    "kappa": a["kappa"],
                    "invalid_rate": a["n_invalid"] / a["n"] if a["n"] else float("nan"),
                    "sensitivity": None,
                    "specificity": None,
                }
            )
    return rows or [{**base, **_NOT_VALIDATED}]


def judges_table(
    metrics: pl.DataFrame,
    metric_paths: Sequence[str],
    agreement: str | None = None,
) -> Table:
    """Each judge beside its validity: accuracy, kappa and invalid rate on a validation
    split, next to the numbers it produced in this run (raw, and judge-corrected where the
    judge has measured error rates).

    Embedded judges are scored on builtin:rgeom's test split (the error rates written into
    every metrics file's metadata); ``agreement`` (validate_judges' table) adds every
    configured judge on the validation file the config names.
    """
    rates, source = _error_rates(metric_paths)
    agree = pl.from_arrow(read_table(agreement)) if agreement else None
    rows: list[dict[str, Any]] = []
    for bench, metric, judge in _judged(metrics).iter_rows():
        base = {
            "benchmark": bench,
            "metric": metric,
            "judge": judge,
            "produced": _produced(metrics, bench, metric, judge),
        }
        rows += _validity_rows(base, rates, source, agree)
    schema = _JUDGES_SCHEMA
    frame = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    return Table(
        "judges",
        "Judge validity beside the numbers each judge produced",
        frame,
        list(_JUDGES_DISPLAY),
        list(_JUDGES_NOTES),
    )
