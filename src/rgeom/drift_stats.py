"""Per-cell statistics of rgeom.drift: effective ranks with their nulls and bootstrap
intervals, and the bootstrap-noise angles that calibrate angles between cells.

See rgeom.drift's docstring for the three rank stacks, the null models and the angle
calibration.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rgeom.drift_cells import Cell, window_activations
from rgeom.geometry import _rank_from_singular, effective_rank, principal_angles, rank_measures

RANK_KINDS = ("singular", "energy", "participation")


@dataclass
class CellStats:
    """What is measured of one cell: its drift.parquet statistics (``row``) and the
    bootstrap evidence that angles against the cell are calibrated with."""

    row: dict[str, Any]
    # [n_boot, d] unit reference directions of the replicates, zero where r vanished.
    boot_refs: np.ndarray | None = None
    # Bootstrap-noise angle of the reference line, and per index of the top-k window basis.
    noise_line: float | None = None
    noise_window: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class _Activations:
    """A cell's per-prompt activations in its window and at its reference layer."""

    X: np.ndarray  # [layers, n_prompts, d]
    y: np.ndarray  # [n_prompts], True for harmful
    window_rows: list[int]  # rows of X in the cell's window order
    ref_row: int  # row of X at the reference layer

    @classmethod
    def of(cls, cell: Cell) -> _Activations:
        layers = sorted({*cell.window, cell.ref[0]})
        X, y = window_activations(cell, layers)
        window_rows = [layers.index(layer) for layer in cell.window]
        return cls(X, y, window_rows, layers.index(cell.ref[0]))


def measure_cell(cell: Cell, settings: Mapping[str, Any], null: str, seed: int) -> CellStats:
    """Effective ranks of the cell's window stack with their null (``null``: shuffle,
    gaussian or none) and bootstrap interval, and, with activations, the contrast and
    bootstrap-stack ranks and the cell's bootstrap-noise angles."""
    kind, n_boot, level = settings["rank_kind"], settings["n_boot"], float(settings["ci"])
    ranks = (
        rank_measures(cell.stack) if cell.stack is not None else dict.fromkeys(RANK_KINDS, math.nan)
    )
    # Seeded by the cell's name, so adding a cell never changes another cell's null.
    rng = np.random.default_rng([seed, zlib.crc32(cell.label.encode())])
    acts = None
    if cell.activations is not None and (null == "shuffle" or n_boot):
        acts = _Activations.of(cell)
    null_draws = _null_draws(cell, acts, null, settings, rng)
    draws = null_draws[kind]
    out, boot = CellStats(row={}), []
    if acts is not None and n_boot:
        out, boot = _bootstrap_stats(cell, acts, null, settings, seed, rng)
    if acts is not None:
        out.row.update(_contrast_stats(acts, null, settings, rng))
    out.row = {
        **{f"erank_{k}": v for k, v in ranks.items()},
        "erank_null_mean": float(np.mean(draws)) if draws else None,
        "erank_null_sd": float(np.std(draws, ddof=1)) if len(draws) > 1 else None,
        **dict(zip(("erank_ci_low", "erank_ci_high"), interval(boot, level), strict=True)),
        **{f"erank_null_{k}": float(np.mean(v)) if v else None for k, v in null_draws.items()},
        **out.row,
        "boot_angle_deg": out.noise_line,
    }
    return out


def _null_draws(
    cell: Cell,
    acts: _Activations | None,
    null: str,
    settings: Mapping[str, Any],
    rng: np.random.Generator,
) -> dict[str, list[float]]:
    """The window stack's null draws per rank variant (gaussian: ``rank_kind`` only)."""
    draws: dict[str, list[float]] = {k: [] for k in RANK_KINDS}
    if null == "none" or cell.stack is None:
        return draws
    if null == "shuffle":
        return _shuffled_null(acts.X[acts.window_rows], acts.y, settings["n_null"], rng)
    kind = settings["rank_kind"]
    draws[kind] = _gaussian_null(cell.stack.shape, kind, settings["n_null"], rng)
    return draws


def _bootstrap_stats(
    cell: Cell,
    acts: _Activations,
    null: str,
    settings: Mapping[str, Any],
    seed: int,
    rng: np.random.Generator,
) -> tuple[CellStats, list[float]]:
    """The cell's replicate directions, noise angles and bootstrap-stack ranks (3, in
    ``row``), and the window stack's erank per replicate."""
    kind, n_boot, level = settings["rank_kind"], settings["n_boot"], float(settings["ci"])
    boot, boot_refs, boot_bases = _bootstrap(
        acts.X, acts.y, acts.window_rows, acts.ref_row, kind, n_boot, seed, settings["subspace_k"]
    )
    noise_line, noise_window = _noise_angles(
        boot_refs, boot_bases, cell.unit(cell.ref), cell.basis, level
    )
    out = CellStats({}, boot_refs, noise_line, noise_window)
    # (3) The bootstrap r-hat stack: its spread is the estimation noise of r-hat.
    refs = boot_refs[np.linalg.norm(boot_refs, axis=1) > 0]
    if len(refs):
        out.row.update({f"erank_boot_{k}": v for k, v in rank_measures(refs, fast=True).items()})
    if null == "shuffle" and len(refs):
        shuffled = _shuffled_refs(acts.X[acts.ref_row], acts.y, len(refs), rng)
        if len(shuffled):
            out.row.update(
                {f"erank_boot_null_{k}": v for k, v in rank_measures(shuffled, fast=True).items()}
            )
    return out, boot


def _contrast_stats(
    acts: _Activations, null: str, settings: Mapping[str, Any], rng: np.random.Generator
) -> dict[str, float]:
    """(2) Ranks of the per-prompt contrasts at the reference layer, and their shuffled null."""
    observed, null_c = _contrast_ranks(
        acts.X[acts.ref_row], acts.y, settings["n_null"] if null == "shuffle" else 0, rng
    )
    return {
        **{f"erank_contrast_{k}": v for k, v in (observed or {}).items()},
        **{f"erank_contrast_null_{k}": v for k, v in (null_c or {}).items()},
    }


# --- nulls --------------------------------------------------------------------------


def _units(r: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Unit rows of r, dropping rows that vanish relative to the activations' own ``scale``
    (per row): with identical inputs (the template tokens at layer 0) a mean difference is
    zero only up to rounding, and a rounding residue has a random direction."""
    norms = np.linalg.norm(r, axis=1)
    keep = norms > 1e-6 * scale
    return r[keep] / norms[keep, None]


def _shuffled_null(
    X: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator
) -> dict[str, list[float]]:
    """Every effective-rank variant of the window stack with the harmful/harmless labels
    permuted across prompts (one SVD per draw serves all three)."""
    y = y.astype(np.float64)
    n_h = int(y.sum())
    scale = np.linalg.norm(X, axis=2).mean(axis=1)
    out: dict[str, list[float]] = {k: [] for k in RANK_KINDS}
    for _ in range(n):
        perm = rng.permutation(y)
        w = perm / n_h - (1 - perm) / (len(y) - n_h)
        r = _units(np.einsum("n,lnd->ld", w, X), scale)
        if len(r):
            for k, v in rank_measures(r, fast=True).items():
                out[k].append(v)
    return out


def _contrasts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-prompt contrasts at one layer: each harmful row minus the harmless mean [n_h, d];
    their mean is the difference-in-means direction."""
    return x[y] - x[~y].mean(axis=0)


def _safe_ranks(X: np.ndarray, fast: bool = False) -> dict[str, float] | None:
    try:
        return rank_measures(X, fast=fast)
    except ValueError:  # all zero: a layer whose inputs do not depend on the prompt
        return None


def _contrast_ranks(
    x: np.ndarray, y: np.ndarray, n_null: int, rng: np.random.Generator
) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Effective ranks of the per-prompt contrast vectors at the reference layer (x [n, d]),
    and the mean of each over ``n_null`` label shuffles (group sizes kept)."""
    observed = _safe_ranks(_contrasts(x, y), fast=True)
    draws: dict[str, list[float]] = {k: [] for k in RANK_KINDS}
    for _ in range(n_null):
        ranks = _safe_ranks(_contrasts(x, rng.permutation(y)), fast=True)
        for k, v in (ranks or {}).items():
            draws[k].append(v)
    null = {k: float(np.mean(v)) for k, v in draws.items() if v} or None
    return observed, null


def _shuffled_refs(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit difference-in-means directions at one layer (x [n_prompts, d]), each with
    the labels permuted: the bootstrap stack's null, rows where r vanished dropped."""
    scale = float(np.linalg.norm(x, axis=1).mean())
    rows = []
    for _ in range(n):
        perm = rng.permutation(y)
        rows.append(x[perm].mean(axis=0) - x[~perm].mean(axis=0))
    return _units(np.asarray(rows), np.full(len(rows), scale)) if rows else np.zeros((0, 0))


def _gaussian_null(shape: tuple[int, int], kind: str, n: int, rng) -> list[float]:
    out = []
    for _ in range(n):
        g = rng.standard_normal(shape)
        out.append(effective_rank(g / np.linalg.norm(g, axis=1, keepdims=True), kind))
    return out


# --- bootstrap ----------------------------------------------------------------------


def _bootstrap(
    X: np.ndarray,
    y: np.ndarray,
    window_rows: list[int],
    ref_row: int,
    kind: str,
    n: int,
    seed: int,
    k: int = 1,
) -> tuple[list[float], np.ndarray, list[np.ndarray | None]]:
    """Prompt bootstrap, stratified by label: erank of each replicate's window stack (rows
    ``window_rows`` of X), each replicate's unit reference direction (row ``ref_row``),
    [n, d], zero where it vanished, and each replicate's top-``k`` window basis.

    Replicate b draws its indices from a generator seeded by (seed, b) alone, so cells with
    the same prompt sets resample the same prompts: angles between cells are paired."""
    harmful, harmless = np.flatnonzero(y), np.flatnonzero(~y)
    scale = np.linalg.norm(X, axis=2).mean(axis=1)
    eranks, refs, bases = [], np.zeros((n, X.shape[2])), []
    for b in range(n):
        rng = np.random.default_rng([seed, 1, b])
        ih = rng.choice(harmful, size=len(harmful))
        ib = rng.choice(harmless, size=len(harmless))
        r = X[:, ih].mean(axis=1) - X[:, ib].mean(axis=1)
        norm = np.linalg.norm(r[ref_row])
        if norm > 1e-6 * scale[ref_row]:
            refs[b] = r[ref_row] / norm
        stack = _units(r[window_rows], scale[window_rows])
        if len(stack):
            sv, basis = _gram_svd(stack, k)
            eranks.append(_rank_from_singular(sv, kind))
            bases.append(basis)
        else:
            bases.append(None)
    return eranks, refs, bases


def _gram_svd(stack: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Singular values and top-``k`` right singular vectors [d, k] of a short, wide unit
    stack, from the eigendecomposition of its [w, w] Gram matrix: one small eigh per
    bootstrap replicate instead of two SVDs of the [w, d] stack (values exact to ~1e-8
    relative, so vectors are kept only above 1e-6 of the largest)."""
    evals, evecs = np.linalg.eigh(stack @ stack.T)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sv = np.sqrt(np.clip(evals, 0, None))
    keep = int(min(k, (sv > 1e-6 * sv[0]).sum()))
    if not keep:
        return sv, None
    return sv, (evecs[:, :keep].T @ stack / sv[:keep, None]).T


# --- angles and their calibration ---------------------------------------------------


def _noise_angles(
    refs: np.ndarray | None,
    bases: Sequence[np.ndarray | None] | None,
    unit: np.ndarray | None,
    basis: np.ndarray | None,
    level: float,
) -> tuple[float | None, list[float | None]]:
    """A cell's within-checkpoint noise angles: the ``level`` quantile, over bootstrap
    replicates, of the angle between a replicate's unit reference direction and the
    full-sample one; and per index j of the top-k window basis, the same quantile of the
    replicate basis's j-th principal angle to the full-sample basis. None with fewer than
    10 replicates, as for the intervals."""

    def quantile(values: list[float]) -> float | None:
        values = [v for v in values if math.isfinite(v)]
        return float(np.percentile(values, 100 * level)) if len(values) >= 10 else None

    line = None
    if refs is not None and unit is not None:
        ok = np.linalg.norm(refs, axis=1) > 0
        cos = np.abs(refs[ok] @ unit).clip(0, 1)
        line = quantile(np.degrees(np.arccos(cos)).tolist())
    per_index: list[float | None] = []
    if bases is not None and basis is not None:
        k = basis.shape[1]
        angles = [
            principal_angles(b[:, :k], basis) for b in bases if b is not None and b.shape[1] >= k
        ]
        per_index = [quantile([float(a[j]) for a in angles]) for j in range(k)]
    return line, per_index


def calibrate(
    angle: float | None, noise_a: float | None, noise_b: float | None
) -> tuple[float | None, float | None, float | None]:
    """(noise, angle / noise, angle - noise) for an angle between two cells' estimates.

    The pair's noise angle combines the two cells' bootstrap-noise angles in quadrature:
    for small angles independent estimation errors of two directions add like orthogonal
    displacements. A ratio above 1 means the two directions differ by more than resampling
    the prompts moves either one. None where an input is missing; the ratio is None where
    the noise is 0 (identical replicates)."""
    if angle is None or noise_a is None or noise_b is None or not math.isfinite(angle):
        return None, None, None
    noise = math.hypot(noise_a, noise_b)
    return noise, (angle / noise if noise > 0 else None), angle - noise


def interval(values: Sequence[float], level: float) -> tuple[float | None, float | None]:
    """Percentile interval; None with fewer than 10 values, where it means nothing."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)])
    if len(finite) < 10:
        return None, None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_angles(a: np.ndarray | None, b: np.ndarray | None) -> list[float]:
    """Angle between the lines of replicate i of ``a`` and of ``b``, for every replicate
    where both directions exist."""
    if a is None or b is None:
        return []
    ok = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) > 0
    cos = np.abs((a[ok] * b[ok]).sum(axis=1)).clip(0, 1)
    return np.degrees(np.arccos(cos)).tolist()


def line_angle(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Principal angle (degrees) between two directions' lines; None if either is missing."""
    if a is None or b is None:
        return None
    return float(principal_angles(a, b)[0])
