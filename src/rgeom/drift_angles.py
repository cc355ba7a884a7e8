"""Angles between rgeom.drift's cells: angles.parquet (every pair of cells) and the
per-anchor rows of drift.parquet (angles to the previous anchor and to step 0, calibrated
against the cells' bootstrap noise)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rgeom.drift_cells import Cell, sequence
from rgeom.drift_stats import CellStats, calibrate, interval, line_angle, paired_angles
from rgeom.geometry import cosine, principal_angles
from rgeom.schemas import ANGLES_SCHEMA

# Angle between two cells' reference lines (degrees), both orders, keyed by their labels.
CarrierAngles = dict[tuple[str, str], float | None]


@dataclass(frozen=True)
class AnchorLinks:
    """Each non-first anchor's previous anchor and its arm's first anchor (step 0)."""

    prev: dict[str, Cell]
    first: dict[str, Cell]

    @classmethod
    def of(cls, arms: Sequence[str], cells: Sequence[Cell]) -> AnchorLinks:
        prev: dict[str, Cell] = {}
        first: dict[str, Cell] = {}
        for arm in arms:
            seq = sequence(arm, cells)
            for a, b in zip(seq[1:], seq[:-1], strict=True):
                prev[a.label] = b
            for c in seq[1:]:
                first[c.label] = seq[0]
        return cls(prev, first)

    def relation(self, a: Cell, b: Cell) -> str:
        if self.prev.get(a.label) is b:
            return "prev"
        if self.first.get(a.label) is b:
            return "step0"
        return "arm" if a.step == b.step else "other"


def _noise(stats: CellStats, basis: str, j: int) -> float | None:
    """The cell's bootstrap-noise angle for index ``j`` (from 1) of a ``basis`` comparison."""
    if basis == "carrier":
        return stats.noise_line
    per_index = stats.noise_window or []
    return per_index[j - 1] if j <= len(per_index) else None


def angle_table(
    cells: Sequence[Cell], links: AnchorLinks, measured: Mapping[str, CellStats]
) -> tuple[dict[str, list], CarrierAngles]:
    """angles.parquet's columns (every pair of distinct cells, carrier and window basis) and
    the carrier angle of every pair."""
    rows: dict[str, list] = {name: [] for name in ANGLES_SCHEMA.names}
    carrier_angle: CarrierAngles = {}

    def add(a: Cell, b: Cell, relation: str, basis: str, angles: Sequence[float | None]):
        for j, angle in enumerate(angles, start=1):
            angle = None if angle is None else float(angle)
            calibrated = calibrate(
                angle, _noise(measured[a.label], basis, j), _noise(measured[b.label], basis, j)
            )
            for name, value in zip(
                ANGLES_SCHEMA.names,
                (a.arm, a.step, b.arm, b.step, relation, basis, len(angles), j, angle, *calibrated),
                strict=True,
            ):
                rows[name].append(value)

    for ia, a in enumerate(cells):
        for b in cells[:ia]:
            relation = links.relation(a, b)
            theta = line_angle(a.unit(a.ref), b.unit(b.ref))
            carrier_angle[(a.label, b.label)] = carrier_angle[(b.label, a.label)] = theta
            add(a, b, relation, "carrier", [theta])
            if a.basis is not None and b.basis is not None:
                k = min(a.basis.shape[1], b.basis.shape[1])
                add(a, b, relation, "window", principal_angles(a.basis[:, :k], b.basis[:, :k]))
    return rows, carrier_angle


def drift_rows(
    arm: str,
    cells: Sequence[Cell],
    links: AnchorLinks,
    measured: Mapping[str, CellStats],
    carrier_angle: CarrierAngles,
    null_kind: str,
    level: float,
) -> list[dict[str, Any]]:
    """drift.parquet's rows of one arm, in anchor order."""
    rows = []
    for c in sequence(arm, cells):
        p, f = links.prev.get(c.label), links.first.get(c.label)
        same = p.raw.get(c.ref) if p is not None else None
        step0 = 0.0 if f is None and c.unit(c.ref) is not None else None
        if f is not None:
            step0 = carrier_angle[(c.label, f.label)]
        row = {
            "arm": arm,
            "step": c.step,
            "carrier_layer": c.carrier[0] if c.carrier else None,
            "carrier_position": c.carrier[1] if c.carrier else None,
            "n_admissible": c.n_admissible,
            "ref_layer": c.ref[0],
            "ref_position": c.ref[1],
            "window_layers": c.window,
            **measured[c.label].row,
            "null_kind": null_kind,
            "angle_prev_deg": carrier_angle[(c.label, p.label)] if p is not None else None,
            "angle_step0_deg": step0,
            "cos_prev_same_layer": cosine(c.raw[c.ref], same) if same is not None else None,
        }
        for name, other in (("prev", p), ("step0", f)):
            row.update(_calibrated(name, row[f"angle_{name}_deg"], c, other, measured, level))
        rows.append(row)
    return rows


def _calibrated(
    name: str,
    angle: float | None,
    cell: Cell,
    other: Cell | None,
    measured: Mapping[str, CellStats],
    level: float,
) -> dict[str, float | None]:
    """Noise, ratio and paired bootstrap interval of the ``angle_{name}`` angle between
    ``cell`` and ``other`` (None throughout without ``other``)."""
    mine = measured[cell.label]
    theirs = measured[other.label] if other is not None else None
    noise_ab, ratio, _ = calibrate(
        angle, mine.noise_line, theirs.noise_line if theirs is not None else None
    )
    reps = paired_angles(mine.boot_refs, theirs.boot_refs) if theirs is not None else []
    low, high = interval(reps, level)
    return {
        f"angle_{name}_noise_deg": noise_ab,
        f"angle_{name}_ratio": ratio,
        f"angle_{name}_ci_low": low,
        f"angle_{name}_ci_high": high,
    }
