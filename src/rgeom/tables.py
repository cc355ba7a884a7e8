"""Paper-style tables: behaviour, geometry, interventions and the verdict, one row per
(arm, anchor) (the verdict: one per arm), each written as Parquet, CSV, Markdown and LaTeX.

The machine-readable files (Parquet, CSV) keep every number in its own column (value,
interval bounds, judge); Markdown and LaTeX print "value [low, high]" and list the judges
under the table. Where the run uses the paper's anchors (:data:`PAPER_ANCHORS`) the
behaviour and geometry tables gain ``paper:`` columns with the numbers the paper reports
(:data:`PAPER_REFERENCE`), beside the run's own; for any other anchors they are left out, as
a step-12 number has no paper counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import atomic_path, read_meta, read_table, write_table, write_text
from rgeom.layout import BASE

TABLES_DIR = "tables"
TABLE_NAMES = ("behaviour", "geometry", "interventions", "verdict", "judges")

# --- the paper's numbers ------------------------------------------------------------

PAPER_ANCHORS = (0, 50, 100, 250, 500)
_TRAINED = PAPER_ANCHORS[1:]


@dataclass(frozen=True)
class Ref:
    """A number the paper reports: a point (low == high), a range, or an approximation."""

    low: float
    high: float | None = None
    approx: bool = False

    def text(self) -> str:
        if self.high is not None and self.high != self.low:
            return f"{self.low:.3f}–{self.high:.3f}"
        return f"≈{self.low:.2f}" if self.approx else f"{self.low:.3f}"


# The paper's numbers (arXiv 2604.27019), keyed by the run's column and (arm, anchor); the
# one place they live. Mapping decisions where the paper's text leaves them open:
# - HarmBench ASR is set beside the run's pooled aggregate over fixed-source methods
#   (``harmbench.asr``; with attacks its header is POOLED_ASR_HEADER, and the paper column's
#   header names it): the paper gives one ASR per anchor, not one per method.
# - SFT's "0.505-0.588" is a range over its trained anchors without a per-anchor split, so
#   every trained SFT anchor shows the range.
# - R2D2's XSTest any-refusal "1.000 -> 0.664 -> 0.228" has three values for four trained
#   anchors. 0.664 and 0.228 go to 250 and 500, where R2D2's ASR leaves 0 (0.035, 0.250);
#   1.000 goes to 100, the last anchor of the zero-ASR phase, and 50 stays blank rather
#   than repeating a number the paper does not state for it.
# - R2D2's step 50 "remains closed under both adaptive GCG and AutoDAN" (v2 abstract): no
#   number, so ≈0 beside adaptive_gcg.asr and adaptive_autodan.asr at (r2d2, 50).
# - The effective rank "≈1.24" is the paper's reading of the refusal direction across
#   adjacent layers, not tied to an arm or anchor; it matches the ``energy`` variant
#   (rgeom.drift's docstring), so it stands beside ``erank_energy`` on every row.
PAPER_REFERENCE: dict[str, dict[tuple[str, int], Ref]] = {
    "harmbench.asr": {
        ("r2d2", 50): Ref(0.0),
        ("r2d2", 100): Ref(0.0),
        ("r2d2", 250): Ref(0.035),
        ("r2d2", 500): Ref(0.250),
        **{("sft", s): Ref(0.505, 0.588) for s in _TRAINED},
    },
    "xstest.xstest_any_refusal": {
        ("r2d2", 100): Ref(1.0),
        ("r2d2", 250): Ref(0.664),
        ("r2d2", 500): Ref(0.228),
    },
    "adaptive_gcg.asr": {
        ("r2d2", 50): Ref(0.0, approx=True),
        ("r2d2", 250): Ref(0.415),
        ("r2d2", 500): Ref(0.613),
    },
    "adaptive_autodan.asr": {("r2d2", 50): Ref(0.0, approx=True)},
    "erank_energy": {
        (a, s): Ref(1.24, approx=True) for a in ("sft", "r2d2") for s in PAPER_ANCHORS
    },
}


def is_paper_config(params: Mapping[str, Any]) -> bool:
    anchors = params.get("anchors")
    return anchors is not None and tuple(int(a) for a in anchors) == PAPER_ANCHORS


def paper_value(column: str, arm: str, step: int) -> Ref | None:
    return PAPER_REFERENCE.get(column, {}).get((arm, int(step)))


# --- one table ----------------------------------------------------------------------


@dataclass
class Table:
    """``frame``: the machine-readable table; ``display``: (header, cell text of a row)."""

    name: str
    title: str
    frame: pl.DataFrame
    display: list[tuple[str, Callable[[dict], str]]]
    notes: list[str] = field(default_factory=list)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}"


def _with_ci(col: str, digits: int = 3) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        text = _num(row.get(col), digits)
        lo, hi = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
        if text != "–" and lo is not None and hi is not None:
            text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
        return text

    return cell


def _plain(col: str, fmt: Callable[[Any], str] = _num) -> Callable[[dict], str]:
    return lambda row: fmt(row.get(col))


_ARROW = {
    pl.String: pa.string(),
    pl.Float64: pa.float64(),
    pl.Int32: pa.int32(),
    pl.Int16: pa.int16(),
    pl.Boolean: pa.bool_(),
}


def table_schema(frame: pl.DataFrame) -> pa.Schema:
    fields = []
    for name, dtype in frame.schema.items():
        base = _ARROW.get(dtype.base_type())
        if base is None:
            raise RgeomError(f"table column {name!r}: no Parquet type for {dtype}")
        fields.append(pa.field(name, base, nullable=name not in ("arm", "step")))
    return pa.schema(fields)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(table: Table) -> str:
    heads = [h for h, _ in table.display]
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in heads) + " |")
    lines.append("|" + "|".join("---" for _ in heads) + "|")
    for row in table.frame.iter_rows(named=True):
        lines.append("| " + " | ".join(_md_escape(f(row)) for _, f in table.display) + " |")
    if table.notes:
        lines.append("")
        lines += [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "≈": r"$\approx$",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(table: Table) -> str:
    """A booktabs ``table`` environment, ready to ``\\input``."""
    heads = [h for h, _ in table.display]
    spec = "l" * 2 + "r" * (len(heads) - 2)
    lines = [
        "% Generated by rgeom (rgeom.tables); needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering\\small",
        f"\\caption{{{tex_escape(table.title)}}}",
        f"\\label{{tab:rgeom-{table.name}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(tex_escape(h) for h in heads) + " \\\\",
        "\\midrule",
    ]
    for row in table.frame.iter_rows(named=True):
        lines.append(" & ".join(tex_escape(f(row)) for _, f in table.display) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.notes:
        lines.append("\\par\\smallskip\\footnotesize")
        lines.append(" \\\\\n".join(tex_escape(n) for n in table.notes))
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


# Columns whose cells run longer than this wrap instead of widening the table.
WRAP_CHARS = 40


def html(table: Table) -> str:
    """A standalone page: the Snakemake HTML report shows HTML results inline.

    The table sits in a box that scrolls sideways inside the page, and long text columns
    (e.g. the verdict's detail) wrap, so a wide table is never cut at the window's edge.
    """
    from html import escape

    rows = [[f(row) for _, f in table.display] for row in table.frame.iter_rows(named=True)]
    wrap = [any(len(r[i]) > WRAP_CHARS for r in rows) for i in range(len(table.display))]

    def cls(i: int) -> str:
        return " class='wrap'" if wrap[i] else ""

    heads = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, (h, _) in enumerate(table.display))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{escape(v)}</td>" for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    notes = "".join(f"<li>{escape(n)}</li>" for n in table.notes)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'>"
        f"<title>{escape(table.title)}</title><style>"
        "body{font-family:sans-serif;font-size:13px;margin:1em}"
        ".scroll{max-width:100%;overflow-x:auto}"
        "table{border-collapse:collapse}th,td{padding:3px 8px;text-align:right;"
        "border-bottom:1px solid #ddd;white-space:nowrap}th{border-bottom:2px solid #333;"
        "white-space:normal;vertical-align:bottom}"
        ".wrap{white-space:normal;text-align:left;min-width:16em;max-width:32em}"
        "td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}"
        "tr:hover{background:#f3f3f3}ul{color:#444;max-width:60em}"
        f"</style></head><body><h3>{escape(table.title)}</h3>"
        f"<div class='scroll'><table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody>"
        f"</table></div><ul>{notes}</ul></body></html>\n"
    )


def write_tables(tables: Sequence[Table], out_dir: str | Path, meta: Mapping[str, Any]) -> None:
    out = Path(out_dir)
    for t in tables:
        write_text(out / f"{t.name}.html", html(t))
        write_table(
            out / f"{t.name}.parquet", t.frame.to_arrow(), table_schema(t.frame), dict(meta)
        )
        with atomic_path(out / f"{t.name}.csv", suffix=".csv") as tmp:
            t.frame.write_csv(tmp, float_precision=6)
        write_text(out / f"{t.name}.md", markdown(t))
        write_text(out / f"{t.name}.tex", latex(t))


# --- behaviour ----------------------------------------------------------------------


POOLED_ASR_HEADER = "pooled ASR, all test cases (extra)"


def _behaviour_columns(stems: Sequence[str]) -> list[tuple[str, str]]:
    """(stem, header) of the behaviour columns present, in the paper's reading order."""
    present = set(stems)
    out: list[tuple[str, str]] = []

    def add(stem: str, header: str) -> None:
        if stem in present and stem not in {s for s, _ in out}:
            out.append((stem, header))

    def family(prefix: str) -> list[str]:
        return sorted(s for s in stems if s.split("@")[0] == prefix or s.startswith(prefix + "@"))

    # HarmBench reports ASR per attack method: those are the headline columns. The pooled
    # number (every test case of every method, so Templates' three test cases per behaviour
    # weigh three times) follows as a labelled extra; without methods it is the ASR.
    methods = sorted(s for s in stems if s.startswith("harmbench.asr/"))
    for s in methods:
        add(s, f"HarmBench ASR, {s.split('/', 1)[1]}")
    for s in family("harmbench.asr"):
        add(s, POOLED_ASR_HEADER if methods else "HarmBench ASR")
    for s in family("harmbench.asr_corrected"):
        add(
            s,
            "HarmBench ASR (pooled), judge-corrected"
            if methods
            else "HarmBench ASR, judge-corrected",
        )
    for s in family("adaptive_gcg.asr"):
        add(s, "adaptive GCG ASR")
    for s in family("adaptive_autodan.asr"):
        add(s, "adaptive AutoDAN ASR")
    for s in sorted(s for s in stems if ".strongreject" in s):
        add(s, s.split(".", 1)[1].replace("_", " "))
    for metric, header in (
        ("xstest_full_refusal", "XSTest full refusal"),
        ("xstest_partial_refusal", "XSTest partial refusal"),
        ("xstest_any_refusal", "XSTest any refusal"),
        ("xstest_any_refusal_corrected", "XSTest any refusal, judge-corrected"),
        ("contrast_compliance", "XSTest contrast compliance"),
    ):
        for s in sorted(s for s in stems if s.split("@")[0].endswith("." + metric)):
            add(s, header)
    for metric, header in (
        ("utility_accuracy", "utility accuracy"),
        ("over_refusal", "over-refusal"),
    ):
        for s in sorted(s for s in stems if s.split("@")[0].endswith("." + metric)):
            add(s, header)
    for s in sorted(s for s in stems if s.split("@")[0] in ("utility_kl", "utility_ce")):
        add(s, s.split("@")[0].replace("_", " ").replace("utility ", "utility "))
    return out


def behaviour_table(named: pl.DataFrame, params: Mapping[str, Any]) -> Table:
    """``named``: metric rows with their ``column`` stem (rgeom.report._metric_names)."""
    stems = named.get_column("column").unique().to_list() if not named.is_empty() else []
    cols = _behaviour_columns(stems)
    keys = named.select(["arm", "step"]).unique().sort(["arm", "step"])
    frame = keys
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
    display: list[tuple[str, Callable[[dict], str]]] = [
        ("arm", _plain("arm")),
        ("step", _plain("step")),
    ]
    paper = is_paper_config(params)
    for stem, header in cols:
        display.append((header, _with_ci(stem)))
        base = stem.split("@")[0]
        if paper and base in PAPER_REFERENCE:
            ref_col = f"paper:{base}"
            if ref_col not in frame.columns:
                frame = frame.with_columns(
                    pl.struct(["arm", "step"])
                    .map_elements(
                        lambda r, b=base: (
                            v.text() if (v := paper_value(b, r["arm"], r["step"])) else None
                        ),
                        return_dtype=pl.String,
                    )
                    .alias(ref_col)
                )
            # The header names the run column the paper's number is set beside.
            display.append((f"paper, beside {header}", _plain(ref_col, lambda v: v or "")))
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
    return Table("behaviour", "Behaviour per arm and anchor", frame, display, notes)


# --- geometry -----------------------------------------------------------------------


def read_carriers(paths: Sequence[str]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for path in paths:
        meta = read_meta(path)
        for key in ("arm", "step"):
            if meta.get(key) is None:
                raise RgeomError(f"{path}: provenance lacks {key!r} (carrier table)")
        table = read_table(path)
        for col in ("layer", "position", "bypass", "induce", "kl", "admissible", "is_carrier"):
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (carrier table)")
        out[(str(meta["arm"]), int(meta["step"]))] = table.to_pylist()
    return out


def _cell(mapping: Mapping[tuple[str, int], Any], arm: str, step: int) -> Any:
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
    rank_kind = (read_meta(drift).get("drift") or {}).get("rank_kind", "energy")
    cells = read_carriers(carriers)
    sites = read_sites(interventions)
    rows = []
    for r in table.to_pylist():
        arm, step = r["arm"], int(r["step"])
        site = _cell(sites, arm, step)
        cand = _cell(cells, arm, step) or []
        if site is not None:
            key = (site["layer"], site["position"])
            source = site["carrier_source"]
        else:
            chosen = [c for c in cand if c["is_carrier"]]
            key = (chosen[0]["layer"], chosen[0]["position"]) if chosen else None
            source = "carrier" if chosen else None
        scores = next((c for c in cand if key and (c["layer"], c["position"]) == key), {})
        row = {
            "arm": arm,
            "step": step,
            "carrier_layer": r["carrier_layer"],
            "carrier_position": r["carrier_position"],
            "n_admissible": r["n_admissible"],
            "site_layer": key[0] if key else None,
            "site_position": key[1] if key else None,
            "site_source": source,
            **{
                f"{score}{suffix}": scores.get(f"{score}{suffix}")
                for score in ("bypass", "induce", "kl")
                for suffix in ("", "_ci_low", "_ci_high")
            },
        }
        for name in (
            "erank_energy",
            "erank_singular",
            "erank_participation",
            "erank_ci_low",
            "erank_ci_high",
            "erank_null_mean",
            "erank_null_sd",
            "null_kind",
            "angle_prev_deg",
            "angle_prev_ci_low",
            "angle_prev_ci_high",
            "angle_step0_deg",
            "angle_step0_ci_low",
            "angle_step0_ci_high",
        ):
            row[name] = r.get(name)
        rows.append(row)
    schema = {
        "arm": pl.String,
        "step": pl.Int32,
        "carrier_layer": pl.Int16,
        "carrier_position": pl.Int16,
        "n_admissible": pl.Int32,
        "site_layer": pl.Int16,
        "site_position": pl.Int16,
        "site_source": pl.String,
        **{
            f"{score}{suffix}": pl.Float64
            for score in ("bypass", "induce", "kl")
            for suffix in ("", "_ci_low", "_ci_high")
        },
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
    frame = pl.DataFrame(rows, schema=schema, orient="row").sort(["arm", "step"])
    # The drift table's interval belongs to the variant its null was computed for.
    frame = frame.rename(
        {"erank_ci_low": f"erank_{rank_kind}_ci_low", "erank_ci_high": f"erank_{rank_kind}_ci_high"}
    )

    def carrier(row: dict) -> str:
        if row["carrier_layer"] is None:
            return "none"
        return f"L{row['carrier_layer']} / {row['carrier_position']}"

    def site(row: dict) -> str:
        if row["site_layer"] is None:
            return "–"
        tag = "" if row["site_source"] == "carrier" else f" ({row['site_source']})"
        return f"L{row['site_layer']} / {row['site_position']}{tag}"

    def null(row: dict) -> str:
        if row["erank_null_mean"] is None:
            return "–"
        return f"{row['erank_null_mean']:.3f} ± {row['erank_null_sd'] or 0:.3f}"

    def angle(name: str) -> Callable[[dict], str]:
        def cell(row: dict) -> str:
            text = _num(row[f"angle_{name}_deg"], 1)
            lo, hi = row[f"angle_{name}_ci_low"], row[f"angle_{name}_ci_high"]
            if text != "–" and lo is not None and hi is not None:
                text += f" [{lo:.1f}, {hi:.1f}]"
            return text

        return cell

    display: list[tuple[str, Callable[[dict], str]]] = [
        ("arm", _plain("arm")),
        ("step", _plain("step")),
        ("carrier (layer / pos)", carrier),
        ("admissible", _plain("n_admissible")),
        ("site", site),
        ("bypass", _with_ci("bypass")),
        ("induce", _with_ci("induce")),
        ("KL", _with_ci("kl")),
        (
            "erank energy",
            _with_ci("erank_energy") if rank_kind == "energy" else _plain("erank_energy"),
        ),
        (
            "erank singular",
            _with_ci("erank_singular") if rank_kind == "singular" else _plain("erank_singular"),
        ),
        (
            "erank participation",
            _with_ci("erank_participation")
            if rank_kind == "participation"
            else _plain("erank_participation"),
        ),
        (f"null {rank_kind} (mean ± sd)", null),
        ("angle to prev. (deg)", angle("prev")),
        ("angle to step 0 (deg)", angle("step0")),
    ]
    if is_paper_config(params):
        frame = frame.with_columns(
            pl.struct(["arm", "step"])
            .map_elements(
                lambda r: (
                    v.text() if (v := paper_value("erank_energy", r["arm"], r["step"])) else None
                ),
                return_dtype=pl.String,
            )
            .alias("paper:erank_energy")
        )
        display.insert(
            9, ("paper, beside erank energy", _plain("paper:erank_energy", lambda v: v or ""))
        )
    nulls = sorted(set(frame.get_column("null_kind").drop_nulls().to_list()))
    notes = [
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
    return Table("geometry", "Refusal geometry per arm and anchor", frame, display, notes)


# --- interventions ------------------------------------------------------------------


def _condition(r: dict) -> str | None:
    kind = r["intervention"]
    if kind == "ablation":
        return "ablation"
    if kind == "addition" and r["coeff"] not in (None, 0):
        return f"addition x{r['coeff']:g}"
    if kind == "subspace_ablation" and r["k"] not in (None, 1):
        # k = 1 is the single-direction ablation again.
        return f"rank-{r['k']} ablation"
    return None


def interventions_table(path: str, arms: Sequence[str]) -> Table:
    table = read_table(path)
    need = (
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
    for col in need:
        if col not in table.column_names:
            raise RgeomError(f"{path}: missing column {col!r} (interventions table)")
    rows = table.to_pylist()
    base = {(r["arm"], int(r["step"])): r for r in rows if r["intervention"] == "none"}
    conditions: list[str] = []
    for r in rows:
        c = _condition(r)
        if c and c not in conditions:
            conditions.append(c)
    out = []
    cells = sorted({(r["arm"], int(r["step"])) for r in rows})
    expanded = []
    for arm, step in cells:
        if arm == BASE:
            expanded += [(a, step, (BASE, step)) for a in arms]
        else:
            expanded.append((arm, step, (arm, step)))
    for arm, step, key in expanded:
        none = base.get(key)
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
            hit = next(
                (r for r in rows if (r["arm"], int(r["step"])) == key and _condition(r) == c),
                None,
            )

            def delta(col: str, hit=hit, none=none) -> float | None:
                if hit is None or none is None or hit[col] is None or none[col] is None:
                    return None
                return float(hit[col]) - float(none[col])

            row[f"{c}:refusal_delta"] = delta("refusal_rate")
            row[f"{c}:score_delta"] = delta("refusal_score_harmful")
            row[f"{c}:kl"] = hit["kl_harmless"] if hit else None
            row[f"{c}:utility_delta"] = delta("utility_accuracy")
        out.append(row)
    schema: dict[str, Any] = {
        "arm": pl.String,
        "step": pl.Int32,
        "site_layer": pl.Int16,
        "site_position": pl.Int16,
        "site_source": pl.String,
        "refusal_rate": pl.Float64,
        "utility_accuracy": pl.Float64,
        "judge": pl.String,
    }
    for c in conditions:
        for m in ("refusal_delta", "score_delta", "kl", "utility_delta"):
            schema[f"{c}:{m}"] = pl.Float64
    frame = pl.DataFrame(out, schema=schema, orient="row").sort(["arm", "step"])

    def site(row: dict) -> str:
        if row["site_layer"] is None:
            return "–"
        tag = "" if row["site_source"] == "carrier" else " (fallback)"
        return f"L{row['site_layer']} / {row['site_position']}{tag}"

    display: list[tuple[str, Callable[[dict], str]]] = [
        ("arm", _plain("arm")),
        ("step", _plain("step")),
        ("site", site),
        ("refusal rate", _plain("refusal_rate")),
        ("utility", _plain("utility_accuracy")),
    ]
    for c in conditions:
        display += [
            (f"{c}: Δrefusal", _plain(f"{c}:refusal_delta", _signed)),
            (f"{c}: KL", _plain(f"{c}:kl")),
            (f"{c}: Δutility", _plain(f"{c}:utility_delta", _signed)),
        ]
    judges = sorted(set(frame.get_column("judge").drop_nulls().to_list()))
    notes = [
        "Δrefusal: change in the refusal rate of generations on harmful prompts against the "
        "unedited model (ablation should lower it, addition raise it); KL: KL(unedited || "
        "edited) on harmless prompts; Δutility: change in utility accuracy.",
        "site: the carrier, or a fallback direction where no candidate was admissible.",
        f"judge {', '.join(judges) or '?'}: refusal rate and utility.",
    ]
    return Table("interventions", "Causal interventions at each cell's site", frame, display, notes)


# --- verdict ------------------------------------------------------------------------


def verdict_table(path: str) -> Table:
    table = read_table(path)
    for col in ("arm", "verdict", "statistic", "detail", "basis"):
        if col not in table.column_names:
            raise RgeomError(f"{path}: missing column {col!r} (verdict table)")
    frame = pl.from_arrow(table)
    keep = [
        c
        for c in (
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
        if c in frame.columns
    ]
    frame = frame.select(keep)
    display: list[tuple[str, Callable[[dict], str]]] = [
        ("arm", _plain("arm")),
        ("verdict", _plain("verdict")),
        ("decided by", _plain("basis")),
        ("transfer", _with_ci("transfer") if "transfer" in keep else _plain("statistic")),
        ("admissible", _plain("admissible", lambda v: "yes" if v else "no")),
        ("detail", _plain("detail")),
    ]
    notes = [
        "relocation: the carrier moves to another layer; rotation: it stays but the direction "
        "turns; stable: neither; undetermined: the evidence does not decide. transfer: "
        "share of the last anchor's own bypass effect that step 0's direction achieves "
        "there (95% prompt bootstrap).",
    ]
    return Table("verdict", "Cross-anchor verdict per arm", frame, display, notes)


# --- judge validity -----------------------------------------------------------------

# Which validation task checks which metric, and the metrics each judge produces.
_JUDGED = {"asr": "harmbench", "xstest_any_refusal": "xstest"}
# Embedded judges' error-rate keys (judge metadata) per metric's judge.
_RATE_KEY = {
    ("asr", "refusal_matcher"): "refusal_matcher",
    ("asr", "harmfulness_judge"): "harmfulness_judge",
    ("xstest_any_refusal", "refusal_matcher"): "any_refusal",
}


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
    rates: dict[str, dict[str, int]] = {}
    source = None
    for p in metric_paths:
        meta = read_meta(p) or {}
        found = dict(meta.get("judge_error_rates") or {})
        source = found.pop("source", source)
        rates.update(found)
    rows: list[dict[str, Any]] = []
    present = (
        metrics.filter(pl.col("metric").is_in(list(_JUDGED)))
        .select("benchmark", "metric", "judge")
        .unique()
        .sort(["benchmark", "metric", "judge"])
        if not metrics.is_empty()
        else pl.DataFrame(
            {"metric": [], "judge": []}, schema={"metric": pl.String, "judge": pl.String}
        )
    )
    agree = pl.from_arrow(read_table(agreement)) if agreement else None

    def produced(bench: str, metric: str, judge: str) -> str:
        mine = (pl.col("benchmark") == bench) & (pl.col("judge") == judge)
        sub = metrics.filter(mine & (pl.col("metric") == metric))
        cor = metrics.filter(
            (pl.col("metric") == f"{metric}_corrected") & (pl.col("judge") == judge)
        )
        fixed = {
            (r["arm"], r["step"], r["benchmark"]): r["value"] for r in cor.iter_rows(named=True)
        }
        cells = []
        for r in sub.sort(["arm", "step", "benchmark"]).iter_rows(named=True):
            c = fixed.get((r["arm"], r["step"], r["benchmark"]))
            text = f"{r['arm']}@{r['step']} {r['value']:.2f}"
            cells.append(text + (f"→{c:.2f}" if c is not None else ""))
        return "; ".join(cells)

    for bench, metric, judge in present.iter_rows():
        key = _RATE_KEY.get((metric, judge))
        base = {
            "benchmark": bench,
            "metric": metric,
            "judge": judge,
            "produced": produced(bench, metric, judge),
        }
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
            task = _JUDGED[metric]
            for a in agree.filter((pl.col("task") == task) & (pl.col("judge") == judge)).iter_rows(
                named=True
            ):
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
        if key not in rates and (
            agree is None
            or not any(
                (r["benchmark"], r["metric"], r["judge"]) == (bench, metric, judge) for r in rows
            )
        ):
            rows.append(
                {
                    **base,
                    "validation": "none (raw is the headline)",
                    "n": None,
                    "accuracy": None,
                    "kappa": None,
                    "invalid_rate": None,
                    "sensitivity": None,
                    "specificity": None,
                }
            )
    schema = {
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
    frame = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    display: list[tuple[str, Callable[[dict], str]]] = [
        ("benchmark", _plain("benchmark")),
        ("metric", _plain("metric")),
        ("judge", _plain("judge")),
        ("validated on", _plain("validation")),
        ("n", _plain("n")),
        ("accuracy", _plain("accuracy")),
        ("Cohen's κ", _plain("kappa")),
        ("invalid rate", _plain("invalid_rate")),
        ("sensitivity", _plain("sensitivity")),
        ("specificity", _plain("specificity")),
        ("produced (raw→corrected)", _plain("produced")),
    ]
    notes = [
        "corrected = Rogan–Gladen (raw + spec − 1)/(sens + spec − 1), clipped to [0, 1], with "
        "the judge's sensitivity/specificity on the validation split; its CI (behaviour "
        "table) bootstraps both the test cases and the validation rows. Judges without "
        "their own validation keep the raw number as the headline.",
        "builtin:rgeom is rgeom's own synthetic labelled set (docs/judges.md): agreement on it "
        "is an upper bound on agreement with people on real model outputs.",
    ]
    return Table(
        "judges", "Judge validity beside the numbers each judge produced", frame, display, notes
    )
