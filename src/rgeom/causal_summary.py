"""``rgeom interventions-summary``: every cell's intervention rows in one table, and the
refusal-vs-KL frontier figure per arm (issue #5). Torch-free."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom import plotstyle
from rgeom.errors import RgeomError
from rgeom.io import read_table, write_table
from rgeom.layout import BASE
from rgeom.plotstyle import figure_formats, new_figure
from rgeom.schemas import INTERVENTION_SCHEMA


def interventions_summary(
    tables: Sequence[str | Path], out_dir: str | Path, params: Mapping[str, Any], meta
) -> pa.Table:
    """All cells' intervention rows in one table, and a refusal-vs-KL frontier per arm."""
    if not tables:
        raise RgeomError("interventions-summary: no intervention tables given")
    parts = [
        read_table(p, schema=INTERVENTION_SCHEMA).select(INTERVENTION_SCHEMA.names) for p in tables
    ]
    combined = pa.concat_tables(parts).cast(INTERVENTION_SCHEMA)
    out = Path(out_dir)
    write_table(
        out / "interventions.parquet",
        combined,
        INTERVENTION_SCHEMA,
        {**meta, "inputs": [str(p) for p in tables]},
    )
    arms = list(params.get("arms") or sorted({a for a in combined["arm"].to_pylist()} - {BASE}))
    formats = figure_formats(params)
    for arm in arms:
        plot_frontier(combined, arm, out / f"frontier_{arm}", formats)
    return combined


def plot_frontier(table: pa.Table, arm: str, stem: Path, formats) -> list[Path]:
    """Refusal (score and generated refusal rate) against KL(base || edited), one colour per
    anchor of ``arm`` (the base included); lines join the addition and the rank sweeps.
    Hollow markers: the direction is a fallback, not an admissible carrier."""
    from matplotlib import colormaps

    rows = [r for r in table.to_pylist() if r["arm"] in (arm, BASE)]
    steps = sorted({r["step"] for r in rows})
    cmap = colormaps["viridis"]
    fig, axes = new_figure(2, width=4.6, height=3.6)
    markers = {"none": "o", "ablation": "X", "addition": "^", "subspace_ablation": "s"}
    for ax, metric, label in (
        (axes[0], "refusal_score_harmful", "refusal score, harmful (log-odds)"),
        (axes[1], "refusal_rate", "refusal rate of generations"),
    ):
        for i, step in enumerate(steps):
            colour = cmap(i / max(1, len(steps) - 1))
            cell = [r for r in rows if r["step"] == step]
            for kind, order in (("addition", "coeff"), ("subspace_ablation", "k")):
                sweep = sorted(
                    (r for r in cell if r["intervention"] == kind), key=lambda r: r[order]
                )
                if sweep:
                    ax.plot(
                        [r["kl_harmless"] for r in sweep],
                        [math.nan if r[metric] is None else r[metric] for r in sweep],
                        color=colour,
                        alpha=0.5,
                        linewidth=1,
                    )
            for r in cell:
                y = math.nan if r[metric] is None else r[metric]
                filled = r["admissible"]
                ax.scatter(
                    [r["kl_harmless"]],
                    [y],
                    marker=markers.get(r["intervention"], "o"),
                    facecolors=colour if filled else "none",
                    edgecolors=colour,
                    s=30,
                )
            ax.plot([], [], color=colour, label=f"{cell[0]['arm']}@{step}")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("KL(unedited || edited), harmless, last position")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for kind, marker in markers.items():
        axes[1].scatter([], [], marker=marker, color="grey", label=kind)
    axes[1].legend(fontsize="x-small")
    fallback = any(not r["admissible"] for r in rows)
    fig.suptitle(
        f"{arm}: refusal vs KL"
        + (" (hollow: fallback direction, no admissible carrier)" if fallback else "")
    )
    return plotstyle.save_figure(fig, stem, formats)
