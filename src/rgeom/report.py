"""The run summary: one wide table per (arm, step), the paper-style tables and the figures,
from metrics and direction tables.

Step 0 is the base model, written once with arm "base" but shared by every arm: its row is
copied into each arm of ``params["arms"]`` so every arm's curve starts at the same point.
Reading the inputs is rgeom.summary_inputs' part, the tables rgeom.tables' and the figures
rgeom.figures'; this module puts them together and prints the one-screen summary.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from rgeom import figures, tables
from rgeom.errors import RgeomError
from rgeom.figures import MAIN_METRICS as MAIN_METRICS
from rgeom.figures import plot_direction_heatmap as plot_direction_heatmap
from rgeom.figures import plot_metrics as plot_metrics
from rgeom.figures import plot_train_loss as plot_train_loss
from rgeom.io import atomic_path, read_table, write_table, write_text
from rgeom.layout import BASE
from rgeom.plotstyle import arm_style as arm_style
from rgeom.plotstyle import figure_formats
from rgeom.summary_inputs import DIRECTION_COLUMNS as DIRECTION_COLUMNS
from rgeom.summary_inputs import METRIC_COLUMNS as METRIC_COLUMNS
from rgeom.summary_inputs import UTILITY_SHIFT as UTILITY_SHIFT
from rgeom.summary_inputs import (
    SummaryInputs,
    expand_base,
    last_position,
    metric_names,
    read_carriers,
    read_directions,
    read_metrics,
    read_train_logs,
    summary_arms,
)

BASE_ARM = BASE
SUMMARY_NAME = "summary"
FIGURES = "figures"

# Every figure the workflow's summary rule declares (plus frontier_{arm} per arm): a figure
# without data is still written, saying what is missing, so the rule's outputs always exist.
REPORT_FIGURES = (
    "metrics_vs_step",
    "asr_vs_step",
    "xstest_vs_step",
    "robustness_utility",
    "direction_norm_heatmap",
    "carrier_layer_vs_step",
    "carrier_heatmaps",
    "erank_vs_step",
    "principal_angles",
    "train_loss",
)


# --- the wide table -----------------------------------------------------------------


def summary_frame(metrics: pl.DataFrame, directions: pl.DataFrame) -> pl.DataFrame:
    """One row per (arm, step); metric columns value/_ci_low/_ci_high/_n, then geometry."""
    keys = pl.concat(
        [metrics.select(["arm", "step"]), directions.select(["arm", "step"])], how="vertical"
    ).unique()
    out = keys.sort(["arm", "step"])
    if not metrics.is_empty():
        named = metric_names(metrics)
        stems = sorted(named.get_column("column").unique().to_list())
        for suffix, col in (
            ("", "value"),
            ("_ci_low", "ci_low"),
            ("_ci_high", "ci_high"),
            ("_n", "n"),
        ):
            wide = named.with_columns((pl.col("column") + suffix).alias("column")).pivot(
                on="column", index=["arm", "step"], values=col
            )
            out = out.join(wide, on=["arm", "step"], how="left")
        order = [f"{s}{suf}" for s in stems for suf in ("", "_ci_low", "_ci_high", "_n")]
        out = out.select(["arm", "step", *order])
    if not directions.is_empty():
        last = last_position(directions)
        geo = (
            last.sort(["arm", "step", "norm", "layer"], descending=[False, False, True, False])
            .group_by(["arm", "step"], maintain_order=True)
            .agg(
                pl.col("layer").first().alias("dir.max_norm_layer"),
                pl.col("norm").first().alias("dir.max_norm"),
                pl.col("cos_prev_layer").mean().alias("dir.mean_cos_prev_layer"),
            )
        )
        out = out.join(geo, on=["arm", "step"], how="left")
    return out.sort(["arm", "step"])


def summary_schema(frame: pl.DataFrame) -> pa.Schema:
    fields = [
        pa.field("arm", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
    ]
    for name in frame.columns[2:]:
        if name.endswith("_n"):
            fields.append(pa.field(name, pa.int32()))
        elif name == "dir.max_norm_layer":
            fields.append(pa.field(name, pa.int16()))
        else:
            fields.append(pa.field(name, pa.float64()))
    return pa.schema(fields)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(frame: pl.DataFrame) -> str:
    """Markdown with each metric as "value [low, high]"; counts left to the CSV."""
    stems = [c for c in frame.columns[2:] if not c.endswith(("_ci_low", "_ci_high", "_n"))]
    header = ["arm", "step", *stems]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in frame.iter_rows(named=True):
        cells = [row["arm"], str(row["step"])]
        for s in stems:
            cell = _fmt(row[s])
            lo, hi = row.get(f"{s}_ci_low"), row.get(f"{s}_ci_high")
            if lo is not None and hi is not None and cell != "-":
                cell += f" [{lo:.3f}, {hi:.3f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- entry points -------------------------------------------------------------------


def _write_summary_table(out: Path, frame: pl.DataFrame, record: Mapping[str, Any]) -> None:
    """summary.parquet, .csv and .md under ``out``."""
    write_table(out / f"{SUMMARY_NAME}.parquet", frame.to_arrow(), summary_schema(frame), record)
    with atomic_path(out / f"{SUMMARY_NAME}.csv", suffix=".csv") as tmp:
        frame.write_csv(tmp, float_precision=6)
    write_text(out / f"{SUMMARY_NAME}.md", markdown_table(frame))


def _paper_tables(
    m: pl.DataFrame, arms: list[str], params: Mapping[str, Any], inputs: SummaryInputs
) -> list[tables.Table]:
    """The behaviour, geometry, interventions, verdict and judges tables the inputs allow."""
    drift = inputs.drift_dir
    paper = [tables.behaviour_table(metric_names(m), params)] if not m.is_empty() else []
    if drift is not None:
        paper.append(
            tables.geometry_table(
                str(drift / "drift.parquet"), inputs.carriers or [], inputs.interventions, params
            )
        )
    if inputs.interventions:
        paper.append(tables.interventions_summary_table(inputs.interventions, arms))
    if drift is not None:
        paper.append(tables.verdict_table(str(drift / "verdict.parquet")))
    paper.append(tables.judges_table(m, inputs.metrics, inputs.validation))
    return paper


def _draw_figures(
    m: pl.DataFrame,
    d: pl.DataFrame,
    arms: list[str],
    params: Mapping[str, Any],
    inputs: SummaryInputs,
    figs: Path,
    formats: Sequence[str],
) -> None:
    """Every figure the inputs allow under ``figs``, and a placeholder for each other one
    the workflow declares."""
    drawn: list[Path] = []
    if not m.is_empty():
        drawn += figures.plot_metrics(m, arms, figs / "metrics_vs_step", formats)
        drawn += figures.behaviour_figures(m, arms, params, figs, formats)
    if not d.is_empty():
        drawn += figures.plot_direction_heatmap(d, arms, figs / "direction_norm_heatmap", formats)
    if inputs.train_logs:
        logs = read_train_logs(inputs.train_logs)
        drawn += figures.plot_train_loss(logs, arms, figs / "train_loss", formats)
    if inputs.carriers:
        cells = read_carriers(inputs.carriers)
        drawn += figures.plot_carrier_heatmaps(cells, arms, figs / "carrier_heatmaps", formats)
    if inputs.drift_dir is not None:
        table = str(inputs.drift_dir / "drift.parquet")
        stem = figs / "carrier_layer_vs_step"
        drawn += figures.plot_drift_carrier_layers(table, arms, stem, formats)
        drawn += figures.plot_erank(table, arms, params, figs / "erank_vs_step", formats)
        angles = str(inputs.drift_dir / "angles.parquet")
        drawn += figures.plot_angles(angles, arms, figs / "principal_angles", formats)
    if inputs.interventions:
        drawn += figures.plot_frontiers(inputs.interventions, arms, figs, formats)
    for name in [*REPORT_FIGURES, *(f"frontier_{a}" for a in arms)]:
        if figs / f"{name}.png" not in drawn:
            figures.placeholder(figs / name, formats, f"{name}: this run has no input for it")


def build_summary(
    inputs: SummaryInputs,
    out_dir: str,
    params: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Write summary.parquet/.csv/.md, tables/ and figures/ under ``out_dir``.

    ``inputs.validation`` (validate_judges' agreement table) joins the judges table, which
    always lists each metrics judge's validity beside the numbers it produced.

    ``inputs.utility_shift`` tables (metrics format) add the columns utility_kl / utility_ce.
    ``inputs.carriers`` (every cell's carrier table), ``inputs.drift_dir`` (drift.parquet,
    angles.parquet, verdict.parquet) and ``inputs.interventions`` (the all-cells table) add
    the geometry, interventions and verdict tables and their figures.
    """
    if not inputs.metrics and not inputs.directions and not inputs.utility_shift:
        raise RgeomError("summary: no metrics or direction files given")
    formats = figure_formats(params)
    m = read_metrics([*inputs.metrics, *(inputs.utility_shift or [])])
    d = read_directions(inputs.directions)
    arms = summary_arms(params, m.get_column("arm").to_list() + d.get_column("arm").to_list())
    m, d = expand_base(m, arms), expand_base(d, arms)
    out = Path(out_dir)
    record = {**meta, "arms": arms, "inputs": inputs.record()}
    _write_summary_table(out, summary_frame(m, d), record)
    tables.write_tables(_paper_tables(m, arms, params, inputs), out / tables.TABLES_DIR, record)
    _draw_figures(m, d, arms, params, inputs, out / FIGURES, formats)


def publish_summary(staging: str, dest: str, files: Sequence[str]) -> None:
    """Copy the finished summary ``files`` (paths under ``dest``) from ``staging`` into place.

    The workflow's summary job writes to a staging folder, because Snakemake deletes a
    job's declared outputs when it starts and when it fails; only this copy, after a
    successful summary, replaces what a user may be looking at. Each file is swapped in
    by a rename, and copied rather than linked so its mtime is newer than the staging.
    """
    import shutil

    src_root, dest_root = Path(staging), Path(dest)
    missing = [f for f in files if not (src_root / Path(f).relative_to(dest_root)).is_file()]
    if missing:
        raise RgeomError(f"summary: {staging} lacks {len(missing)} file(s), e.g. {missing[0]}")
    for f in files:
        with atomic_path(f, suffix=Path(f).suffix) as tmp:
            shutil.copyfile(src_root / Path(f).relative_to(dest_root), tmp)


def summary_cmd(  # noqa: PLR0913 (one keyword per CLI flag: argparse's dests)
    metrics: list[str],
    directions: list[str],
    out_dir: str,
    params: dict[str, Any],
    train_logs: list[str] | None = None,
    utility_shift: list[str] | None = None,
    carriers: list[str] | None = None,
    drift_dir: str | None = None,
    interventions: str | None = None,
    validation: str | None = None,
) -> None:
    """``rgeom summary``: build everything, then print the one-screen summary."""
    from rgeom.io import config_hash, provenance

    inputs = SummaryInputs(
        metrics=metrics,
        directions=directions,
        train_logs=train_logs or None,
        utility_shift=utility_shift or None,
        carriers=carriers or None,
        drift_dir=Path(drift_dir) if drift_dir else None,
        interventions=interventions,
        validation=validation,
    )
    build_summary(
        inputs=inputs,
        out_dir=out_dir,
        params=params,
        meta=provenance(config_hash=config_hash(params), seed=params.get("seed")),
    )
    print(format_summary(out_dir))


def format_summary(out_dir: str, max_metrics: int = 5) -> str:
    """A one-screen text summary: main metrics per (arm, step) and the figure paths."""
    out = Path(out_dir)
    path = out / f"{SUMMARY_NAME}.parquet"
    frame = pl.from_arrow(read_table(path))
    stems = [c for c in frame.columns[2:] if not c.endswith(("_ci_low", "_ci_high", "_n"))]
    rank = {m: i for i, m in enumerate(MAIN_METRICS)}

    def key(stem: str) -> tuple:
        metric = stem.split(".", 1)[-1].split("@")[0]
        # Per-method ASR is HarmBench's headline: shown first; the pooled "asr" follows.
        if metric.startswith("asr/"):
            return (-1, stem)
        return (rank.get(metric, len(rank)), stem)

    geo = [s for s in stems if s.startswith("dir.max_norm")]
    shown = sorted((s for s in stems if not s.startswith("dir.")), key=key)[:max_metrics] + geo
    header = ["arm", "step", *shown]
    rows = [
        [str(r["arm"]), str(r["step"]), *(_fmt(r[s]) for s in shown)]
        for r in frame.iter_rows(named=True)
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = [f"summary: {path}"]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    hidden = len(stems) - len(shown)
    if hidden > 0:
        lines.append(f"(+{hidden} more columns and 95% CIs in {out / (SUMMARY_NAME + '.md')})")
    # One line per folder, not per file: 13 figures in two formats would fill the screen.
    for folder, label in ((out / "tables", "tables"), (out / FIGURES, "figures")):
        files = [f for f in sorted(folder.glob("*")) if not f.name.startswith(".")]
        if files:
            names = list(dict.fromkeys(f.stem for f in files))
            exts = "/".join(dict.fromkeys(f.suffix.lstrip(".") for f in files))
            lines.append(f"{label} ({exts}) in {folder}/:")
            lines += textwrap.wrap(
                ", ".join(names), width=100, initial_indent="  ", subsequent_indent="  "
            )
    verdict = out / "tables" / "verdict.parquet"
    if verdict.exists():
        lines.append(verdict_line(read_table(verdict).to_pylist()))
    return "\n".join(lines)


def verdict_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """The verdict table in one line, with the table's qualifications: a verdict reached
    on fallback directions says so, and so does a geometry reading that disagrees."""
    out = []
    for r in rows:
        notes = []
        if r.get("admissible") is False:
            notes.append("no admissible carrier")
        geometry = re.search(r"; geometry: (\w+)", r.get("detail") or "")
        if geometry and geometry.group(1) != r["verdict"]:
            notes.append(f"geometry {geometry.group(1)}")
        out.append(f"{r['arm']}: {r['verdict']}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "verdict: " + ", ".join(out)
