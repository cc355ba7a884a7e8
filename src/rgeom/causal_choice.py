"""The direction of a cell: the one (layer, position) every causal stage acts on (issue #5).

Every stage in :mod:`rgeom.causal` acts on one direction per (arm, step) cell, chosen by
:func:`choose_direction` from the cell's carrier table (``rgeom carriers``):

* ``carrier``: the admissible candidate with the lowest bypass score (the carrier);
* ``fallback_min_bypass``: where no candidate is admissible (SmolLM2 at the base: adding
  any candidate lowers the refusal score on harmless prompts, ``induce < 0``), the evaluated
  candidate (below ``carrier.max_layer_frac`` of the depth) with the lowest bypass score
  among those within ``carrier.kl_max``, or among all of them if none is;
* ``fallback_max_norm``: where no candidate has a finite score, the largest direction
  below the layer cut at the carrier search's first position.

Every output row carries ``admissible`` and ``carrier_source``, so a fallback is never
read as a carrier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rgeom.config import schema_default, setting
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table
from rgeom.schemas import CARRIER_BASE_SCHEMA

CARRIER = "carrier"
FALLBACK_MIN_BYPASS = "fallback_min_bypass"
FALLBACK_MAX_NORM = "fallback_max_norm"


@dataclass(frozen=True)
class Choice:
    layer: int
    position: int
    admissible: bool
    source: str

    @property
    def key(self) -> tuple[int, int]:
        return self.layer, self.position


def carrier_settings(params: Mapping[str, Any]) -> tuple[float, float, int]:
    """``carrier.max_layer_frac``, ``carrier.kl_max`` and ``carrier.batch_size`` of a run's
    parameters, the schema's defaults where absent."""
    return (
        float(setting(params, "carrier.max_layer_frac")),
        float(setting(params, "carrier.kl_max")),
        int(setting(params, "carrier.batch_size")),
    )


def choose_direction(
    carriers: str | Path,
    directions: Mapping[tuple[int, int], np.ndarray],
    max_layer_frac: float | None = None,
    kl_max: float | None = None,
) -> Choice:
    """The carrier of a cell, or the labelled fallback (see the module docstring).

    ``max_layer_frac`` and ``kl_max`` default to the schema's ``carrier`` values."""
    if max_layer_frac is None:
        max_layer_frac = schema_default("carrier.max_layer_frac")
    if kl_max is None:
        kl_max = schema_default("carrier.kl_max")
    rows = read_table(carriers, schema=CARRIER_BASE_SCHEMA).to_pylist()
    chosen = [r for r in rows if r["is_carrier"]]
    if len(chosen) > 1:
        raise RgeomError(f"{carriers}: {len(chosen)} rows have is_carrier; at most one may")
    if chosen:
        key = (int(chosen[0]["layer"]), int(chosen[0]["position"]))
        if key not in directions:
            raise RgeomError(f"{carriers}: carrier {key} is not in the direction table")
        return Choice(*key, admissible=True, source=CARRIER)
    n_layers = read_meta(carriers).get("n_layers")
    if n_layers is None:
        n_layers = 1 + max(layer for layer, _ in directions)
    cut = max_layer_frac * int(n_layers)
    return _min_bypass(rows, directions, cut, kl_max) or _max_norm(carriers, rows, directions, cut)


def _usable(directions: Mapping[tuple[int, int], np.ndarray], key) -> bool:
    vec = directions.get(key)
    return vec is not None and bool(np.isfinite(vec).all()) and bool(np.any(vec))


def _min_bypass(
    rows: list[dict[str, Any]],
    directions: Mapping[tuple[int, int], np.ndarray],
    cut: float,
    kl_max: float,
) -> Choice | None:
    """The ``fallback_min_bypass`` choice, or None where no row has a finite score."""
    scored = [
        r
        for r in rows
        if r["bypass"] is not None
        and math.isfinite(r["bypass"])
        and r["layer"] < cut
        and _usable(directions, (r["layer"], r["position"]))
    ]
    if not scored:
        return None
    # A direction whose ablation breaks the model also "bypasses" refusal; prefer not.
    gentle = [r for r in scored if r["kl"] is not None and r["kl"] <= kl_max]
    best = min(gentle or scored, key=lambda r: (r["bypass"], r["layer"]))
    return Choice(int(best["layer"]), int(best["position"]), False, FALLBACK_MIN_BYPASS)


def _max_norm(
    carriers: str | Path,
    rows: list[dict[str, Any]],
    directions: Mapping[tuple[int, int], np.ndarray],
    cut: float,
) -> Choice:
    """The ``fallback_max_norm`` choice: the largest usable direction."""
    positions = sorted({int(r["position"]) for r in rows}) or sorted({p for _, p in directions})
    pos = -1 if -1 in positions else positions[0]
    keys = [k for k in directions if k[1] == pos and k[0] < cut and _usable(directions, k)]
    if not keys:
        keys = [k for k in directions if _usable(directions, k)]
    if not keys:
        raise RgeomError(f"{carriers}: no usable direction to fall back to")
    layer, pos = max(keys, key=lambda k: float(np.linalg.norm(directions[k])))
    return Choice(int(layer), int(pos), False, FALLBACK_MAX_NORM)
