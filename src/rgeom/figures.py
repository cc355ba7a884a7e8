"""The report's paper-style figures. They share rgeom.report's figure factory, save helper
(PNG + SVG, one style) and arm colours with the figures of rgeom.drift and rgeom.causal.
Those stages' figures are copied into the summary (redrawn from their Parquet tables where a
copy is missing or stale), so every figure of the HTML report comes from one job.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl

from rgeom.errors import RgeomError
from rgeom.io import atomic_path, read_meta, read_table
from rgeom.layout import BASE
from rgeom.report import _figure, _metric_names, _save, arm_style
from rgeom.tables import PAPER_REFERENCE, is_paper_config, paper_value

STEP_LABEL = "training step (optimizer steps)"


def _curve(ax, d: pl.DataFrame, arm: str, arms: Sequence[str], label: str | None = None):
    """One arm's value-vs-step line with its 95% interval as a band."""
    style = arm_style(arm, arms)
    d = d.sort("step")
    x = d.get_column("step").to_numpy()
    ax.plot(x, d.get_column("value").to_numpy(), label=label or arm, markersize=4, **style)
    lo = d.get_column("ci_low").to_numpy().astype(float)
    hi = d.get_column("ci_high").to_numpy().astype(float)
    if np.isfinite(lo).any():
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.2, linewidth=0)


def _paper_points(ax, column: str, arms: Sequence[str], params: Mapping[str, Any]) -> bool:
    """The paper's numbers for ``column`` as hollow markers (ranges as bars); only when the
    run uses the paper's anchors."""
    if not is_paper_config(params) or column not in PAPER_REFERENCE:
        return False
    drawn = False
    for arm in arms:
        style = arm_style(arm, arms)
        for step in params["anchors"]:
            ref = paper_value(column, arm, step)
            if ref is None:
                continue
            high = ref.high if ref.high is not None else ref.low
            ax.errorbar(
                [step],
                [(ref.low + high) / 2],
                yerr=[[(high - ref.low) / 2], [(high - ref.low) / 2]],
                marker=style["marker"],
                mfc="none",
                mec=style["color"],
                ecolor=style["color"],
                linestyle="none",
                markersize=7,
            )
            drawn = True
    return drawn


def _panels(
    named: pl.DataFrame,
    columns: Sequence[tuple[str, str]],
    arms: Sequence[str],
    params: Mapping[str, Any],
    ylabel: str,
    stem: Path,
    formats,
) -> list[Path]:
    present = [(c, t) for c, t in columns if c in set(named.get_column("column").to_list())]
    if not present:
        return []
    fig, axes = _figure(len(present))
    paper = False
    for ax, (column, title) in zip(axes, present, strict=True):
        sub = named.filter(pl.col("column") == column)
        for arm in arms:
            d = sub.filter(pl.col("arm") == arm)
            if not d.is_empty():
                _curve(ax, d, arm, arms)
        paper |= _paper_points(ax, column.split("@")[0], arms, params)
        ax.set_title(title)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.03, 1.03)
    axes[0].legend(title="arm", fontsize="small")
    if paper:
        fig.suptitle("lines: this run (band: 95% CI); hollow markers: the paper")
    return _save(fig, stem, formats)


def plot_asr(named: pl.DataFrame, arms, params, stem: Path, formats) -> list[Path]:
    """ASR vs step, one panel per fixed-source method (and all methods), plus adaptive GCG."""
    stems = sorted(set(named.get_column("column").to_list()))
    columns = [(s, "HarmBench, all methods") for s in stems if s.split("@")[0] == "harmbench.asr"]
    columns += [
        (s, "HarmBench, judge-corrected (Rogan–Gladen)")
        for s in stems
        if s.split("@")[0] == "harmbench.asr_corrected"
    ]
    columns += [
        (s, f"HarmBench, {s.split('/', 1)[1]}") for s in stems if s.startswith("harmbench.asr/")
    ]
    columns += [(s, "adaptive GCG") for s in stems if s.split("@")[0] == "adaptive_gcg.asr"]
    return _panels(named, columns, arms, params, "ASR (fraction of behaviours)", stem, formats)


def plot_xstest(named: pl.DataFrame, arms, params, stem: Path, formats) -> list[Path]:
    stems = sorted(set(named.get_column("column").to_list()))
    columns = []
    for metric, title in (
        ("xstest_any_refusal", "any refusal (full + partial)"),
        ("xstest_any_refusal_corrected", "any refusal, judge-corrected"),
        ("xstest_full_refusal", "full refusal"),
        ("xstest_partial_refusal", "partial refusal"),
    ):
        columns += [
            (s, f"XSTest safe prompts: {title}")
            for s in stems
            if s.split("@")[0].endswith("." + metric)
        ]
    return _panels(
        named, columns, arms, params, "refusal rate (fraction of safe prompts)", stem, formats
    )


def plot_robustness_utility(named: pl.DataFrame, arms, stem: Path, formats) -> list[Path]:
    """ASR against utility (accuracy; KL to the base where measured), one point per anchor
    labelled by its step, joined in step order per arm."""
    stems = set(named.get_column("column").to_list())
    asr = next((s for s in sorted(stems) if s.split("@")[0] == "harmbench.asr"), None)
    if asr is None:
        return []
    utilities = [
        (s, label)
        for s, label in (
            ("utility.utility_accuracy", "utility accuracy (fraction correct, higher is better)"),
            ("utility_kl", "KL(base || checkpoint) on harmless answers (nats/token)"),
        )
        if s in stems
    ]
    if not utilities:
        return []
    fig, axes = _figure(len(utilities), width=4.8, height=3.8)
    y_all = named.filter(pl.col("column") == asr).select(
        "arm", "step", pl.col("value").alias("asr")
    )
    for ax, (column, xlabel) in zip(axes, utilities, strict=True):
        x_all = named.filter(pl.col("column") == column).select(
            "arm", "step", pl.col("value").alias("utility")
        )
        both = x_all.join(y_all, on=["arm", "step"]).sort(["arm", "step"])
        for arm in arms:
            d = both.filter(pl.col("arm") == arm)
            if d.is_empty():
                continue
            style = arm_style(arm, arms)
            x, y = d.get_column("utility").to_numpy(), d.get_column("asr").to_numpy()
            ax.plot(x, y, label=arm, markersize=5, **style)
            for step, xi, yi in zip(d.get_column("step").to_list(), x, y, strict=True):
                ax.annotate(
                    str(step),
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                    color=style["color"],
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("HarmBench ASR (fraction of behaviours)")
        ax.set_ylim(-0.03, 1.03)
    axes[0].legend(title="arm (labels: step)", fontsize="small")
    fig.suptitle("robustness vs utility: lower is more robust")
    return _save(fig, stem, formats)


def plot_carrier_heatmaps(
    cells: Mapping[tuple[str, int], list[dict]], arms: Sequence[str], stem: Path, formats
) -> list[Path]:
    """Layer x anchor heatmaps of bypass, induce and KL per arm (rows: arms). Dots mark
    admissible candidates, a star the carrier."""
    from matplotlib.colors import TwoSlopeNorm

    if not cells:
        return []
    layers = sorted({int(c["layer"]) for rows in cells.values() for c in rows})
    by_arm: dict[str, dict[int, list[dict]]] = {}
    for arm in arms:
        for (a, step), rows in cells.items():
            if a in (arm, BASE):
                by_arm.setdefault(arm, {})[step] = rows
    present = [a for a in arms if a in by_arm]
    if not present:
        return []
    scores = (
        ("bypass", "bypass: refusal score after ablation (log-odds)", "PuOr_r"),
        ("induce", "induce: refusal score after addition (log-odds)", "PuOr_r"),
        ("kl", "KL on harmless prompts (nats)", "viridis"),
    )
    fig, axes = _figure(3 * len(present), width=3.8, height=3.2)
    grid_axes = np.asarray(axes).reshape(len(present), 3)

    def finite(score: str) -> list[float]:
        return [
            c[score]
            for steps in by_arm.values()
            for rows in steps.values()
            for c in rows
            if c[score] is not None and math.isfinite(c[score])
        ]

    # bypass and induce share one diverging scale about 0 (refusal above, compliance
    # below), so a colour means the same log-odds in both panels and in every arm.
    refusal = finite("bypass") + finite("induce")
    span = max((abs(v) for v in refusal), default=0.0) or 1e-9
    shared = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    for j, (score, label, cmap) in enumerate(scores):
        values = finite(score)
        if not values:
            continue
        if score == "kl":
            hi = max(values)
            norm = None
            kw = {"vmin": 0.0, "vmax": hi if hi > 0 else 1.0}
        else:
            norm, kw = shared, {}
        image = None
        for i, arm in enumerate(present):
            ax = grid_axes[i, j]
            steps = sorted(by_arm[arm])
            grid = np.full((len(layers), len(steps)), np.nan)
            li = {v: k for k, v in enumerate(layers)}
            for si, step in enumerate(steps):
                for c in by_arm[arm][step]:
                    v = c[score]
                    if v is not None and math.isfinite(v):
                        grid[li[int(c["layer"])], si] = v
                    if c["admissible"]:
                        ax.plot(si, li[int(c["layer"])], "o", color="white", mec="black", ms=3)
                    if c["is_carrier"]:
                        ax.plot(si, li[int(c["layer"])], "*", color="white", mec="black", ms=9)
            image = ax.imshow(
                grid,
                aspect="auto",
                origin="lower",
                cmap=cmap,
                norm=norm,
                interpolation="nearest",
                **kw,
            )
            ax.set_xticks(range(len(steps)), [str(s) for s in steps])
            ax.set_yticks(range(len(layers)), [str(v) for v in layers])
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel("layer (block input)")
            ax.set_title(f"{arm}: {score}")
        fig.colorbar(image, ax=list(grid_axes[:, j]), label=label, shrink=0.9)
    return _save(fig, stem, formats)


# The y-axis spans at least this many dimensions, so a 0.01 change is not drawn as a cliff.
ERANK_MIN_SPAN = 1.0


def plot_erank(drift: str, arms: Sequence[str], params, stem: Path, formats) -> list[Path]:
    """Effective rank of the adjacent-layer direction window vs step, for the variant the
    drift stage computed its bootstrap band and null for (``drift.rank_kind``): the run's
    value with its 95% band, and the null (mean, dashed; ± 2 sd, hatched) in the same panel.

    Only that variant is drawn: the others have no interval or null spread to put beside
    them, and a bare line reads as more certain than it is (the geometry table lists them).
    """
    df = pl.from_arrow(read_table(drift))
    kind = (read_meta(drift).get("drift") or {}).get("rank_kind", "energy")
    needed = [f"erank_{kind}", "erank_ci_low", "erank_ci_high", "erank_null_mean", "erank_null_sd"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise RgeomError(f"{drift}: missing column(s) {', '.join(missing)} (drift table)")

    def col(d: pl.DataFrame, name: str, fill: float = np.nan) -> np.ndarray:
        return d.get_column(name).cast(pl.Float64).fill_null(fill).to_numpy()

    fig, (ax,) = _figure(1, width=5.0, height=3.6)
    drawn: list[float] = []
    for arm in arms:
        d = df.filter(pl.col("arm") == arm).sort("step")
        if d.is_empty():
            continue
        style = arm_style(arm, arms)
        x = d.get_column("step").to_numpy()
        y, lo, hi = col(d, f"erank_{kind}"), col(d, "erank_ci_low"), col(d, "erank_ci_high")
        mean, sd = col(d, "erank_null_mean"), col(d, "erank_null_sd", 0.0)
        ax.plot(x, y, label=f"{arm} (95% CI band)", markersize=4, **style)
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.2, linewidth=0)
        ax.plot(x, mean, linestyle="--", color=style["color"], linewidth=1)
        ax.fill_between(
            x, mean - 2 * sd, mean + 2 * sd, color=style["color"], alpha=0.08, hatch="//"
        )
        drawn += [*y, *lo, *hi, *(mean - 2 * sd), *(mean + 2 * sd)]
    if kind == "energy" and is_paper_config(params):
        ax.axhline(1.24, color="grey", linestyle=":", label="paper ≈1.24")
        drawn.append(1.24)
    finite = [v for v in drawn if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = max(0.0, ERANK_MIN_SPAN - (high - low)) / 2
        ax.set_ylim(low - pad - 0.05, high + pad + 0.05)
    ax.set_title(f"effective rank ({kind}); dashed: null mean, hatched: null ± 2 sd")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("effective rank (dimensions)")
    ax.legend(title="arm", fontsize="small")
    return _save(fig, stem, formats)


def _reuse(source: Path, table: str, stem: Path, formats) -> list[Path] | None:
    """Copies of a figure the drift or interventions stage already drew from ``table``, in
    every format; None (draw it again) when any is missing or older than the table."""
    sources = [source.with_suffix(f".{fmt}") for fmt in formats]
    newest = Path(table).stat().st_mtime
    if not all(p.exists() and p.stat().st_mtime >= newest for p in sources):
        return None
    out = []
    for src in sources:
        dst = stem.with_suffix(src.suffix)
        with atomic_path(dst, suffix=src.suffix) as tmp:
            shutil.copyfile(src, tmp)
        out.append(dst)
    return out


def plot_angles(angles: str, arms: Sequence[str], stem: Path, formats) -> list[Path]:
    """rgeom.drift's principal-angle matrix, redrawn from angles.parquet (carrier basis)."""
    reused = _reuse(Path(angles).parent / "figures" / "principal_angles", angles, stem, formats)
    if reused:
        return reused
    from rgeom.drift import plot_angle_matrix

    rows = [r for r in read_table(angles).to_pylist() if r["basis"] == "carrier"]
    if not rows:
        return []
    angle: dict[tuple[str, str], float | None] = {}
    noise: dict[tuple[str, str], float | None] = {}
    cells: set[tuple[str, int]] = set()
    for r in rows:
        a, b = (r["arm_a"], r["step_a"]), (r["arm_b"], r["step_b"])
        cells |= {a, b}
        la, lb = f"{a[0]}@{a[1]}", f"{b[0]}@{b[1]}"
        angle[(la, lb)] = angle[(lb, la)] = r["angle_deg"]
        noise[(la, lb)] = noise[(lb, la)] = r.get("noise_deg")
    rank = {arm: i for i, arm in enumerate([BASE, *arms])}
    ordered = sorted(cells, key=lambda c: (rank.get(c[0], len(rank)), c[1]))
    # plot_angle_matrix reads only each cell's label.
    labels = [SimpleNamespace(label=f"{a}@{s}") for a, s in ordered]
    return plot_angle_matrix(labels, angle, stem, formats, noise)


def plot_carrier_layers(drift: str, arms: Sequence[str], stem: Path, formats) -> list[Path]:
    source = Path(drift).parent / "figures" / "carrier_layer_vs_step"
    reused = _reuse(source, drift, stem, formats)
    if reused:
        return reused
    from rgeom.drift import plot_carrier_layers as plot

    table = read_table(drift)
    n_layers = read_meta(drift).get("n_layers")
    if n_layers is None:
        n_layers = 1 + max(v for v in table.column("ref_layer").to_pylist() if v is not None)
    return plot(table, list(arms), int(n_layers), stem, formats)


def plot_frontiers(interventions: str, arms: Sequence[str], out: Path, formats) -> list[Path]:
    table = None
    paths = []
    for arm in arms:
        stem = out / f"frontier_{arm}"
        reused = _reuse(Path(interventions).parent / stem.name, interventions, stem, formats)
        if reused:
            paths += reused
            continue
        # Imported only to redraw: rgeom.causal loads torch, seconds a copy does not need.
        from rgeom.causal import plot_frontier

        table = read_table(interventions) if table is None else table
        paths += plot_frontier(table, arm, stem, formats)
    return paths


def placeholder(stem: Path, formats, message: str) -> list[Path]:
    """A figure that says why it is empty (e.g. XSTest not among the benchmarks)."""
    fig, (ax,) = _figure(1, width=5.0, height=1.6)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, stem, formats)


def behaviour_figures(metrics: pl.DataFrame, arms, params, out: Path, formats) -> list[Path]:
    named = _metric_names(metrics)
    return [
        *plot_asr(named, arms, params, out / "asr_vs_step", formats),
        *plot_xstest(named, arms, params, out / "xstest_vs_step", formats),
        *plot_robustness_utility(named, arms, out / "robustness_utility", formats),
    ]
