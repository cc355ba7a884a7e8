"""The cells rgeom.drift compares: reading their tables, and each cell's reference window.

A cell is one measured (arm, step): its direction table, its carrier table and optionally
its activation table, matched by the (arm, step) in their provenance. See rgeom.drift's
docstring for how the reference (layer, position) and its window are chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rgeom.errors import RgeomError
from rgeom.geometry import DIRECTION_SPLIT, HARMFUL, HARMLESS, load_directions
from rgeom.io import read_meta, read_table
from rgeom.layout import BASE
from rgeom.schemas import CARRIER_BASE_SCHEMA

BASE_ARM = BASE
# Files combined here must describe the same model and tokenization.
SHARED_META = ("d_model", "n_layers", "template_hash", "tokenizer_hash")


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


def _cell_key(path: Path, meta: Mapping[str, Any], kind: str) -> tuple[str, int]:
    for key in ("arm", "step"):
        if meta.get(key) is None:
            raise RgeomError(f"{path}: provenance lacks {key!r} ({kind} table)")
    return str(meta["arm"]), int(meta["step"])


def _read_direction_cells(
    directions: Sequence[str | Path],
) -> tuple[dict[tuple[str, int], Cell], dict[str, Any], dict[str, Path]]:
    """One cell per direction table, and the model facts they share (with the file each
    was first seen in, for error messages)."""
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
    return cells, shared, shared_from


def _attach_carrier(cell: Cell, p: Path, meta: Mapping[str, Any]) -> None:
    """The carrier (if any) and admissible-candidate count of carrier table ``p``."""
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


def _attach_carriers(
    cells: Mapping[tuple[str, int], Cell], carriers: Sequence[str | Path], shared: Mapping
) -> None:
    seen: dict[tuple[str, int], Path] = {}
    for p in map(Path, carriers):
        meta = read_meta(p)
        key = _cell_key(p, meta, "carrier")
        if key not in cells:
            raise RgeomError(f"{p}: arm {key[0]} step {key[1]} has no direction table")
        if key in seen:
            raise RgeomError(f"arm {key[0]} step {key[1]} has two carrier tables: {seen[key]}, {p}")
        seen[key] = p
        th = meta.get("template_hash")
        if th is not None and shared.get("template_hash") not in (None, th):
            raise RgeomError(f"{p}: template_hash differs from {cells[key].directions_path}")
        _attach_carrier(cells[key], p, meta)
    missing = [c.label for k, c in sorted(cells.items()) if k not in seen]
    if missing:
        raise RgeomError(f"drift: no carrier table for {', '.join(missing)}")


def _attach_activations(
    cells: Mapping[tuple[str, int], Cell],
    activations: Sequence[str | Path],
    shared: Mapping[str, Any],
    shared_from: Mapping[str, Path],
) -> None:
    for p in map(Path, activations):
        meta = read_meta(p)
        key = _cell_key(p, meta, "activation")
        if key not in cells:
            raise RgeomError(f"{p}: arm {key[0]} step {key[1]} has no direction table")
        for name in SHARED_META:
            if name in meta and name in shared and meta[name] != shared[name]:
                raise RgeomError(f"{p}: {name} differs from {shared_from[name]}")
        cells[key].activations = p


def read_cells(
    directions: Sequence[str | Path],
    carriers: Sequence[str | Path],
    activations: Sequence[str | Path] | None = None,
) -> tuple[list[Cell], dict[str, Any]]:
    """One :class:`Cell` per direction table, matched to its carrier (and activation) table
    by the (arm, step) in their provenance; also the model facts all files share."""
    if not directions:
        raise RgeomError("drift: no direction tables given")
    cells, shared, shared_from = _read_direction_cells(directions)
    _attach_carriers(cells, carriers, shared)
    _attach_activations(cells, activations or [], shared, shared_from)
    if "n_layers" not in shared:
        shared["n_layers"] = 1 + max(layer for c in cells.values() for layer, _ in c.raw)
    ordered = sorted(cells.values(), key=lambda c: (c.step, c.arm != BASE_ARM, c.arm))
    return ordered, shared


def arms_of(params: Mapping[str, Any], cells: Sequence[Cell]) -> list[str]:
    """The configured arms (else those the tables name); every table's arm must be one."""
    arms = list(params.get("arms") or [])
    seen = sorted({c.arm for c in cells if c.arm != BASE_ARM})
    if not arms:
        arms = seen
    unknown = [a for a in seen if a not in arms]
    if unknown:
        raise RgeomError(f"drift: tables for arm(s) {unknown} that are not in arms {arms}")
    return arms or [BASE_ARM]


def sequence(arm: str, cells: Sequence[Cell]) -> list[Cell]:
    """The arm's anchors in step order, the shared base first."""
    return sorted(
        (c for c in cells if c.arm in (arm, BASE_ARM)), key=lambda c: (c.step, c.arm != BASE_ARM)
    )


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


def place_window(cell: Cell, settings: Mapping[str, Any], n_layers: int) -> None:
    """Set the cell's reference, its window layers, their unit stack and its top-k basis."""
    cell.ref = _reference(cell)
    if not 0 <= cell.ref[0] < n_layers:
        raise RgeomError(
            f"{cell.directions_path}: reference layer {cell.ref[0]} outside the model "
            f"(n_layers={n_layers})"
        )
    cell.window = _window(cell, settings, n_layers)
    cell.stack = _stack(cell, cell.window)
    cell.basis = _top_basis(cell.stack, settings["subspace_k"])


def window_activations(cell: Cell, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
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
