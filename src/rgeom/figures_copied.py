"""The drift and interventions stages' figures in the summary: copied from the stage's
folder while they are as new as the table they were drawn from, else redrawn from that
table by the stage's own plotting function, so every figure of the HTML report comes from
the summary job.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from rgeom.causal_summary import plot_frontier
from rgeom.drift_figures import plot_angle_matrix, plot_carrier_layers
from rgeom.io import atomic_path, read_meta, read_table
from rgeom.layout import BASE


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


def plot_drift_carrier_layers(drift: str, arms: Sequence[str], stem: Path, formats) -> list[Path]:
    """rgeom.drift's carrier layer per anchor, redrawn from drift.parquet (the path)."""
    source = Path(drift).parent / "figures" / "carrier_layer_vs_step"
    reused = _reuse(source, drift, stem, formats)
    if reused:
        return reused
    table = read_table(drift)
    n_layers = read_meta(drift).get("n_layers")
    if n_layers is None:
        n_layers = 1 + max(v for v in table.column("ref_layer").to_pylist() if v is not None)
    return plot_carrier_layers(table, list(arms), int(n_layers), stem, formats)


def plot_frontiers(interventions: str, arms: Sequence[str], out: Path, formats) -> list[Path]:
    table = None
    paths = []
    for arm in arms:
        stem = out / f"frontier_{arm}"
        reused = _reuse(Path(interventions).parent / stem.name, interventions, stem, formats)
        if reused:
            paths += reused
            continue
        table = read_table(interventions) if table is None else table
        paths += plot_frontier(table, arm, stem, formats)
    return paths
