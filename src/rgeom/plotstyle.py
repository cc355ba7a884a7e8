"""The look of every rgeom figure, shared by the summary, drift and intervention plots.

Figures use matplotlib's object API (no pyplot, no global backend switch) with the Agg
canvas, so plotting never needs a display and never leaks figures; files carry no
timestamps, so reruns give identical bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.io import atomic_path
from rgeom.layout import BASE

# Okabe-Ito: distinguishable under the common colour-vision deficiencies. Known arms get
# fixed colours so figures of different runs compare at a glance.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
ARM_COLOURS = {BASE: "#000000", "sft": OKABE_ITO[0], "r2d2": OKABE_ITO[1]}
ARM_MARKERS = {BASE: "s", "sft": "o", "r2d2": "^"}
_OTHER_MARKERS = ("D", "v", "P", "X", "*")
FIGURE_FORMATS = ("png", "svg", "pdf")


def arm_style(arm: str, arms: Sequence[str]) -> dict[str, Any]:
    """Colour and marker of ``arm``: fixed for known arms, else by its rank in ``arms``."""
    if arm in ARM_COLOURS:
        return {"color": ARM_COLOURS[arm], "marker": ARM_MARKERS[arm]}
    others = [a for a in sorted(arms) if a not in ARM_COLOURS]
    i = others.index(arm) if arm in others else len(others)
    return {
        "color": OKABE_ITO[2 + i % (len(OKABE_ITO) - 2)],
        "marker": _OTHER_MARKERS[i % len(_OTHER_MARKERS)],
    }


def figure_formats(params: Mapping[str, Any]) -> list[str]:
    """PNG (the report embeds it) and SVG (for papers) always, plus any other configured."""
    # The workflow nests report settings under "summary"; direct callers may pass them flat.
    section = params.get("summary") or {}
    flat = params.get("figure_formats", schema_default("summary.figure_formats"))
    formats = list(section.get("figure_formats", flat))
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad:
        raise RgeomError(f"summary.figure_formats: {bad} not supported (use {FIGURE_FORMATS})")
    return ["png", "svg", *(f for f in dict.fromkeys(formats) if f not in ("png", "svg"))]


def style(fig) -> None:
    """The one look of every rgeom figure, applied at save time so figures built elsewhere
    (rgeom.drift, rgeom.causal) share it without a global rcParams change."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if hasattr(ax, "_colorbar"):
            continue
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.tick_params(labelsize="small")
        ax.xaxis.label.set_size("small")
        ax.yaxis.label.set_size("small")
        ax.title.set_size("medium")
        if not ax.images:
            ax.grid(True, alpha=0.3, linewidth=0.6)
            if ax.get_xlabel().startswith("training step"):
                # Steps are whole optimizer steps: no 0.5 ticks on short runs.
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, stem: Path, formats: Sequence[str]) -> list[Path]:
    from matplotlib import rc_context

    style(fig)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        # No timestamps or version strings in the files: reruns give identical bytes.
        metadata = {
            "png": {"Software": None},
            "svg": {"Date": None, "Creator": None},
            "pdf": {"CreationDate": None, "Creator": None, "Producer": None},
        }[fmt]
        # A fixed salt for the SVG's clip-path ids, which matplotlib otherwise draws at random.
        with atomic_path(path, suffix=f".{fmt}") as tmp, rc_context({"svg.hashsalt": "rgeom"}):
            fig.savefig(tmp, format=fmt, dpi=120, metadata=metadata, bbox_inches="tight")
        paths.append(path)
    return paths


def new_figure(n_panels: int, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]
