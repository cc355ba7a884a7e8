"""The interventions summary table: per arm and anchor, the unedited model's refusal rate
and utility at its site, and what each edit (ablation, addition, rank-k ablation) changes.

Not to be confused with rgeom.causal.interventions_table, which measures the edits and
writes the all-cells table this one reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from rgeom.errors import RgeomError
from rgeom.io import read_table
from rgeom.layout import BASE
from rgeom.tables_format import Cell, Table, plain_cell, signed_text

_NEEDED = (
    "arm",
    "step",
    "intervention",
    "coeff",
    "k",
    "layer",
    "position",
    "carrier_source",
    "refusal_rate",
    "refusal_score_harmful",
    "kl_harmless",
    "utility_accuracy",
    "judge",
)
_MEASURES = ("refusal_delta", "score_delta", "kl", "utility_delta")
_NOTES_START = [
    "Δrefusal: change in the refusal rate of generations on harmful prompts against the "
    "unedited model (ablation should lower it, addition raise it); KL: KL(unedited || "
    "edited) on harmless prompts; Δutility: change in utility accuracy.",
    "site: the carrier, or a fallback direction where no candidate was admissible.",
]


def _condition(r: dict) -> str | None:
    """The edit a row measured, as the table's column prefix; None for the unedited row
    and for edits that repeat another (addition x0, rank-1 ablation)."""
    kind = r["intervention"]
    if kind == "ablation":
        return "ablation"
    if kind == "addition" and r["coeff"] not in (None, 0):
        return f"addition x{r['coeff']:g}"
    if kind == "subspace_ablation" and r["k"] not in (None, 1):
        # k = 1 is the single-direction ablation again.
        return f"rank-{r['k']} ablation"
    return None


def _conditions(rows: Sequence[dict]) -> list[str]:
    """Every edit measured, in the order the table first lists it."""
    conditions: list[str] = []
    for r in rows:
        c = _condition(r)
        if c and c not in conditions:
            conditions.append(c)
    return conditions


def _table_cells(rows: Sequence[dict], arms: Sequence[str]) -> list[tuple[str, int, tuple]]:
    """(arm, step, the cell whose rows it shows): step 0's base rows once per arm."""
    expanded = []
    for arm, step in sorted({(r["arm"], int(r["step"])) for r in rows}):
        if arm == BASE:
            expanded += [(a, step, (BASE, step)) for a in arms]
        else:
            expanded.append((arm, step, (arm, step)))
    return expanded


def _summary_row(
    arm: str,
    step: int,
    cell_rows: Sequence[dict],
    none: dict | None,
    conditions: Sequence[str],
) -> dict[str, Any]:
    """One (arm, step): the unedited row's numbers and each edit's change against them."""
    row: dict[str, Any] = {
        "arm": arm,
        "step": step,
        "site_layer": none["layer"] if none else None,
        "site_position": none["position"] if none else None,
        "site_source": none["carrier_source"] if none else None,
        "refusal_rate": none["refusal_rate"] if none else None,
        "utility_accuracy": none["utility_accuracy"] if none else None,
        "judge": none["judge"] if none else None,
    }
    for c in conditions:
        hit = next((r for r in cell_rows if _condition(r) == c), None)

        def delta(col: str, hit=hit) -> float | None:
            if hit is None or none is None or hit[col] is None or none[col] is None:
                return None
            return float(hit[col]) - float(none[col])

        row[f"{c}:refusal_delta"] = delta("refusal_rate")
        row[f"{c}:score_delta"] = delta("refusal_score_harmful")
        row[f"{c}:kl"] = hit["kl_harmless"] if hit else None
        row[f"{c}:utility_delta"] = delta("utility_accuracy")
    return row


def _site_text(row: dict) -> str:
    if row["site_layer"] is None:
        return "–"
    tag = "" if row["site_source"] == "carrier" else " (fallback)"
    return f"L{row['site_layer']} / {row['site_position']}{tag}"


def _display(conditions: Sequence[str]) -> list[tuple[str, Cell]]:
    display: list[tuple[str, Cell]] = [
        ("arm", plain_cell("arm")),
        ("step", plain_cell("step")),
        ("site", _site_text),
        ("refusal rate", plain_cell("refusal_rate")),
        ("utility", plain_cell("utility_accuracy")),
    ]
    for c in conditions:
        display += [
            (f"{c}: Δrefusal", plain_cell(f"{c}:refusal_delta", signed_text)),
            (f"{c}: KL", plain_cell(f"{c}:kl")),
            (f"{c}: Δutility", plain_cell(f"{c}:utility_delta", signed_text)),
        ]
    return display


def interventions_summary_table(path: str, arms: Sequence[str]) -> Table:
    """The summary's interventions table from the causal stage's all-cells ``path``."""
    table = read_table(path)
    for col in _NEEDED:
        if col not in table.column_names:
            raise RgeomError(f"{path}: missing column {col!r} (interventions table)")
    rows = table.to_pylist()
    unedited = {(r["arm"], int(r["step"])): r for r in rows if r["intervention"] == "none"}
    conditions = _conditions(rows)
    out = []
    for arm, step, key in _table_cells(rows, arms):
        cell_rows = [r for r in rows if (r["arm"], int(r["step"])) == key]
        out.append(_summary_row(arm, step, cell_rows, unedited.get(key), conditions))
    schema: dict[str, Any] = {
        "arm": pl.String,
        "step": pl.Int32,
        "site_layer": pl.Int16,
        "site_position": pl.Int16,
        "site_source": pl.String,
        "refusal_rate": pl.Float64,
        "utility_accuracy": pl.Float64,
        "judge": pl.String,
        **{f"{c}:{m}": pl.Float64 for c in conditions for m in _MEASURES},
    }
    frame = pl.DataFrame(out, schema=schema, orient="row").sort(["arm", "step"])
    judges = sorted(set(frame.get_column("judge").drop_nulls().to_list()))
    notes = [*_NOTES_START, f"judge {', '.join(judges) or '?'}: refusal rate and utility."]
    title = "Causal interventions at each cell's site"
    return Table("interventions", title, frame, _display(conditions), notes)
