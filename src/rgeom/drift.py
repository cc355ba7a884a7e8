"""How the refusal geometry moves across training anchors and between arms (issue #5).

Inputs are, per measured cell (arm, step), the direction table (``rgeom directions``), the
carrier table (``rgeom carriers``) and optionally the activation table, used for the
label-shuffled null. Step 0 is the base model, written once with arm ``base`` and treated as
step 0 of every arm.

Per cell the *reference* (layer, position) is the carrier found by the causal search, or,
where no candidate was admissible, the layer with the largest direction norm at position -1.
Around it sits a window of ``2 * window + 1`` adjacent layers (clipped to the captured
layers) whose unit directions are stacked for the effective rank and the top-k subspace.

Effective rank of the window stack
----------------------------------
Three variants come from :func:`rgeom.geometry.rank_measures`; all are 1 for parallel rows.
For ``n`` unit rows with pairwise cosine ``c`` the squared singular values are
``1 + (n - 1) c`` once and ``1 - c`` (n - 1 times), so for n = 5 and c = 0.95:

* ``energy`` (exp entropy of sigma^2 / sum sigma^2, i.e. of the explained-variance
  fractions) = 1.25,
* ``participation`` ((sum sigma^2)^2 / sum sigma^4) = 1.09,
* ``singular`` (Roy & Vetterli: exp entropy of sigma / sum sigma) = 2.73.

The "erank ~ 1.24, just above 1" reading of nearly parallel directions across adjacent
layers matches the ``energy`` variant (c ~ 0.95 over five layers): the noise directions
each carry a variance share of order (1 - c) / n, and sigma^2-entropy weighs them by that
share, so the value stays below 1.5 down to c = 0.9. ``singular`` weighs them by sigma, i.e. by
sqrt(1 - c), and inflates quickly (3.23 at c = 0.9, still 1.89 at c = 0.99);
``participation`` is the most forgiving (1.18 at c = 0.9). ``rank_kind`` (default
``energy``) picks the variant of ``erank_null_mean`` / ``_sd`` and the bootstrap interval;
all three observed values and all three shuffled-null means are written.

Two more stacks, each with all three variants and a label-shuffled null (activation tables
needed):

* ``erank_contrast_*``: the per-prompt contrast vectors at the reference, harmful x_i minus
  the harmless mean ([n_harmful, d]). Their mean is r, but each also carries its prompt's
  own deviation, so this measures how spread the prompts are around the shared direction;
  it grows with the prompt noise and the prompt count, not only with how many directions
  refusal uses. Null: the same with the labels permuted (group sizes kept).
* ``erank_boot_*``: the ``n_boot`` prompt-bootstrap replicates of the unit reference
  direction r-hat stacked ([n_boot, d]). It is the estimation noise of r-hat: it tends to 1
  as the prompt count grows, whatever the model does. Null: as many unit r-hats, each from
  a label permutation.

Neither is the paper's "~1.24": (2) is a property of the prompt set's spread, (3) of the
sample size. Only (1), the window stack with ``energy``, asks the paper's question ("how
many directions do adjacent layers use?") and gives ~1.24 for nearly parallel layers.

Angle calibration
-----------------
Each cell's bootstrap-noise angle (``boot_angle_deg``) is the ``ci`` quantile, over the prompt
bootstrap replicates, of the angle between a replicate's unit reference direction and the
full-sample one (per index of the top-k window basis likewise, for ``window`` angles). An
angle between cells a and b is calibrated against the pair's noise angle
sqrt(noise_a^2 + noise_b^2) (independent small estimation errors add in quadrature):
``ratio`` = angle / noise (> 1: more than resampling the prompts moves either direction)
and ``excess_deg`` = angle - noise, in ``angles.parquet`` for every principal angle and in
``drift.parquet`` for the prev / step0 angles.

Null baseline
-------------
``null_model: shuffle`` permutes the harmful/harmless labels of the per-prompt activations
(``split == "dir"``) and recomputes the window's difference-in-means directions, so the null
keeps the residual stream's own layer-to-layer correlation; only the label signal is gone.
``null_model: gaussian`` stacks i.i.d. Gaussian unit vectors of the same shape, whose erank is
close to the window size; it is the fallback when no activation tables are given.

Outputs
-------
``drift.parquet``: one row per (arm, step), the base row repeated as step 0 of each arm.
``angle_prev_deg`` / ``angle_step0_deg`` are principal angles (0..90, sign-blind) between
the reference directions; ``cos_prev_same_layer`` is the signed cosine at this cell's
reference (layer, position) against the previous anchor. ``*_ci_*`` are prompt-bootstrap
percentile intervals (paired across cells; null without activation tables).
``angles.parquet``: every pair of distinct cells (base once), ``basis`` carrier (k = 1) or
window (top-k), one row per principal angle. ``verdict.parquet``: one row per arm, see
:func:`verdict`.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rgeom.errors import RgeomError
from rgeom.geometry import (
    DIRECTION_SPLIT,
    HARMFUL,
    HARMLESS,
    _rank_from_singular,
    cosine,
    effective_rank,
    load_directions,
    principal_angles,
    rank_measures,
)
from rgeom.io import read_meta, read_table, write_table
from rgeom.layout import BASE
from rgeom.schemas import (
    ANGLES_SCHEMA,
    CARRIER_BASE_SCHEMA,
    CROSS_SCHEMA,
    DRIFT_SCHEMA,
    VERDICT_SCHEMA,
)

log = logging.getLogger(__name__)

BASE_ARM = BASE
RANK_KINDS = ("singular", "energy", "participation")
NULL_KINDS = ("auto", "shuffle", "gaussian")
# Files combined here must describe the same model and tokenization.
SHARED_META = ("d_model", "n_layers", "template_hash", "tokenizer_hash")

DEFAULTS: dict[str, Any] = {
    "window": 2,
    "window_layers": None,
    "subspace_k": 2,
    "rank_kind": "energy",
    "null_model": "auto",
    "n_null": 100,
    "relocation_layers": 3,
    "rotation_deg": 30.0,
    "n_boot": 200,
    "ci": 0.95,
    "transfer_min": 0.5,
    "min_effect": 0.5,
}


@dataclass
class Cell:
    arm: str
    step: int
    directions_path: Path
    raw: dict[tuple[int, int], np.ndarray]
    carrier: tuple[int, int] | None = None
    n_admissible: int = 0
    activations: Path | None = None
    ref: tuple[int, int] = (0, -1)
    window: list[int] = field(default_factory=list)
    stack: np.ndarray | None = None  # [w, d] non-zero unit directions of the window
    basis: np.ndarray | None = None  # [d, k] top-k right singular vectors of the stack

    @property
    def label(self) -> str:
        return f"{self.arm}@{self.step}"

    def unit(self, key: tuple[int, int]) -> np.ndarray | None:
        r = self.raw.get(key)
        if r is None:
            return None
        norm = np.linalg.norm(r)
        return r / norm if norm > 0 else None


# --- reading ------------------------------------------------------------------------


def _settings(params: Mapping[str, Any]) -> dict[str, Any]:
    section = dict(params.get("drift") or {})
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise RgeomError(f"drift: unknown key(s) {', '.join(unknown)}")
    s = {**DEFAULTS, **section}
    if not isinstance(s["ci"], int | float) or not 0 < s["ci"] < 1:
        raise RgeomError(f"drift.ci must be in (0, 1), got {s['ci']!r}")
    for key in ("window", "n_null", "n_boot", "relocation_layers", "subspace_k"):
        v, least = s[key], 1 if key == "subspace_k" else 0
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise RgeomError(f"drift.{key} must be an integer >= {least}, got {v!r}")
    for key in ("transfer_min", "min_effect"):
        if not isinstance(s[key], int | float) or isinstance(s[key], bool) or s[key] < 0:
            raise RgeomError(f"drift.{key} must be a number >= 0, got {s[key]!r}")
    if not isinstance(s["rotation_deg"], int | float) or not 0 <= s["rotation_deg"] <= 90:
        raise RgeomError(f"drift.rotation_deg must be in [0, 90], got {s['rotation_deg']!r}")
    if s["rank_kind"] not in RANK_KINDS:
        raise RgeomError(f"drift.rank_kind: {s['rank_kind']!r} is not one of {RANK_KINDS}")
    if s["null_model"] not in NULL_KINDS:
        raise RgeomError(f"drift.null_model: {s['null_model']!r} is not one of {NULL_KINDS}")
    return s


def _cell_key(path: Path, meta: Mapping[str, Any], kind: str) -> tuple[str, int]:
    for key in ("arm", "step"):
        if meta.get(key) is None:
            raise RgeomError(f"{path}: provenance lacks {key!r} ({kind} table)")
    return str(meta["arm"]), int(meta["step"])


def read_cells(
    directions: Sequence[str | Path],
    carriers: Sequence[str | Path],
    activations: Sequence[str | Path] | None = None,
) -> tuple[list[Cell], dict[str, Any]]:
    """One :class:`Cell` per direction table, matched to its carrier (and activation) table
    by the (arm, step) in their provenance; also the model facts all files share."""
    if not directions:
        raise RgeomError("drift: no direction tables given")
    cells: dict[tuple[str, int], Cell] = {}
    shared: dict[str, Any] = {}
    shared_from: dict[str, Path] = {}
    for p in map(Path, directions):
        meta = read_meta(p)
        key = _cell_key(p, meta, "direction")
        if key in cells:
            raise RgeomError(
                f"arm {key[0]} step {key[1]} has two direction tables: "
                f"{cells[key].directions_path} and {p}"
            )
        for name in SHARED_META:
            if name not in meta:
                continue
            if name in shared and shared[name] != meta[name]:
                raise RgeomError(
                    f"{p}: {name} differs from {shared_from[name]}; the tables come from "
                    "different models or tokenizers"
                )
            shared.setdefault(name, meta[name])
            shared_from.setdefault(name, p)
        cells[key] = Cell(arm=key[0], step=key[1], directions_path=p, raw=load_directions(p))

    seen: dict[tuple[str, int], Path] = {}
    for p in map(Path, carriers):
        meta = read_meta(p)
        key = _cell_key(p, meta, "carrier")
        if key not in cells:
            raise RgeomError(f"{p}: arm {key[0]} step {key[1]} has no direction table")
        if key in seen:
            raise RgeomError(f"arm {key[0]} step {key[1]} has two carrier tables: {seen[key]}, {p}")
        seen[key] = p
        cell = cells[key]
        th = meta.get("template_hash")
        if th is not None and shared.get("template_hash") not in (None, th):
            raise RgeomError(f"{p}: template_hash differs from {cell.directions_path}")
        table = read_table(p, schema=CARRIER_BASE_SCHEMA)
        rows = table.select(["layer", "position", "admissible", "is_carrier"]).to_pylist()
        chosen = [(r["layer"], r["position"]) for r in rows if r["is_carrier"]]
        if len(chosen) > 1:
            raise RgeomError(f"{p}: {len(chosen)} rows have is_carrier; at most one may")
        stated = meta.get("carrier")
        if "carrier" in meta and (tuple(stated) if stated else None) != (
            tuple(chosen[0]) if chosen else None
        ):
            raise RgeomError(
                f"{p}: provenance names carrier {stated} but the is_carrier rows say "
                f"{list(chosen[0]) if chosen else None}"
            )
        cell.n_admissible = sum(bool(r["admissible"]) for r in rows)
        if chosen:
            cell.carrier = (int(chosen[0][0]), int(chosen[0][1]))
            if cell.carrier not in cell.raw:
                raise RgeomError(
                    f"{p}: carrier layer {cell.carrier[0]} position {cell.carrier[1]} is not "
                    f"in {cell.directions_path}"
                )
    missing = [c.label for k, c in sorted(cells.items()) if k not in seen]
    if missing:
        raise RgeomError(f"drift: no carrier table for {', '.join(missing)}")

    for p in map(Path, activations or []):
        meta = read_meta(p)
        key = _cell_key(p, meta, "activation")
        if key not in cells:
            raise RgeomError(f"{p}: arm {key[0]} step {key[1]} has no direction table")
        for name in SHARED_META:
            if name in meta and name in shared and meta[name] != shared[name]:
                raise RgeomError(f"{p}: {name} differs from {shared_from[name]}")
        cells[key].activations = p
    if "n_layers" not in shared:
        shared["n_layers"] = 1 + max(layer for c in cells.values() for layer, _ in c.raw)
    ordered = sorted(cells.values(), key=lambda c: (c.step, c.arm != BASE_ARM, c.arm))
    return ordered, shared


# --- per-cell geometry --------------------------------------------------------------


def _reference(cell: Cell) -> tuple[int, int]:
    if cell.carrier is not None:
        return cell.carrier
    positions = {pos for _, pos in cell.raw}
    # -1 is the last template token; tables that count forward use their last index.
    pos = -1 if -1 in positions else max(positions)
    layers = [layer for layer, p in cell.raw if p == pos]
    return max(layers, key=lambda layer: np.linalg.norm(cell.raw[(layer, pos)])), pos


def _window(cell: Cell, settings: Mapping[str, Any], n_layers: int) -> list[int]:
    layer, pos = cell.ref
    have = sorted(lay for lay, p in cell.raw if p == pos)
    if settings["window_layers"] is not None:
        explicit = settings["window_layers"]
        if not isinstance(explicit, list) or not explicit:
            raise RgeomError(f"drift.window_layers must be null or a non-empty list: {explicit!r}")
        outside = [x for x in explicit if not isinstance(x, int) or not 0 <= x < n_layers]
        if outside:
            raise RgeomError(
                f"drift.window_layers: {outside} outside the model (n_layers={n_layers}, "
                f"valid 0..{n_layers - 1})"
            )
        absent = [x for x in explicit if x not in have]
        if absent:
            raise RgeomError(
                f"drift.window_layers: layer(s) {absent} at position {pos} are not in "
                f"{cell.directions_path}"
            )
        return sorted(set(explicit))
    h = settings["window"]
    return [x for x in have if layer - h <= x <= layer + h]


def _stack(cell: Cell, layers: Sequence[int]) -> np.ndarray | None:
    pos = cell.ref[1]
    units = [u for u in (cell.unit((layer, pos)) for layer in layers) if u is not None]
    return np.stack(units) if units else None


def _top_basis(stack: np.ndarray | None, k: int) -> np.ndarray | None:
    if stack is None:
        return None
    _, s, vt = np.linalg.svd(stack, full_matrices=False)
    keep = int(min(k, (s > 1e-10 * s[0]).sum()))
    return vt[:keep].T if keep else None


def _window_activations(cell: Cell, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt ``dir`` activations at the reference position: X [w, n, d] in ``layers``
    order with prompts in one fixed order, and y [n] (True for harmful)."""
    pos = cell.ref[1]
    path = cell.activations
    try:
        table = pq.read_table(
            path,
            columns=["prompt_id", "label", "layer", "vector"],
            filters=[
                ("split", "=", DIRECTION_SPLIT),
                ("position", "=", pos),
                ("label", "in", [HARMFUL, HARMLESS]),
                ("layer", "in", list(layers)),
            ],
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{path} is not a readable Parquet file") from exc
    d = table.schema.field("vector").type.list_size
    vec = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vec = vec.astype(np.float64).reshape(-1, d)
    labels = np.asarray(table.column("label").to_pylist())
    # Harmful and harmless sets may reuse prompt ids; the label keeps them apart.
    keys = np.char.add(np.char.add(labels, "\0"), np.asarray(table.column("prompt_id").to_pylist()))
    layer_col = table.column("layer").to_numpy()
    order = np.unique(keys)
    per_layer = []
    for layer in layers:
        rows = np.flatnonzero(layer_col == layer)
        rows = rows[np.argsort(keys[rows], kind="stable")]
        if len(rows) != len(order) or not np.array_equal(keys[rows], order):
            raise RgeomError(
                f"{path}: layer {layer} position {pos} has {len(rows)} {DIRECTION_SPLIT!r} rows "
                f"for {len(order)} prompts; expected exactly one per prompt"
            )
        per_layer.append(vec[rows])
    y = np.char.startswith(order, HARMFUL + "\0")
    if y.all() or not y.any():
        raise RgeomError(f"{path}: needs both {HARMFUL} and {HARMLESS} {DIRECTION_SPLIT!r} rows")
    return np.stack(per_layer), y


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


def _interval(values: Sequence[float], level: float) -> tuple[float | None, float | None]:
    """Percentile interval; None with fewer than 10 values, where it means nothing."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)])
    if len(finite) < 10:
        return None, None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def _paired_angles(a: np.ndarray | None, b: np.ndarray | None) -> list[float]:
    """Angle between the lines of replicate i of ``a`` and of ``b``, for every replicate
    where both directions exist."""
    if a is None or b is None:
        return []
    ok = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) > 0
    cos = np.abs((a[ok] * b[ok]).sum(axis=1)).clip(0, 1)
    return np.degrees(np.arccos(cos)).tolist()


def _gaussian_null(shape: tuple[int, int], kind: str, n: int, rng) -> list[float]:
    out = []
    for _ in range(n):
        g = rng.standard_normal(shape)
        out.append(effective_rank(g / np.linalg.norm(g, axis=1, keepdims=True), kind))
    return out


def _angle(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    return float(principal_angles(a, b)[0])


# --- verdicts -----------------------------------------------------------------------


def verdict(
    steps: Sequence[int],
    carrier_layers: Sequence[int | None],
    angles_step0: Sequence[float | None],
    relocation_layers: int,
    rotation_deg: float,
) -> tuple[str, float, str]:
    """relocation / rotation / stable / undetermined for one arm's anchor sequence.

    Relocation: the carrier layer differs by more than ``relocation_layers`` between any two
    anchors that have a carrier. Rotation: it stays, but the reference direction of some
    anchor is more than ``rotation_deg`` from step 0's. Undetermined: fewer than two
    anchors have a carrier, so a relocation cannot be told from a missing search result.
    """
    found = [
        (s, layer) for s, layer in zip(steps, carrier_layers, strict=True) if layer is not None
    ]
    trail = ", ".join(
        f"{s}:{'-' if layer is None else layer}"
        for s, layer in zip(steps, carrier_layers, strict=True)
    )
    if len(found) < 2:
        return (
            "undetermined",
            math.nan,
            f"carrier found at {len(found)} of {len(steps)} anchors (step:layer {trail})",
        )
    layers = [layer for _, layer in found]
    shift = max(layers) - min(layers)
    if shift > relocation_layers:
        return (
            "relocation",
            float(shift),
            f"carrier layer moved by {shift} > {relocation_layers} (step:layer {trail})",
        )
    finite = [a for a in angles_step0 if a is not None and math.isfinite(a)]
    worst = max(finite) if finite else math.nan
    if finite and worst > rotation_deg:
        return (
            "rotation",
            worst,
            f"max angle to step 0 {worst:.1f} deg > {rotation_deg:g} (step:layer {trail})",
        )
    return (
        "stable",
        worst,
        f"shift {shift} <= {relocation_layers} layers, max angle to step 0 {worst:.1f} deg "
        f"(step:layer {trail})",
    )


def transfer_verdict(
    cross_rows: Sequence[Mapping[str, Any]],
    first: tuple[str, int],
    last: tuple[str, int],
    settings: Mapping[str, Any],
    seed: int,
) -> dict[str, Any] | None:
    """The reorganization verdict from the cross-anchor transfer test, or None without the
    rows it needs (b = ``last`` with its own direction and with ``first``'s).

    With T the share of the last anchor's own bypass effect (its direction ablated, mean
    refusal-score drop on the harmful validation prompts) that the first anchor's direction
    achieves at the last anchor, and [lo, hi] its paired prompt-bootstrap interval (the
    point estimate where there is none): undetermined when the own effect is below
    ``min_effect`` log-odds (nothing to transfer) or the interval straddles
    ``transfer_min``; stable when lo >= ``transfer_min`` (step 0's direction still
    mediates refusal); otherwise reorganized: relocation when the two directions' layers
    differ by more than ``relocation_layers``, else rotation.
    """
    from rgeom.causal import transfer

    target = [r for r in cross_rows if (r["arm"], r["step"]) == last]
    early = next((r for r in target if (r["source_arm"], r["source_step"]) == first), None)
    own = next((r for r in target if (r["source_arm"], r["source_step"]) == last), None)
    if early is None or own is None:
        return None
    admissible = bool(early["admissible"] and own["admissible"])
    out: dict[str, Any] = {"basis": "cross_anchor", "admissible": admissible}
    trail = (
        f"step {first[1]} L{early['layer']} ({early['carrier_source']}) -> step {last[1]} "
        f"L{own['layer']} ({own['carrier_source']})"
    )
    if first == last:
        return {**out, "verdict": "undetermined", "statistic": math.nan,
                "detail": f"one anchor only ({trail})"}  # fmt: skip
    t = transfer(
        own["baseline_scores"],
        early["bypass_scores"],
        own["bypass_scores"],
        int(settings["n_boot"]),
        float(settings["ci"]),
        seed,
    )
    out.update(transfer=t.ratio, transfer_ci_low=t.ci_low, transfer_ci_high=t.ci_high)
    ci = "" if t.ci_low is None else f" [{t.ci_low:.2f}, {t.ci_high:.2f}]"
    flag = "" if admissible else "; fallback direction(s), no admissible carrier"
    desc = (
        f"transfer {t.ratio:.2f}{ci} (early effect {t.effect_early:.2f} / own effect "
        f"{t.effect_own:.2f} log-odds; {trail}{flag})"
    )
    min_effect, tmin = float(settings["min_effect"]), float(settings["transfer_min"])
    if not t.effect_own >= min_effect:
        v, why = "undetermined", f"own effect < min_effect {min_effect:g}: nothing to transfer"
    else:
        lo, hi = (t.ratio, t.ratio) if t.ci_low is None else (t.ci_low, t.ci_high)
        shift = abs(int(own["layer"]) - int(early["layer"]))
        if lo >= tmin:
            v, why = "stable", f"step {first[1]}'s direction still works (>= {tmin:g})"
        elif hi < tmin:
            v = "relocation" if shift > int(settings["relocation_layers"]) else "rotation"
            why = f"step {first[1]}'s direction no longer works (< {tmin:g}); layer shift {shift}"
        else:
            v, why = "undetermined", f"interval straddles transfer_min {tmin:g}"
    return {**out, "verdict": v, "statistic": t.ratio, "detail": f"{why}: {desc}"}


# --- entry point --------------------------------------------------------------------


def _arms(params: Mapping[str, Any], cells: Sequence[Cell]) -> list[str]:
    arms = list(params.get("arms") or [])
    seen = sorted({c.arm for c in cells if c.arm != BASE_ARM})
    if not arms:
        arms = seen
    unknown = [a for a in seen if a not in arms]
    if unknown:
        raise RgeomError(f"drift: tables for arm(s) {unknown} that are not in arms {arms}")
    return arms or [BASE_ARM]


def _sequence(arm: str, cells: Sequence[Cell]) -> list[Cell]:
    """The arm's anchors in step order, the shared base first."""
    return sorted(
        (c for c in cells if c.arm in (arm, BASE_ARM)), key=lambda c: (c.step, c.arm != BASE_ARM)
    )


def build_drift(
    directions: Sequence[str | Path],
    carriers: Sequence[str | Path],
    out_dir: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    activations: Sequence[str | Path] | None = None,
    cross_anchor: Sequence[str | Path] | None = None,
) -> dict[str, pa.Table]:
    """Write drift.parquet, angles.parquet, verdict.parquet and figures/ under ``out_dir``;
    with ``cross_anchor`` tables also cross_anchor.parquet (all of them in one), and the
    verdict comes from the transfer test (:func:`transfer_verdict`) where it can."""
    settings = _settings(params)
    cells, shared = read_cells(directions, carriers, activations)
    cross = None
    if cross_anchor:
        from rgeom.causal import read_cross_anchor

        cross = read_cross_anchor(cross_anchor)
        labels = {(c.arm, c.step) for c in cells}
        stray = sorted(
            {
                (a, s)
                for a, s in zip(cross["arm"].to_pylist(), cross["step"].to_pylist(), strict=True)
            }
            - labels
        )
        if stray:
            raise RgeomError(f"drift: cross-anchor tables for cells without directions: {stray}")
    n_layers = int(shared["n_layers"])
    arms = _arms(params, cells)
    null = settings["null_model"]
    if null == "auto":
        null = "shuffle" if all(c.activations is not None for c in cells) else "gaussian"
    if null == "shuffle":
        lacking = [c.label for c in cells if c.activations is None]
        if lacking:
            raise RgeomError(f"drift.null_model is 'shuffle' but no activation table for {lacking}")
    if settings["n_null"] == 0:
        null = "none"
    seed = int(params.get("seed", 0))
    kind = settings["rank_kind"]
    n_boot, level = settings["n_boot"], float(settings["ci"])
    # Unit reference directions of every bootstrap replicate, per cell with activations.
    boot_refs: dict[str, np.ndarray] = {}
    # Within-checkpoint bootstrap-noise angles: of the reference line, and per index of the
    # top-k window basis (see _noise_angles).
    noise_line: dict[str, float | None] = {}
    noise_window: dict[str, list[float | None]] = {}

    stats: dict[str, dict[str, Any]] = {}
    for cell in cells:
        cell.ref = _reference(cell)
        if not 0 <= cell.ref[0] < n_layers:
            raise RgeomError(
                f"{cell.directions_path}: reference layer {cell.ref[0]} outside the model "
                f"(n_layers={n_layers})"
            )
        cell.window = _window(cell, settings, n_layers)
        cell.stack = _stack(cell, cell.window)
        cell.basis = _top_basis(cell.stack, settings["subspace_k"])
        ranks = (
            rank_measures(cell.stack)
            if cell.stack is not None
            else dict.fromkeys(RANK_KINDS, math.nan)
        )
        # Seeded by the cell's name, so adding a cell never changes another cell's null.
        rng = np.random.default_rng([seed, zlib.crc32(cell.label.encode())])
        X = y = None
        if cell.activations is not None and (null == "shuffle" or n_boot):
            layers = sorted({*cell.window, cell.ref[0]})
            X, y = _window_activations(cell, layers)
            window_rows = [layers.index(layer) for layer in cell.window]
        null_draws: dict[str, list[float]] = {k: [] for k in RANK_KINDS}
        if null == "none" or cell.stack is None:
            pass
        elif null == "shuffle":
            null_draws = _shuffled_null(X[window_rows], y, settings["n_null"], rng)
        else:
            null_draws[kind] = _gaussian_null(cell.stack.shape, kind, settings["n_null"], rng)
        draws = null_draws[kind]
        boot: list[float] = []
        extra: dict[str, Any] = {}
        if X is not None and n_boot:
            ref_row = layers.index(cell.ref[0])
            boot, boot_refs[cell.label], boot_bases = _bootstrap(
                X, y, window_rows, ref_row, kind, n_boot, seed, settings["subspace_k"]
            )
            noise_line[cell.label], noise_window[cell.label] = _noise_angles(
                boot_refs[cell.label], boot_bases, cell.unit(cell.ref), cell.basis, level
            )
            # (3) The bootstrap r-hat stack: its spread is the estimation noise of r-hat.
            refs = boot_refs[cell.label]
            refs = refs[np.linalg.norm(refs, axis=1) > 0]
            if len(refs):
                extra.update(
                    {f"erank_boot_{k}": v for k, v in rank_measures(refs, fast=True).items()}
                )
            if null == "shuffle" and len(refs):
                shuffled = _shuffled_refs(X[ref_row], y, len(refs), rng)
                if len(shuffled):
                    extra.update(
                        {
                            f"erank_boot_null_{k}": v
                            for k, v in rank_measures(shuffled, fast=True).items()
                        }
                    )
        if X is not None:
            # (2) Per-prompt contrasts at the reference layer, and their shuffled null.
            ref_x = X[layers.index(cell.ref[0])]
            observed, null_c = _contrast_ranks(
                ref_x, y, settings["n_null"] if null == "shuffle" else 0, rng
            )
            extra.update({f"erank_contrast_{k}": v for k, v in (observed or {}).items()})
            extra.update({f"erank_contrast_null_{k}": v for k, v in (null_c or {}).items()})
        del X
        stats[cell.label] = {
            **{f"erank_{k}": v for k, v in ranks.items()},
            "erank_null_mean": float(np.mean(draws)) if draws else None,
            "erank_null_sd": float(np.std(draws, ddof=1)) if len(draws) > 1 else None,
            **dict(zip(("erank_ci_low", "erank_ci_high"), _interval(boot, level), strict=True)),
            **{f"erank_null_{k}": float(np.mean(v)) if v else None for k, v in null_draws.items()},
            **extra,
            "boot_angle_deg": noise_line.get(cell.label),
        }
        log.info(
            "%s: reference L%d p%d, window %s, erank_%s %.3f (null %s)",
            cell.label,
            cell.ref[0],
            cell.ref[1],
            cell.window,
            kind,
            ranks[kind],
            stats[cell.label]["erank_null_mean"],
        )

    ref_unit = {c.label: c.unit(c.ref) for c in cells}
    prev: dict[str, Cell] = {}
    first: dict[str, Cell] = {}
    for arm in arms:
        seq = _sequence(arm, cells)
        for a, b in zip(seq[1:], seq[:-1], strict=True):
            prev[a.label] = b
        for c in seq[1:]:
            first[c.label] = seq[0]

    angle_rows: dict[str, list] = {name: [] for name in ANGLES_SCHEMA.names}
    carrier_angle: dict[tuple[str, str], float | None] = {}

    def noise(cell: Cell, basis: str, j: int) -> float | None:
        if basis == "carrier":
            return noise_line.get(cell.label)
        per_index = noise_window.get(cell.label) or []
        return per_index[j - 1] if j <= len(per_index) else None

    def add(a: Cell, b: Cell, relation: str, basis: str, angles: Sequence[float | None]):
        for j, angle in enumerate(angles, start=1):
            angle = None if angle is None else float(angle)
            calibrated = calibrate(angle, noise(a, basis, j), noise(b, basis, j))
            for name, value in zip(
                ANGLES_SCHEMA.names,
                (a.arm, a.step, b.arm, b.step, relation, basis, len(angles), j, angle, *calibrated),
                strict=True,
            ):
                angle_rows[name].append(value)

    for ia, a in enumerate(cells):
        for b in cells[:ia]:
            if prev.get(a.label) is b:
                relation = "prev"
            elif first.get(a.label) is b:
                relation = "step0"
            elif a.step == b.step:
                relation = "arm"
            else:
                relation = "other"
            theta = _angle(ref_unit[a.label], ref_unit[b.label])
            carrier_angle[(a.label, b.label)] = carrier_angle[(b.label, a.label)] = theta
            add(a, b, relation, "carrier", [theta])
            if a.basis is not None and b.basis is not None:
                k = min(a.basis.shape[1], b.basis.shape[1])
                add(a, b, relation, "window", principal_angles(a.basis[:, :k], b.basis[:, :k]))

    drift_rows: dict[str, list] = {name: [] for name in DRIFT_SCHEMA.names}
    verdict_rows: dict[str, list] = {name: [] for name in VERDICT_SCHEMA.names}
    for arm in arms:
        seq = _sequence(arm, cells)
        step0_angles = []
        for c in seq:
            p = prev.get(c.label)
            f = first.get(c.label)
            same = p.raw.get(c.ref) if p is not None else None
            step0 = 0.0 if f is None and ref_unit[c.label] is not None else None
            if f is not None:
                step0 = carrier_angle[(c.label, f.label)]
            step0_angles.append(step0)
            row = {
                "arm": arm,
                "step": c.step,
                "carrier_layer": c.carrier[0] if c.carrier else None,
                "carrier_position": c.carrier[1] if c.carrier else None,
                "n_admissible": c.n_admissible,
                "ref_layer": c.ref[0],
                "ref_position": c.ref[1],
                "window_layers": c.window,
                **stats[c.label],
                "null_kind": null,
                "angle_prev_deg": carrier_angle[(c.label, p.label)] if p is not None else None,
                "angle_step0_deg": step0,
                "cos_prev_same_layer": cosine(c.raw[c.ref], same) if same is not None else None,
            }
            for name, other in (("prev", p), ("step0", f)):
                angle = row[f"angle_{name}_deg"]
                noise_ab, ratio, _ = calibrate(
                    angle,
                    noise_line.get(c.label),
                    noise_line.get(other.label) if other is not None else None,
                )
                row[f"angle_{name}_noise_deg"], row[f"angle_{name}_ratio"] = noise_ab, ratio
                reps = (
                    _paired_angles(boot_refs.get(c.label), boot_refs.get(other.label))
                    if other is not None
                    else []
                )
                low, high = _interval(reps, level)
                row[f"angle_{name}_ci_low"], row[f"angle_{name}_ci_high"] = low, high
            # .get: the contrast and bootstrap-stack ranks exist only with activation tables.
            for name in DRIFT_SCHEMA.names:
                drift_rows[name].append(row.get(name))
        v, statistic, detail = verdict(
            [c.step for c in seq],
            [c.carrier[0] if c.carrier else None for c in seq],
            step0_angles,
            settings["relocation_layers"],
            float(settings["rotation_deg"]),
        )
        row = {"arm": arm, "verdict": v, "statistic": statistic, "detail": detail}
        row["basis"] = "geometry"
        decided = None
        if cross is not None:
            decided = transfer_verdict(
                cross.to_pylist(),
                (seq[0].arm, seq[0].step),
                (seq[-1].arm, seq[-1].step),
                settings,
                seed,
            )
        if decided is not None:
            row.update(decided)
            row["detail"] = f"{row['detail']}; geometry: {v} ({detail})"
        for name in VERDICT_SCHEMA.names:
            verdict_rows[name].append(row.get(name))

    out = Path(out_dir)
    record = {
        **meta,
        "arms": arms,
        "drift": settings,
        "null_kind": null,
        **{k: shared[k] for k in SHARED_META if k in shared},
        "inputs": {
            "directions": [str(c.directions_path) for c in cells],
            "carriers": [str(p) for p in carriers],
            "activations": [str(p) for p in activations or []],
            "cross_anchor": [str(p) for p in cross_anchor or []],
        },
    }
    tables = {
        "drift": pa.table(drift_rows, schema=DRIFT_SCHEMA),
        "angles": pa.table(angle_rows, schema=ANGLES_SCHEMA),
        "verdict": pa.table(verdict_rows, schema=VERDICT_SCHEMA),
    }
    for name, schema in (
        ("drift", DRIFT_SCHEMA),
        ("angles", ANGLES_SCHEMA),
        ("verdict", VERDICT_SCHEMA),
    ):
        write_table(out / f"{name}.parquet", tables[name], schema, record)
    if cross is not None:
        tables["cross_anchor"] = cross
        write_table(out / "cross_anchor.parquet", cross, CROSS_SCHEMA, record)

    from rgeom.report import _formats

    formats = _formats(params)
    figs = out / "figures"
    plot_carrier_layers(tables["drift"], arms, n_layers, figs / "carrier_layer_vs_step", formats)
    # Blocks per arm (base first, then each arm's anchors) read more easily than step order.
    rank = {arm: i for i, arm in enumerate([BASE_ARM, *arms])}
    by_arm = sorted(cells, key=lambda c: (rank.get(c.arm, len(rank)), c.step))
    pair_noise = {
        (a.label, b.label): calibrate(
            carrier_angle.get((a.label, b.label)), noise_line.get(a.label), noise_line.get(b.label)
        )[0]
        for a in by_arm
        for b in by_arm
        if a is not b
    }
    plot_angle_matrix(by_arm, carrier_angle, figs / "principal_angles", formats, pair_noise)
    return tables


# --- figures ------------------------------------------------------------------------


def plot_carrier_layers(drift: pa.Table, arms: list[str], n_layers: int, stem: Path, formats):
    """Carrier layer per anchor where a candidate was admissible; crosses on the "none" row
    below the layers where none was (as the geometry table's carrier column says). The
    max-norm reference layer is not drawn: it is no carrier, and at 29 it read as one."""
    from rgeom.report import _figure, _save, arm_style

    fig, (ax,) = _figure(1, width=5.0, height=3.4)
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
    return _save(fig, stem, formats)


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

    from rgeom.report import _figure, _save

    noise = noise or {}
    labels = [c.label for c in cells]
    n = len(labels)
    grid = np.zeros((n, n))
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if i != j:
                v = angle.get((a, b))
                grid[i, j] = math.nan if v is None else v
    fig, (ax,) = _figure(1, width=max(3.6, 0.7 * n + 2), height=max(3.0, 0.7 * n + 1.5))
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
    return _save(fig, stem, formats)
