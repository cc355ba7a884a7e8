"""Cross-anchor transfer (``rgeom cross-anchor``, issue #5).

For a target cell b, the direction of every source cell a of the same arm (the base
included; for the base, every cell) is applied to b's model at a's layer, with b's own
validation prompts and refusal tokens: ``bypass``, ``induce`` and ``kl`` exactly as in the
carrier search (a == b reproduces b's carrier-table row). Per-prompt bypass scores and b's
unedited harmful scores are stored, so ``rgeom drift`` can bootstrap the transfer ratio
(:func:`transfer`): how much of b's own direction's bypass effect a's direction achieves.

Torch is imported only when :func:`cross_anchor_table` runs: drift reads the tables and
computes the ratio without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rgeom.causal_choice import Choice, carrier_settings, choose_direction
from rgeom.causal_inputs import carrier_refusal_ids, check_tables, read_prompts
from rgeom.errors import RgeomError
from rgeom.geometry import load_directions
from rgeom.io import read_meta, read_table, write_table
from rgeom.layout import BASE
from rgeom.schemas import CROSS_SCHEMA

log = logging.getLogger(__name__)


def cell_of(meta: Mapping[str, Any], path) -> tuple[str, int]:
    """The (arm, step) cell a table's provenance names."""
    if meta.get("arm") is None or meta.get("step") is None:
        raise RgeomError(f"{path}: provenance lacks arm or step")
    return str(meta["arm"]), int(meta["step"])


@dataclass(frozen=True)
class CrossAnchorInputs:
    """The files :func:`cross_anchor_table` reads: every source cell's direction and carrier
    table (the target's among them) and the target's validation prompt sets."""

    directions: Sequence[str | Path]
    carriers: Sequence[str | Path]
    val_harmful: str | Path
    val_harmless: str | Path


def cross_anchor_table(
    model,
    tokenizer,
    inputs: CrossAnchorInputs,
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> pa.Table:
    """Apply every source cell's direction to this model (the target cell in ``meta``)."""
    from rgeom.carrier_search import ScoringSets, score_direction

    directions, carriers = inputs.directions, inputs.carriers
    max_layer_frac, kl_max, batch_size = carrier_settings(params)
    target = (str(meta.get("arm")), int(meta.get("step")))
    check_tables(tokenizer, model, *directions, *carriers)
    dirs, cars = _tables_by_cell(directions, carriers, target)
    refusal_ids = carrier_refusal_ids(tokenizer, cars[target])
    own = load_directions(dirs[target])
    sources = _source_directions(dirs, cars, max_layer_frac, kl_max)

    harmful = read_prompts("val_harmful", inputs.val_harmful)[0]
    harmless = read_prompts("val_harmless", inputs.val_harmless)[0]
    if not harmful or not harmless:
        raise RgeomError("cross-anchor needs harmful and harmless validation prompts")
    layers = sorted({c.layer for _, c, _ in sources})
    cache, base_harmless, baseline, baseline_harmless = _baselines(
        model, tokenizer, harmful, harmless, layers, refusal_ids, batch_size
    )
    sets = ScoringSets(harmful, harmless, refusal_ids, base_harmless, cache)

    rows = []
    for cell, choice, vec in sources:
        got = score_direction(model, tokenizer, vec, choice.layer, sets, batch_size)
        row = _cross_row(target, cell, choice, _cosine(vec, own.get(choice.key)), got)
        row.update(
            baseline_harmful=float(baseline.mean()),
            baseline_harmless=baseline_harmless,
            baseline_scores=baseline.tolist(),
        )
        rows.append(row)
        log.info(
            "%s@%d -> %s@%d (L%d, %s): bypass %.3f (baseline %.3f) induce %.3f kl %.4f",
            *cell,
            *target,
            choice.layer,
            choice.source,
            got["bypass"],
            baseline.mean(),
            got["induce"],
            got["kl"],
        )
    table = pa.table(
        {name: [row[name] for row in rows] for name in CROSS_SCHEMA.names}, schema=CROSS_SCHEMA
    )
    record = dict(meta)
    record.update(
        refusal_token_ids=refusal_ids,
        max_layer_frac=max_layer_frac,
        reused_prefix=cache is not None,
        inputs={"directions": [str(p) for p in directions], "carriers": [str(p) for p in carriers]},
    )
    write_table(out, table, CROSS_SCHEMA, record)
    return table


def _tables_by_cell(
    directions: Sequence[str | Path], carriers: Sequence[str | Path], target: tuple[str, int]
) -> tuple[dict[tuple[str, int], Path], dict[tuple[str, int], Path]]:
    """The direction and carrier table of each source cell: one of each, the target's too."""
    dirs = {cell_of(read_meta(p), p): Path(p) for p in directions}
    cars = {cell_of(read_meta(p), p): Path(p) for p in carriers}
    if len(dirs) != len(directions) or len(cars) != len(carriers):
        raise RgeomError("cross-anchor: two direction or carrier tables for the same cell")
    if set(dirs) != set(cars):
        raise RgeomError(
            f"cross-anchor: direction tables for {sorted(dirs)} but carrier tables for "
            f"{sorted(cars)}"
        )
    if target not in dirs:
        raise RgeomError(f"cross-anchor: the target cell {target} is not among the sources")
    return dirs, cars


def _source_directions(
    dirs: Mapping[tuple[str, int], Path],
    cars: Mapping[tuple[str, int], Path],
    max_layer_frac: float,
    kl_max: float,
) -> list[tuple[tuple[str, int], Choice, np.ndarray]]:
    """Each source cell's chosen direction, by step with the base first among equals."""
    sources = []
    for cell in sorted(dirs, key=lambda c: (c[1], c[0] != BASE, c[0])):
        raw = load_directions(dirs[cell])
        choice = choose_direction(cars[cell], raw, max_layer_frac, kl_max)
        sources.append((cell, choice, raw[choice.key]))
    return sources


def _baselines(model, tokenizer, harmful, harmless, layers, refusal_ids, batch_size):
    """The shared-prefix cache (None where unusable), the unedited harmless logits, the
    unedited per-prompt harmful refusal scores and the mean harmless refusal score."""
    from rgeom.interventions import PrefixCache, last_logits, refusal_score_from_logits

    cache = PrefixCache(model, tokenizer, harmless, layers, batch_size)
    base_harmless = cache.base if cache.usable else last_logits(model, tokenizer, harmless)
    cache = cache if cache.usable else None
    baseline = refusal_score_from_logits(
        last_logits(model, tokenizer, harmful, batch_size), refusal_ids
    ).numpy()
    baseline_harmless = float(refusal_score_from_logits(base_harmless, refusal_ids).mean())
    return cache, base_harmless, baseline, baseline_harmless


def _cosine(vec: np.ndarray, mine: np.ndarray | None) -> float | None:
    """Cosine of a source direction with the target's own direction at the same site."""
    if mine is None or not np.linalg.norm(mine) > 0:
        return None
    return float(vec @ mine / (np.linalg.norm(vec) * np.linalg.norm(mine)))


def _cross_row(
    target: tuple[str, int],
    cell: tuple[str, int],
    choice: Choice,
    cos: float | None,
    got: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "arm": target[0],
        "step": target[1],
        "source_arm": cell[0],
        "source_step": cell[1],
        "layer": choice.layer,
        "position": choice.position,
        "admissible": choice.admissible,
        "carrier_source": choice.source,
        "cos_same_site": cos,
        "bypass": got["bypass"],
        "induce": got["induce"],
        "kl": got["kl"],
        "bypass_scores": got["bypass_scores"].tolist(),
    }


def read_cross_anchor(paths: Sequence[str | Path]) -> pa.Table:
    """Every cross-anchor table in one, one target cell per file."""
    tables, seen = [], {}
    for p in map(Path, paths):
        meta = read_meta(p)
        key = cell_of(meta, p)
        if key in seen:
            raise RgeomError(f"two cross-anchor tables for {key}: {seen[key]} and {p}")
        seen[key] = p
        tables.append(read_table(p, schema=CROSS_SCHEMA).select(CROSS_SCHEMA.names))
    if not tables:
        return CROSS_SCHEMA.empty_table()
    return pa.concat_tables(tables).cast(CROSS_SCHEMA)


@dataclass
class Transfer:
    """How much of the late anchor's own bypass effect the early anchor's direction gives.

    ``effect_own`` = mean(baseline - bypass of b's own direction at b); ``effect_early`` the
    same for a's direction; ``ratio`` = effect_early / effect_own, with a paired prompt
    bootstrap interval (None with fewer than 10 finite replicates or n_boot 0).
    """

    effect_own: float
    effect_early: float
    ratio: float
    ci_low: float | None
    ci_high: float | None
    own_ci_low: float | None


def transfer(
    baseline: Sequence[float],
    bypass_early: Sequence[float],
    bypass_own: Sequence[float],
    n_boot: int,
    level: float,
    seed: int,
) -> Transfer:
    if not len(baseline) == len(bypass_early) == len(bypass_own) or not len(baseline):
        raise RgeomError("transfer: per-prompt score lists differ in length or are empty")
    base = np.asarray(baseline, dtype=np.float64)
    early = base - np.asarray(bypass_early, dtype=np.float64)
    own = base - np.asarray(bypass_own, dtype=np.float64)

    def ratio(e, o):
        return float(e.mean() / o.mean()) if o.mean() != 0 else math.nan

    point = ratio(early, own)
    rng = np.random.default_rng([seed, 5])
    reps, own_reps = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(base), len(base))
        reps.append(ratio(early[idx], own[idx]))
        own_reps.append(float(own[idx].mean()))
    tail = 100 * (1 - level) / 2
    finite = [v for v in reps if math.isfinite(v)]
    lo = hi = own_lo = None
    if len(finite) >= 10:
        lo, hi = (float(v) for v in np.percentile(finite, [tail, 100 - tail]))
        own_lo = float(np.percentile(own_reps, tail))
    return Transfer(float(own.mean()), float(early.mean()), point, lo, hi, own_lo)
