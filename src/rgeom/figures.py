"""The summary's figures: behaviour and training curves, direction and carrier heatmaps, and
the effective rank, in the one look of rgeom.plotstyle. The drift and interventions stages'
own figures are copied in, or redrawn from their tables (rgeom.figures_copied), so every
figure of the HTML report comes from one job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from rgeom import plotstyle
from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.figures_copied import plot_angles, plot_drift_carrier_layers, plot_frontiers
from rgeom.io import read_meta, read_table
from rgeom.layout import BASE
from rgeom.plotstyle import arm_style, new_figure
from rgeom.summary_inputs import last_position, metric_names
from rgeom.tables_paper import PAPER_REFERENCE, is_paper_config, paper_value

# Re-exported: the summary reaches every figure through this module.
__all__ = [
    "ERANK_MIN_SPAN",
    "MAIN_METRICS",
    "STEP_LABEL",
    "behaviour_figures",
    "placeholder",
    "plot_angles",
    "plot_asr",
    "plot_carrier_heatmaps",
    "plot_direction_heatmap",
    "plot_drift_carrier_layers",
    "plot_erank",
    "plot_frontiers",
    "plot_metrics",
    "plot_robustness_utility",
    "plot_train_loss",
    "plot_xstest",
]

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
STEP_LABEL = "training step (optimizer steps)"


# --- behaviour ----------------------------------------------------------------------


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
    fig, axes = new_figure(len(present))
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
    return plotstyle.save_figure(fig, stem, formats)


def plot_metrics(metrics: pl.DataFrame, arms: list[str], stem: Path, formats) -> list[Path]:
    named = metric_names(metrics).filter(pl.col("metric").is_in(MAIN_METRICS))
    if named.is_empty():
        return []
    rank = {m: i for i, m in enumerate(MAIN_METRICS)}
    panels = sorted(
        named.select(["column", "metric", "benchmark"]).unique().rows(),
        key=lambda r: (rank[r[1]], r[2], r[0]),
    )
    fig, axes = new_figure(len(panels))
    for ax, (column, metric, _bench) in zip(axes, panels, strict=True):
        sub = named.filter(pl.col("column") == column)
        for arm in arms:
            d = sub.filter(pl.col("arm") == arm)
            if not d.is_empty():
                _curve(ax, d, arm, arms)
        ax.set_title(column)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(title="arm", fontsize="small")
    return plotstyle.save_figure(fig, stem, formats)


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
    fig, axes = new_figure(len(utilities), width=4.8, height=3.8)
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
    return plotstyle.save_figure(fig, stem, formats)


def behaviour_figures(metrics: pl.DataFrame, arms, params, out: Path, formats) -> list[Path]:
    named = metric_names(metrics)
    return [
        *plot_asr(named, arms, params, out / "asr_vs_step", formats),
        *plot_xstest(named, arms, params, out / "xstest_vs_step", formats),
        *plot_robustness_utility(named, arms, out / "robustness_utility", formats),
    ]


# --- directions and carriers --------------------------------------------------------


def plot_direction_heatmap(
    directions: pl.DataFrame, arms: list[str], stem: Path, formats
) -> list[Path]:
    last = last_position(directions)
    if last.is_empty():
        return []
    present = [a for a in arms if a in set(last.get_column("arm").to_list())]
    fig, axes = new_figure(len(present), width=4.6, height=3.6)
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
    return plotstyle.save_figure(fig, stem, formats)


# (score, colour-bar label, colour map) of each column of the carrier heatmaps.
_CARRIER_SCORES = (
    ("bypass", "bypass: refusal score after ablation (log-odds)", "PuOr_r"),
    ("induce", "induce: refusal score after addition (log-odds)", "PuOr_r"),
    ("kl", "KL on harmless prompts (nats)", "viridis"),
)


def _cells_by_arm(
    cells: Mapping[tuple[str, int], list[dict]], arms: Sequence[str]
) -> dict[str, dict[int, list[dict]]]:
    """arm -> step -> carrier candidates, step 0's base cell shared by every arm."""
    by_arm: dict[str, dict[int, list[dict]]] = {}
    for arm in arms:
        for (a, step), rows in cells.items():
            if a in (arm, BASE):
                by_arm.setdefault(arm, {})[step] = rows
    return by_arm


def _finite(by_arm: Mapping[str, Mapping[int, list[dict]]], score: str) -> list[float]:
    return [
        c[score]
        for steps in by_arm.values()
        for rows in steps.values()
        for c in rows
        if c[score] is not None and math.isfinite(c[score])
    ]


def _carrier_panel(
    ax,
    title: str,
    by_step: Mapping[int, list[dict]],
    layers: Sequence[int],
    score: str,
    colour: Mapping[str, Any],
):
    """One arm's layer x anchor heatmap of ``score``, coloured by ``colour`` (imshow's
    colour arguments); dots mark admissible candidates, a star the carrier."""
    steps = sorted(by_step)
    grid = np.full((len(layers), len(steps)), np.nan)
    li = {v: k for k, v in enumerate(layers)}
    for si, step in enumerate(steps):
        for c in by_step[step]:
            v = c[score]
            if v is not None and math.isfinite(v):
                grid[li[int(c["layer"])], si] = v
            if c["admissible"]:
                ax.plot(si, li[int(c["layer"])], "o", color="white", mec="black", ms=3)
            if c["is_carrier"]:
                ax.plot(si, li[int(c["layer"])], "*", color="white", mec="black", ms=9)
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", **colour)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("layer (block input)")
    ax.set_title(title)
    return image


def plot_carrier_heatmaps(
    cells: Mapping[tuple[str, int], list[dict]], arms: Sequence[str], stem: Path, formats
) -> list[Path]:
    """Layer x anchor heatmaps of bypass, induce and KL per arm (rows: arms). Dots mark
    admissible candidates, a star the carrier."""
    from matplotlib.colors import TwoSlopeNorm

    if not cells:
        return []
    layers = sorted({int(c["layer"]) for rows in cells.values() for c in rows})
    by_arm = _cells_by_arm(cells, arms)
    present = [a for a in arms if a in by_arm]
    if not present:
        return []
    fig, axes = new_figure(3 * len(present), width=3.8, height=3.2)
    grid_axes = np.asarray(axes).reshape(len(present), 3)
    # bypass and induce share one diverging scale about 0 (refusal above, compliance
    # below), so a colour means the same log-odds in both panels and in every arm.
    refusal = _finite(by_arm, "bypass") + _finite(by_arm, "induce")
    span = max((abs(v) for v in refusal), default=0.0) or 1e-9
    shared = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    for j, (score, label, cmap) in enumerate(_CARRIER_SCORES):
        values = _finite(by_arm, score)
        if not values:
            continue
        if score == "kl":
            hi = max(values)
            colour = {"cmap": cmap, "norm": None, "vmin": 0.0, "vmax": hi if hi > 0 else 1.0}
        else:
            colour = {"cmap": cmap, "norm": shared}
        image = None
        for i, arm in enumerate(present):
            title = f"{arm}: {score}"
            image = _carrier_panel(grid_axes[i, j], title, by_arm[arm], layers, score, colour)
        fig.colorbar(image, ax=list(grid_axes[:, j]), label=label, shrink=0.9)
    return plotstyle.save_figure(fig, stem, formats)


# --- effective rank -----------------------------------------------------------------


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
    kind = (read_meta(drift).get("drift") or {}).get("rank_kind", schema_default("drift.rank_kind"))
    needed = [f"erank_{kind}", "erank_ci_low", "erank_ci_high", "erank_null_mean", "erank_null_sd"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise RgeomError(f"{drift}: missing column(s) {', '.join(missing)} (drift table)")

    def col(d: pl.DataFrame, name: str, fill: float = np.nan) -> np.ndarray:
        return d.get_column(name).cast(pl.Float64).fill_null(fill).to_numpy()

    fig, (ax,) = new_figure(1, width=5.0, height=3.6)
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
    return plotstyle.save_figure(fig, stem, formats)


# --- training and placeholders ------------------------------------------------------


def plot_train_loss(logs: pl.DataFrame, arms: list[str], stem: Path, formats) -> list[Path]:
    if logs.is_empty():
        return []
    losses = ["loss"] + sorted(c for c in logs.columns if c not in ("loss", "step", "arm"))
    fig, axes = new_figure(len(losses))
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
    return plotstyle.save_figure(fig, stem, formats)


def placeholder(stem: Path, formats, message: str) -> list[Path]:
    """A figure that says why it is empty (e.g. XSTest not among the benchmarks)."""
    fig, (ax,) = new_figure(1, width=5.0, height=1.6)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return plotstyle.save_figure(fig, stem, formats)
