"""The behaviour table: every behaviour metric per (arm, anchor), in the paper's reading
order, with the paper's numbers beside the run's on the paper's anchors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from rgeom.tables_format import Cell, Table, ci_cell, plain_cell
from rgeom.tables_paper import PAPER_REFERENCE, is_paper_config, with_paper_column

POOLED_ASR_HEADER = "pooled ASR, all test cases (extra)"


# (metric suffix, header) of the per-set XSTest and utility columns, in reading order.
_XSTEST_METRICS = (
    ("xstest_full_refusal", "XSTest full refusal"),
    ("xstest_partial_refusal", "XSTest partial refusal"),
    ("xstest_any_refusal", "XSTest any refusal"),
    ("xstest_any_refusal_corrected", "XSTest any refusal, judge-corrected"),
    ("contrast_compliance", "XSTest contrast compliance"),
)
_UTILITY_METRICS = (
    ("utility_accuracy", "utility accuracy"),
    ("over_refusal", "over-refusal"),
)


def _family(stems: Sequence[str], prefix: str) -> list[str]:
    """The stems of metric ``prefix``, bare or at an anchor (``prefix@...``), sorted."""
    return sorted(s for s in stems if s.split("@")[0] == prefix or s.startswith(prefix + "@"))


def _ending_in(stems: Sequence[str], metric: str) -> list[str]:
    """The stems whose metric (before any ``@anchor``) is ``<set>.<metric>``, sorted."""
    return sorted(s for s in stems if s.split("@")[0].endswith("." + metric))


def _asr_columns(stems: Sequence[str]) -> list[tuple[str, str]]:
    """HarmBench's and the adaptive attacks' ASR columns."""
    # HarmBench reports ASR per attack method: those are the headline columns. The pooled
    # number (every test case of every method, so Templates' three test cases per behaviour
    # weigh three times) follows as a labelled extra; without methods it is the ASR.
    methods = sorted(s for s in stems if s.startswith("harmbench.asr/"))
    pooled = POOLED_ASR_HEADER if methods else "HarmBench ASR"
    corrected = (
        "HarmBench ASR (pooled), judge-corrected" if methods else "HarmBench ASR, judge-corrected"
    )
    return [
        *((s, f"HarmBench ASR, {s.split('/', 1)[1]}") for s in methods),
        *((s, pooled) for s in _family(stems, "harmbench.asr")),
        *((s, corrected) for s in _family(stems, "harmbench.asr_corrected")),
        *((s, "adaptive GCG ASR") for s in _family(stems, "adaptive_gcg.asr")),
        *((s, "adaptive AutoDAN ASR") for s in _family(stems, "adaptive_autodan.asr")),
    ]


def _refusal_and_utility_columns(stems: Sequence[str]) -> list[tuple[str, str]]:
    """StrongREJECT's, XSTest's and the utility columns."""
    out = [
        (s, s.split(".", 1)[1].replace("_", " "))
        for s in sorted(s for s in stems if ".strongreject" in s)
    ]
    for metric, header in (*_XSTEST_METRICS, *_UTILITY_METRICS):
        out += [(s, header) for s in _ending_in(stems, metric)]
    for s in sorted(s for s in stems if s.split("@")[0] in ("utility_kl", "utility_ce")):
        out.append((s, s.split("@")[0].replace("_", " ").replace("utility ", "utility ")))
    return out


def _behaviour_columns(stems: Sequence[str]) -> list[tuple[str, str]]:
    """(stem, header) of the behaviour columns present, in the paper's reading order."""
    # A stem matched by more than one group keeps the header of the first.
    out: dict[str, str] = {}
    for stem, header in (*_asr_columns(stems), *_refusal_and_utility_columns(stems)):
        out.setdefault(stem, header)
    return list(out.items())


def _behaviour_frame(
    named: pl.DataFrame, cols: Sequence[tuple[str, str]]
) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """One row per (arm, step) with each column's value, interval and judge; and the judges
    behind each column."""
    frame = named.select(["arm", "step"]).unique().sort(["arm", "step"])
    judges: dict[str, list[str]] = {}
    for stem, _ in cols:
        sub = named.filter(pl.col("column") == stem).select(
            "arm",
            "step",
            pl.col("value").alias(stem),
            pl.col("ci_low").alias(f"{stem}_ci_low"),
            pl.col("ci_high").alias(f"{stem}_ci_high"),
            pl.col("judge").alias(f"{stem}_judge"),
        )
        frame = frame.join(sub, on=["arm", "step"], how="left")
        judges[stem] = sorted(set(sub.get_column(f"{stem}_judge").drop_nulls().to_list()))
    return frame, judges


def _behaviour_notes(
    cols: Sequence[tuple[str, str]], judges: Mapping[str, list[str]], paper: bool
) -> list[str]:
    notes = ["95% percentile-bootstrap intervals in brackets; step 0 is the source model."]
    if any(s.startswith("harmbench.asr/") for s, _ in cols):
        notes.append(
            "HarmBench ASR, <method>: HarmBench's per-method ASR (mean over behaviours of the "
            "success rate over that method's test cases), the headline. "
            f"{POOLED_ASR_HEADER}: the same mean over every method's test cases pooled, so a "
            "method with k test cases per behaviour (Templates) weighs k times."
        )
    by_judge: dict[str, list[str]] = {}
    for stem, header in cols:
        by_judge.setdefault(", ".join(judges[stem]) or "?", []).append(header)
    for judge, headers in by_judge.items():
        notes.append(f"judge {judge}: {'; '.join(headers)}")
    if paper:
        notes.append(
            "paper, beside <column>: the numbers arXiv 2604.27019 reports for this arm and "
            "anchor (rgeom.tables.PAPER_REFERENCE), set beside the run column named in the "
            "header; blank where it gives none."
        )
    return notes


def behaviour_table(named: pl.DataFrame, params: Mapping[str, Any]) -> Table:
    """``named``: metric rows with their ``column`` stem (rgeom.summary_inputs.metric_names)."""
    stems = named.get_column("column").unique().to_list() if not named.is_empty() else []
    cols = _behaviour_columns(stems)
    frame, judges = _behaviour_frame(named, cols)
    display: list[tuple[str, Cell]] = [("arm", plain_cell("arm")), ("step", plain_cell("step"))]
    paper = is_paper_config(params)
    for stem, header in cols:
        display.append((header, ci_cell(stem)))
        base = stem.split("@")[0]
        if paper and base in PAPER_REFERENCE:
            ref_col = f"paper:{base}"
            if ref_col not in frame.columns:
                frame = with_paper_column(frame, base, ref_col)
            # The header names the run column the paper's number is set beside.
            display.append((f"paper, beside {header}", plain_cell(ref_col, lambda v: v or "")))
    notes = _behaviour_notes(cols, judges, paper)
    return Table("behaviour", "Behaviour per arm and anchor", frame, display, notes)
