"""The run summary: one wide table per (arm, step) and the figures, from metrics and
direction tables.

Step 0 is the base model, written once with arm "base" but shared by every arm: its row is
copied into each arm of ``params["arms"]`` so every arm's curve starts at the same point.
Figures use matplotlib's object API (no pyplot, no global backend switch) with the Agg
canvas, so building a report never needs a display and never leaks figures.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import atomic_path, read_meta, read_table, write_table, write_text
from rgeom.layout import BASE
from rgeom.plotstyle import arm_style, figure_formats, new_figure, save_figure

# Old private names, kept until their importers (figures, drift, causal) use rgeom.plotstyle.
_formats, _figure, _save = figure_formats, new_figure, save_figure

BASE_ARM = BASE
SUMMARY_NAME = "summary"
FIGURES = "figures"

# Metrics plotted one panel each, in this order, when present.
MAIN_METRICS = (
    "asr",
    "xstest_any_refusal",
    "utility_accuracy",
    "over_refusal",
    "contrast_compliance",
    "strongreject_nonrefusal",
    "utility_kl",
)
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

UTILITY_SHIFT = "utility_shift"  # benchmark name of rgeom.utility_shift's rows
METRIC_COLUMNS = ("arm", "step", "benchmark", "metric", "value", "ci_low", "ci_high", "n", "judge")
DIRECTION_COLUMNS = ("layer", "position", "norm")


# --- reading ------------------------------------------------------------------------


def _arms(params: Mapping[str, Any], seen: Sequence[str]) -> list[str]:
    arms = list(params.get("arms") or [])
    if not arms:
        arms = sorted({a for a in seen if a != BASE_ARM})
    return arms or [BASE_ARM]


def _expand_base(df: pl.DataFrame, arms: list[str]) -> pl.DataFrame:
    """Copy the base rows (arm "base") into every arm; other rows stay as they are."""
    base = df.filter(pl.col("arm") == BASE_ARM)
    rest = df.filter(pl.col("arm") != BASE_ARM)
    if base.is_empty() or arms == [BASE_ARM]:
        return df
    copies = [base.with_columns(pl.lit(a).alias("arm")) for a in arms]
    return pl.concat([rest, *copies], how="vertical")


def read_metrics(paths: Sequence[str]) -> pl.DataFrame:
    frames = []
    for path in paths:
        table = read_table(path)
        for col in METRIC_COLUMNS:
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (metrics table)")
        df = pl.from_arrow(table.select(list(METRIC_COLUMNS)))
        frames.append(
            df.with_columns(
                pl.col("step").cast(pl.Int32),
                pl.col("n").cast(pl.Int32),
                *(pl.col(c).cast(pl.Float64) for c in ("value", "ci_low", "ci_high")),
                pl.lit(str(path)).alias("source"),
            )
        )
    if not frames:
        return pl.DataFrame(
            schema={
                "arm": pl.String,
                "step": pl.Int32,
                "benchmark": pl.String,
                "metric": pl.String,
                "value": pl.Float64,
                "ci_low": pl.Float64,
                "ci_high": pl.Float64,
                "n": pl.Int32,
                "judge": pl.String,
                "source": pl.String,
            }
        )
    df = pl.concat(frames, how="vertical")
    dup = df.group_by(["arm", "step", "benchmark", "metric", "judge"]).agg(
        pl.len().alias("k"), pl.col("source").first().alias("first"), pl.col("source")
    )
    dup = dup.filter(pl.col("k") > 1)
    if not dup.is_empty():
        r = dup.row(0, named=True)
        raise RgeomError(
            f"metric {r['benchmark']}.{r['metric']} (judge {r['judge']}) for arm {r['arm']} "
            f"step {r['step']} appears in more than one file: {', '.join(r['source'])}"
        )
    return df


def read_directions(paths: Sequence[str]) -> pl.DataFrame:
    """(arm, step, layer, position, norm, cos_prev_layer) from every direction table."""
    frames = []
    for path in paths:
        meta = read_meta(path)
        for key in ("arm", "step"):
            if meta.get(key) is None:
                raise RgeomError(f"{path}: provenance lacks {key!r} (direction table)")
        table = read_table(path, columns=None)
        for col in DIRECTION_COLUMNS:
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (direction table)")
        cols = [*DIRECTION_COLUMNS] + (
            ["cos_prev_layer"] if "cos_prev_layer" in table.column_names else []
        )
        df = pl.from_arrow(table.select(cols))
        if "cos_prev_layer" not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("cos_prev_layer"))
        frames.append(
            df.with_columns(
                pl.lit(str(meta["arm"])).alias("arm"),
                pl.lit(int(meta["step"]), dtype=pl.Int32).alias("step"),
                pl.col("layer").cast(pl.Int32),
                pl.col("position").cast(pl.Int32),
                pl.col("norm").cast(pl.Float64),
                pl.col("cos_prev_layer").cast(pl.Float64),
            ).select(["arm", "step", "layer", "position", "norm", "cos_prev_layer"])
        )
    if not frames:
        return pl.DataFrame(
            schema={
                "arm": pl.String,
                "step": pl.Int32,
                "layer": pl.Int32,
                "position": pl.Int32,
                "norm": pl.Float64,
                "cos_prev_layer": pl.Float64,
            }
        )
    return pl.concat(frames, how="vertical")


def last_position(directions: pl.DataFrame) -> pl.DataFrame:
    """Rows at each file's last position: the largest index (-1 when positions count back
    from the end of the prompt, the final index when they count forward)."""
    return directions.filter(pl.col("position") == pl.col("position").max().over(["arm", "step"]))


# --- the wide table -----------------------------------------------------------------


def _metric_names(metrics: pl.DataFrame) -> pl.DataFrame:
    """Column stem per row: ``benchmark.metric``, plus ``@judge`` where judges collide."""
    judges = metrics.group_by(["benchmark", "metric"]).agg(pl.col("judge").n_unique().alias("j"))
    m = metrics.join(judges, on=["benchmark", "metric"])
    stem = pl.col("benchmark") + "." + pl.col("metric")
    # The utility audit's rows (rgeom.utility_shift) are named by metric alone: utility_kl.
    stem = pl.when(pl.col("benchmark") == UTILITY_SHIFT).then(pl.col("metric")).otherwise(stem)
    return m.with_columns(
        pl.when(pl.col("j") > 1).then(stem + "@" + pl.col("judge")).otherwise(stem).alias("column")
    ).drop("j")


def summary_frame(metrics: pl.DataFrame, directions: pl.DataFrame) -> pl.DataFrame:
    """One row per (arm, step); metric columns value/_ci_low/_ci_high/_n, then geometry."""
    keys = pl.concat(
        [metrics.select(["arm", "step"]), directions.select(["arm", "step"])], how="vertical"
    ).unique()
    out = keys.sort(["arm", "step"])
    if not metrics.is_empty():
        named = _metric_names(metrics)
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


# --- figures ------------------------------------------------------------------------


def plot_metrics(metrics: pl.DataFrame, arms: list[str], stem: Path, formats) -> list[Path]:
    named = _metric_names(metrics).filter(pl.col("metric").is_in(MAIN_METRICS))
    if named.is_empty():
        return []
    rank = {m: i for i, m in enumerate(MAIN_METRICS)}
    panels = sorted(
        named.select(["column", "metric", "benchmark"]).unique().rows(),
        key=lambda r: (rank[r[1]], r[2], r[0]),
    )
    fig, axes = _figure(len(panels))
    for ax, (column, metric, _bench) in zip(axes, panels, strict=True):
        sub = named.filter(pl.col("column") == column)
        for arm in arms:
            d = sub.filter(pl.col("arm") == arm).sort("step")
            if d.is_empty():
                continue
            style = arm_style(arm, arms)
            x = d.get_column("step").to_numpy()
            ax.plot(x, d.get_column("value").to_numpy(), label=arm, **style, markersize=4)
            lo = d.get_column("ci_low").to_numpy().astype(float)
            hi = d.get_column("ci_high").to_numpy().astype(float)
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=style["color"], alpha=0.2, linewidth=0)
        ax.set_title(column)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(title="arm", fontsize="small")
    return _save(fig, stem, formats)


def plot_direction_heatmap(
    directions: pl.DataFrame, arms: list[str], stem: Path, formats
) -> list[Path]:
    last = last_position(directions)
    if last.is_empty():
        return []
    present = [a for a in arms if a in set(last.get_column("arm").to_list())]
    fig, axes = _figure(len(present), width=4.6, height=3.6)
    vmin, vmax = float(last.get_column("norm").min()), float(last.get_column("norm").max())
    layers = sorted(set(last.get_column("layer").to_list()))
    image = None
    for ax, arm in zip(axes, present, strict=True):
        d = last.filter(pl.col("arm") == arm)
        steps = sorted(set(d.get_column("step").to_list()))
        grid = np.full((len(layers), len(steps)), np.nan)
        li = {v: i for i, v in enumerate(layers)}
        si = {v: i for i, v in enumerate(steps)}
        for layer, step, norm in d.select(["layer", "step", "norm"]).iter_rows():
            grid[li[layer], si[step]] = norm
        # One colour scale for all panels so arms compare directly.
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45)
        ticks = range(0, len(layers), max(1, len(layers) // 8))
        ax.set_yticks(list(ticks), [str(layers[i]) for i in ticks])
        ax.set_title(f"{arm}: direction norm (last position)")
        ax.set_xlabel("training step")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="||mean(harmful) - mean(harmless)||")
    return _save(fig, stem, formats)


def _is_loss(name: str) -> bool:
    return name == "loss" or "loss" in name.split("_") or name.endswith("loss")


def read_train_logs(paths: Sequence[str]) -> pl.DataFrame:
    """(arm, step, loss, other loss terms) from training logs; loss terms logged in the
    JSON ``extra`` column (R2D2's away/toward/utility losses) become columns of their own."""
    frames = []
    for path in paths:
        meta = read_meta(path)
        table = read_table(path)
        for col in ("step", "loss"):
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (training log)")
        arm = meta.get("arm")
        if arm is None:
            raise RgeomError(f"{path}: provenance lacks 'arm' (training log)")
        records = table.to_pylist()
        rows = []
        for i, rec in enumerate(records):
            row = {"step": int(rec["step"])}
            for key, value in rec.items():
                if key != "step" and _is_loss(key) and isinstance(value, int | float):
                    row[key] = float(value)
            if rec.get("extra"):
                try:
                    extra = json.loads(rec["extra"])
                except json.JSONDecodeError as exc:
                    raise RgeomError(f"{path}: row {i}: column 'extra' is not JSON") from exc
                for key, value in extra.items():
                    if _is_loss(key) and isinstance(value, int | float) and key not in row:
                        row[key] = float(value)
            rows.append(row)
        df = pl.DataFrame(rows, infer_schema_length=None)
        frames.append(df.with_columns(pl.lit(str(arm)).alias("arm")))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def plot_train_loss(logs: pl.DataFrame, arms: list[str], stem: Path, formats) -> list[Path]:
    if logs.is_empty():
        return []
    losses = ["loss"] + sorted(c for c in logs.columns if c not in ("loss", "step", "arm"))
    fig, axes = _figure(len(losses))
    seen = sorted(set(logs.get_column("arm").to_list()))
    order = [a for a in arms if a in seen] + [a for a in seen if a not in arms]
    for ax, loss in zip(axes, losses, strict=True):
        for arm in order:
            d = logs.filter(
                (pl.col("arm") == arm) & pl.col(loss).is_not_null() & pl.col(loss).is_not_nan()
            ).sort("step")
            if d.is_empty():
                continue
            style = arm_style(arm, order)
            ax.plot(
                d.get_column("step").to_numpy(),
                d.get_column(loss).to_numpy(),
                label=arm,
                color=style["color"],
                linewidth=1.2,
            )
        ax.set_title(loss)
        ax.set_xlabel("training step")
        ax.set_ylabel(loss.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(title="arm", fontsize="small")
    return _save(fig, stem, formats)


# --- entry points -------------------------------------------------------------------


def build_summary(
    metrics: list[str],
    directions: list[str],
    out_dir: str,
    params: dict[str, Any],
    meta: dict[str, Any],
    train_logs: list[str] | None = None,
    utility_shift: list[str] | None = None,
    carriers: list[str] | None = None,
    drift_dir: str | None = None,
    interventions: str | None = None,
    validation: str | None = None,
) -> None:
    """Write summary.parquet/.csv/.md, tables/ and figures/ under ``out_dir``.

    ``validation`` (validate_judges' agreement table) joins the judges table, which always
    lists each metrics judge's validity beside the numbers it produced.

    ``utility_shift`` tables (metrics format) add the columns utility_kl / utility_ce.
    ``carriers`` (every cell's carrier table), ``drift_dir`` (drift.parquet, angles.parquet,
    verdict.parquet) and ``interventions`` (the all-cells table) add the geometry,
    interventions and verdict tables and their figures.
    """
    from rgeom import figures, tables

    if not metrics and not directions and not utility_shift:
        raise RgeomError("summary: no metrics or direction files given")
    formats = _formats(params)
    m = read_metrics([*metrics, *(utility_shift or [])])
    d = read_directions(directions)
    arms = _arms(params, m.get_column("arm").to_list() + d.get_column("arm").to_list())
    m, d = _expand_base(m, arms), _expand_base(d, arms)
    frame = summary_frame(m, d)
    schema = summary_schema(frame)
    out = Path(out_dir)
    drift = Path(drift_dir) if drift_dir else None
    record = {
        **meta,
        "arms": arms,
        "inputs": {
            "metrics": [str(p) for p in metrics],
            "directions": [str(p) for p in directions],
            "train_logs": [str(p) for p in train_logs or []],
            "utility_shift": [str(p) for p in utility_shift or []],
            "carriers": [str(p) for p in carriers or []],
            "drift_dir": str(drift) if drift else None,
            "interventions": str(interventions) if interventions else None,
            "validation": str(validation) if validation else None,
        },
    }
    write_table(out / f"{SUMMARY_NAME}.parquet", frame.to_arrow(), schema, record)
    with atomic_path(out / f"{SUMMARY_NAME}.csv", suffix=".csv") as tmp:
        frame.write_csv(tmp, float_precision=6)
    write_text(out / f"{SUMMARY_NAME}.md", markdown_table(frame))

    paper = [tables.behaviour_table(_metric_names(m), params)] if not m.is_empty() else []
    if drift is not None:
        paper.append(
            tables.geometry_table(
                str(drift / "drift.parquet"), carriers or [], interventions, params
            )
        )
    if interventions:
        paper.append(tables.interventions_table(interventions, arms))
    if drift is not None:
        paper.append(tables.verdict_table(str(drift / "verdict.parquet")))
    paper.append(tables.judges_table(m, metrics, validation))
    tables.write_tables(paper, out / tables.TABLES_DIR, record)

    figs = out / FIGURES
    drawn: list[Path] = []
    if not m.is_empty():
        drawn += plot_metrics(m, arms, figs / "metrics_vs_step", formats)
        drawn += figures.behaviour_figures(m, arms, params, figs, formats)
    if not d.is_empty():
        drawn += plot_direction_heatmap(d, arms, figs / "direction_norm_heatmap", formats)
    if train_logs:
        drawn += plot_train_loss(read_train_logs(train_logs), arms, figs / "train_loss", formats)
    if carriers:
        cells = tables.read_carriers(carriers)
        drawn += figures.plot_carrier_heatmaps(cells, arms, figs / "carrier_heatmaps", formats)
    if drift is not None:
        table = str(drift / "drift.parquet")
        drawn += figures.plot_carrier_layers(table, arms, figs / "carrier_layer_vs_step", formats)
        drawn += figures.plot_erank(table, arms, params, figs / "erank_vs_step", formats)
        angles = str(drift / "angles.parquet")
        drawn += figures.plot_angles(angles, arms, figs / "principal_angles", formats)
    if interventions:
        drawn += figures.plot_frontiers(interventions, arms, figs, formats)
    for name in [*REPORT_FIGURES, *(f"frontier_{a}" for a in arms)]:
        if figs / f"{name}.png" not in drawn:
            figures.placeholder(figs / name, formats, f"{name}: this run has no input for it")


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


def summary_cmd(
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

    build_summary(
        metrics=metrics,
        directions=directions,
        out_dir=out_dir,
        params=params,
        meta=provenance(config_hash=config_hash(params), seed=params.get("seed")),
        train_logs=train_logs or None,
        utility_shift=utility_shift or None,
        carriers=carriers or None,
        drift_dir=drift_dir,
        interventions=interventions,
        validation=validation,
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
