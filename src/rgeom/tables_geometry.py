"""The geometry table (carrier, site, causal scores, effective rank and angles per arm and
anchor) and the verdict table (one row per arm), from the carriers, drift and causal
stages' tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table
from rgeom.layout import BASE
from rgeom.summary_inputs import read_carriers
from rgeom.tables_format import Cell, Table, ci_cell, number_text, plain_cell
from rgeom.tables_paper import is_paper_config, with_paper_column

# The carrier table's scores at the site, each with its interval.
_SCORE_COLUMNS = tuple(
    f"{score}{suffix}"
    for score in ("bypass", "induce", "kl")
    for suffix in ("", "_ci_low", "_ci_high")
)
# Copied as they are from the drift table's row.
_DRIFT_COLUMNS = {
    "erank_energy": pl.Float64,
    "erank_singular": pl.Float64,
    "erank_participation": pl.Float64,
    "erank_ci_low": pl.Float64,
    "erank_ci_high": pl.Float64,
    "erank_null_mean": pl.Float64,
    "erank_null_sd": pl.Float64,
    "null_kind": pl.String,
    "angle_prev_deg": pl.Float64,
    "angle_prev_ci_low": pl.Float64,
    "angle_prev_ci_high": pl.Float64,
    "angle_step0_deg": pl.Float64,
    "angle_step0_ci_low": pl.Float64,
    "angle_step0_ci_high": pl.Float64,
}
_GEOMETRY_SCHEMA: dict[str, Any] = {
    "arm": pl.String,
    "step": pl.Int32,
    "carrier_layer": pl.Int16,
    "carrier_position": pl.Int16,
    "n_admissible": pl.Int32,
    "site_layer": pl.Int16,
    "site_position": pl.Int16,
    "site_source": pl.String,
    **dict.fromkeys(_SCORE_COLUMNS, pl.Float64),
    **_DRIFT_COLUMNS,
}
# Where the paper's effective rank goes: right after the run's "erank energy".
_PAPER_ERANK_AT = 9


def _for_cell(mapping: Mapping[tuple[str, int], Any], arm: str, step: int) -> Any:
    # Step 0 is the base model, stored once under arm "base".
    return mapping.get((arm, step), mapping.get((BASE, step)) if step == 0 else None)


def read_sites(interventions: str | None) -> dict[tuple[str, int], dict]:
    """(arm, step) -> the site the causal stage used: its carrier or labelled fallback."""
    if not interventions:
        return {}
    table = read_table(interventions)
    for col in ("arm", "step", "intervention", "layer", "position", "carrier_source"):
        if col not in table.column_names:
            raise RgeomError(f"{interventions}: missing column {col!r} (interventions table)")
    return {(r["arm"], int(r["step"])): r for r in table.to_pylist() if r["intervention"] == "none"}


def _geometry_row(r: Mapping[str, Any], site: dict | None, candidates: list[dict]) -> dict:
    """One drift row with its site (the causal stage's, else the carrier) and the carrier
    table's scores there."""
    if site is not None:
        key = (site["layer"], site["position"])
        source = site["carrier_source"]
    else:
        chosen = [c for c in candidates if c["is_carrier"]]
        key = (chosen[0]["layer"], chosen[0]["position"]) if chosen else None
        source = "carrier" if chosen else None
    scores = next((c for c in candidates if key and (c["layer"], c["position"]) == key), {})
    return {
        "arm": r["arm"],
        "step": int(r["step"]),
        "carrier_layer": r["carrier_layer"],
        "carrier_position": r["carrier_position"],
        "n_admissible": r["n_admissible"],
        "site_layer": key[0] if key else None,
        "site_position": key[1] if key else None,
        "site_source": source,
        **{name: scores.get(name) for name in _SCORE_COLUMNS},
        **{name: r.get(name) for name in _DRIFT_COLUMNS},
    }


def _carrier_text(row: dict) -> str:
    if row["carrier_layer"] is None:
        return "none"
    return f"L{row['carrier_layer']} / {row['carrier_position']}"


def _site_text(row: dict) -> str:
    if row["site_layer"] is None:
        return "–"
    tag = "" if row["site_source"] == "carrier" else f" ({row['site_source']})"
    return f"L{row['site_layer']} / {row['site_position']}{tag}"


def _null_text(row: dict) -> str:
    if row["erank_null_mean"] is None:
        return "–"
    return f"{row['erank_null_mean']:.3f} ± {row['erank_null_sd'] or 0:.3f}"


def _angle_cell(name: str) -> Cell:
    def cell(row: dict) -> str:
        text = number_text(row[f"angle_{name}_deg"], 1)
        lo, hi = row[f"angle_{name}_ci_low"], row[f"angle_{name}_ci_high"]
        if text != "–" and lo is not None and hi is not None:
            text += f" [{lo:.1f}, {hi:.1f}]"
        return text

    return cell


def _geometry_display(rank_kind: str) -> list[tuple[str, Cell]]:
    def erank(kind: str) -> Cell:
        # Only the variant the drift stage bootstrapped has an interval.
        column = f"erank_{kind}"
        return ci_cell(column) if rank_kind == kind else plain_cell(column)

    return [
        ("arm", plain_cell("arm")),
        ("step", plain_cell("step")),
        ("carrier (layer / pos)", _carrier_text),
        ("admissible", plain_cell("n_admissible")),
        ("site", _site_text),
        ("bypass", ci_cell("bypass")),
        ("induce", ci_cell("induce")),
        ("KL", ci_cell("kl")),
        ("erank energy", erank("energy")),
        ("erank singular", erank("singular")),
        ("erank participation", erank("participation")),
        (f"null {rank_kind} (mean ± sd)", _null_text),
        ("angle to prev. (deg)", _angle_cell("prev")),
        ("angle to step 0 (deg)", _angle_cell("step0")),
    ]


def _geometry_notes(nulls: Sequence[str], rank_kind: str) -> list[str]:
    return [
        "carrier: the (layer, position) the causal search selected among admissible "
        "candidates; none when no candidate passed. site: where bypass / induce / KL are "
        "read and the interventions act (the carrier, or the causal stage's labelled fallback).",
        "bypass / induce: refusal score (log-odds) after ablating the direction on harmful "
        "prompts / adding it on harmless ones; KL: KL(unedited || edited) on harmless prompts.",
        f"effective rank of the window of adjacent-layer directions; null: {', '.join(nulls)} "
        f"baseline of the {rank_kind} variant; intervals: 95% prompt bootstrap.",
        "angles: principal angle between reference directions, to the previous anchor and to "
        "step 0.",
    ]


def geometry_table(
    drift: str,
    carriers: Sequence[str],
    interventions: str | None,
    params: Mapping[str, Any],
) -> Table:
    table = read_table(drift)
    for col in ("arm", "step", "carrier_layer", "n_admissible", "erank_null_mean"):
        if col not in table.column_names:
            raise RgeomError(f"{drift}: missing column {col!r} (drift table)")
    rank_kind = (read_meta(drift).get("drift") or {}).get(
        "rank_kind", schema_default("drift.rank_kind")
    )
    cells = read_carriers(carriers)
    sites = read_sites(interventions)
    rows = []
    for r in table.to_pylist():
        arm, step = r["arm"], int(r["step"])
        site = _for_cell(sites, arm, step)
        rows.append(_geometry_row(r, site, _for_cell(cells, arm, step) or []))
    frame = pl.DataFrame(rows, schema=_GEOMETRY_SCHEMA, orient="row").sort(["arm", "step"])
    # The drift table's interval belongs to the variant its null was computed for.
    frame = frame.rename(
        {"erank_ci_low": f"erank_{rank_kind}_ci_low", "erank_ci_high": f"erank_{rank_kind}_ci_high"}
    )
    display = _geometry_display(rank_kind)
    if is_paper_config(params):
        frame = with_paper_column(frame, "erank_energy", "paper:erank_energy")
        display.insert(
            _PAPER_ERANK_AT,
            ("paper, beside erank energy", plain_cell("paper:erank_energy", lambda v: v or "")),
        )
    nulls = sorted(set(frame.get_column("null_kind").drop_nulls().to_list()))
    notes = _geometry_notes(nulls, rank_kind)
    return Table("geometry", "Refusal geometry per arm and anchor", frame, display, notes)


# --- verdict ------------------------------------------------------------------------

_VERDICT_COLUMNS = (
    "arm",
    "verdict",
    "basis",
    "statistic",
    "transfer",
    "transfer_ci_low",
    "transfer_ci_high",
    "admissible",
    "detail",
)


def verdict_table(path: str) -> Table:
    table = read_table(path)
    for col in ("arm", "verdict", "statistic", "detail", "basis"):
        if col not in table.column_names:
            raise RgeomError(f"{path}: missing column {col!r} (verdict table)")
    frame = pl.from_arrow(table)
    keep = [c for c in _VERDICT_COLUMNS if c in frame.columns]
    frame = frame.select(keep)
    display: list[tuple[str, Cell]] = [
        ("arm", plain_cell("arm")),
        ("verdict", plain_cell("verdict")),
        ("decided by", plain_cell("basis")),
        ("transfer", ci_cell("transfer") if "transfer" in keep else plain_cell("statistic")),
        ("admissible", plain_cell("admissible", lambda v: "yes" if v else "no")),
        ("detail", plain_cell("detail")),
    ]
    notes = [
        "relocation: the carrier moves to another layer; rotation: it stays but the direction "
        "turns; stable: neither; undetermined: the evidence does not decide. transfer: "
        "share of the last anchor's own bypass effect that step 0's direction achieves "
        "there (95% prompt bootstrap).",
    ]
    return Table("verdict", "Cross-anchor verdict per arm", frame, display, notes)
