"""rgeom.drift's figures: the carrier layer per anchor, and the angle matrix of every pair
of cells with its bootstrap noise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from rgeom import plotstyle
from rgeom.drift_cells import BASE_ARM, Cell
from rgeom.drift_stats import CellStats, calibrate
from rgeom.plotstyle import arm_style, new_figure


def draw_figures(
    drift: pa.Table,
    arms: list[str],
    n_layers: int,
    cells: Sequence[Cell],
    carrier_angle: Mapping[tuple[str, str], float | None],
    measured: Mapping[str, CellStats],
    figs: Path,
    formats: Sequence[str],
) -> None:
    """carrier_layer_vs_step and principal_angles (with each pair's noise) under ``figs``."""
    plot_carrier_layers(drift, arms, n_layers, figs / "carrier_layer_vs_step", formats)
    # Blocks per arm (base first, then each arm's anchors) read more easily than step order.
    rank = {arm: i for i, arm in enumerate([BASE_ARM, *arms])}
    by_arm = sorted(cells, key=lambda c: (rank.get(c.arm, len(rank)), c.step))
    pair_noise = {
        (a.label, b.label): calibrate(
            carrier_angle.get((a.label, b.label)),
            measured[a.label].noise_line,
            measured[b.label].noise_line,
        )[0]
        for a in by_arm
        for b in by_arm
        if a is not b
    }
    plot_angle_matrix(by_arm, carrier_angle, figs / "principal_angles", formats, pair_noise)


def plot_carrier_layers(drift: pa.Table, arms: list[str], n_layers: int, stem: Path, formats):
    """Carrier layer per anchor where a candidate was admissible; crosses on the "none" row
    below the layers where none was (as the geometry table's carrier column says). The
    max-norm reference layer is not drawn: it is no carrier, and at 29 it read as one."""
    fig, (ax,) = new_figure(1, width=5.0, height=3.4)
    rows = drift.to_pylist()
    none_y = -1.5
    for arm in arms:
        d = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["step"])
        style = arm_style(arm, arms)
        x = [r["step"] for r in d]
        y = [r["carrier_layer"] if r["carrier_layer"] is not None else math.nan for r in d]
        ax.plot(x, y, label=arm, color=style["color"], marker=style["marker"], markersize=5)
        missing = [r["step"] for r in d if r["carrier_layer"] is None]
        if missing:
            ax.scatter(missing, [none_y] * len(missing), color=style["color"], marker="x", s=40)
    ax.axhline(-0.75, color="grey", linewidth=0.8)
    ax.set_ylim(none_y - 0.75, n_layers - 0.5)
    ticks = [t for t in ax.get_yticks() if 0 <= t <= n_layers - 1 and float(t).is_integer()]
    ax.set_yticks([none_y, *ticks], ["none", *(str(int(t)) for t in ticks)])
    ax.set_xlabel("training step")
    ax.set_ylabel("carrier layer")
    ax.set_title("carrier layer (x on 'none': no admissible carrier)")
    ax.grid(alpha=0.3)
    ax.legend(title="arm", fontsize="small")
    return plotstyle.save_figure(fig, stem, formats)


def plot_angle_matrix(
    cells: Sequence[Cell],
    angle: Mapping[tuple[str, str], float | None],
    stem: Path,
    formats,
    noise: Mapping[tuple[str, str], float | None] | None = None,
):
    """Principal angle (degrees) between the reference directions of every pair of cells.

    With ``noise`` (the pair's bootstrap-noise angle, :func:`calibrate`) each cell shows
    angle / noise, and a cell whose angle is within its noise is hatched and greyed: a
    30-degree angle with a 35-degree noise band is no evidence of drift.
    """
    from matplotlib.patches import Rectangle

    noise = noise or {}
    labels = [c.label for c in cells]
    n = len(labels)
    grid = np.zeros((n, n))
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if i != j:
                v = angle.get((a, b))
                grid[i, j] = math.nan if v is None else v
    fig, (ax,) = new_figure(1, width=max(3.6, 0.7 * n + 2), height=max(3.0, 0.7 * n + 1.5))
    image = ax.imshow(grid, cmap="magma", vmin=0, vmax=90, interpolation="nearest")
    unresolved = 0
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            v, e = grid[i, j], noise.get((a, b))
            if i == j or not math.isfinite(v) or e is None or not math.isfinite(e):
                continue
            within = v <= e
            unresolved += within
            if within:
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.5", hatch="///"
                    )
                )
            ax.text(
                j,
                i,
                f"{v:.0f}\n±{e:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="0.3" if within else ("black" if v > 55 else "white"),
            )
    ax.set_xticks(range(n), labels, rotation=60, ha="right")
    ax.set_yticks(range(n), labels)
    title = "angle between reference directions"
    if noise:
        title += "\n(cell: angle / noise; hatched: within bootstrap noise)"
    ax.set_title(title, fontsize="small")
    fig.colorbar(image, ax=ax, label="principal angle (deg)")
    return plotstyle.save_figure(fig, stem, formats)
