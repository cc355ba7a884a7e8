"""The search for the carrier direction (Arditi et al. 2024, appendix C).

Every candidate (layer, position) direction is scored three ways on validation prompts
(:func:`score_direction`): ``bypass`` (refusal with it ablated, harmful prompts), ``induce``
(refusal with it added, harmless prompts) and ``kl`` (how far ablating it moves the harmless
next-token distribution). :func:`select_carrier` keeps the :func:`admissible` candidates
below :func:`layer_cut` and picks the one with the lowest bypass; prompt-bootstrap intervals
(:func:`bootstrap_means`) and rank-k carriers around it are optional.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.geometry import filter_by_baseline
from rgeom.hooks import PrefixCache, ablation, addition
from rgeom.models import decoder_layers
from rgeom.scoring import (
    kl_last_position,
    last_logits,
    refusal_score_from_logits,
    refusal_token_ids,
)

log = logging.getLogger(__name__)

#: ``subspace(anchor, k)``: the orthonormal rows [k, d] of a rank-k span around the anchor
#: candidate, or None where it has rank < k.
SubspaceFn = Callable[[tuple[int, int], int], np.ndarray | None]


@dataclass(frozen=True)
class ScoringSets:
    """What :func:`score_direction` scores a direction against, the same for every direction.

    ``base_harmless``: the unedited model's logits on ``harmless``, the KL's reference.
    ``cache`` (a :class:`PrefixCache` over ``harmless``) avoids rerunning the blocks before a
    direction's layer for the addition, where it holds that layer; ``cache_rows`` are the
    cache's prompts that make up ``harmless`` (all of them when None), for a cache built
    before a prompt filter.
    """

    harmful: Sequence[str]
    harmless: Sequence[str]
    refusal_ids: Sequence[int]
    base_harmless: torch.Tensor
    cache: PrefixCache | None = None
    cache_rows: Sequence[int] | None = None


def score_direction(
    model,
    tokenizer,
    vec,
    layer: int,
    sets: ScoringSets,
    batch_size: int = schema_default("carrier.batch_size"),
    ablate=None,
    share_prefix: bool = True,
) -> dict[str, Any]:
    """The carrier-search scores of one raw direction ``vec`` read at block ``layer``.

    ``bypass``: mean refusal score on ``sets.harmful`` with r-hat ablated everywhere;
    ``induce``: mean score on ``sets.harmless`` with r added at ``layer``'s input; ``kl``:
    mean KL(base || ablated) on ``sets.harmless`` against ``sets.base_harmless``.
    Also the per-prompt arrays ``bypass_scores``, ``induce_scores`` and ``kl_values``.
    ``ablate`` ([k, d]) ablates that span instead of ``vec``'s, for a rank-k carrier.
    ``share_prefix``: see :func:`~rgeom.scoring.last_logits`.
    """
    harmful, harmless, cache = sets.harmful, sets.harmless, sets.cache
    # One call for both sets: their shared opening runs once, and batches fill up.
    with ablation(model, vec if ablate is None else ablate):
        ablated = last_logits(model, tokenizer, [*harmful, *harmless], batch_size, share_prefix)
    abl_harmful, abl_harmless = ablated[: len(harmful)], ablated[len(harmful) :]
    if cache is not None and layer in cache.layers:
        add_harmless = cache.logits_with_addition(layer, vec)
        if sets.cache_rows is not None:
            add_harmless = add_harmless[list(sets.cache_rows)]
    else:
        with addition(model, vec, layer, 1.0):
            add_harmless = last_logits(model, tokenizer, harmless, batch_size, share_prefix)
    bypass = refusal_score_from_logits(abl_harmful, sets.refusal_ids).numpy()
    induce = refusal_score_from_logits(add_harmless, sets.refusal_ids).numpy()
    kl = kl_last_position(sets.base_harmless, abl_harmless).numpy()
    return {
        "bypass": float(bypass.mean()),
        "induce": float(induce.mean()),
        "kl": float(kl.mean()),
        "bypass_scores": bypass,
        "induce_scores": induce,
        "kl_values": kl,
    }


def admissible(bypass: float, induce: float, kl: float, kl_max: float) -> bool:
    """Arditi et al.'s filter_fn, negated: finite scores, KL at most kl_max, and an
    addition that does not lower the refusal score (induce >= 0)."""
    finite = all(math.isfinite(v) for v in (bypass, induce, kl))
    return bool(finite and kl <= kl_max and induce >= 0)


def layer_cut(
    n_layers: int, max_layer_frac: float = schema_default("carrier.max_layer_frac")
) -> int:
    """The first layer the search discards: candidates sit at layers < int(frac * n_layers),
    as in Arditi et al.'s ``filter_fn`` (``layer >= int(n_layer * (1 - 0.2))`` is pruned).
    The int() matters: for 32 layers the cut is 25, where ``layer < 0.8 * 32`` would keep 25."""
    return int(max_layer_frac * n_layers)


@dataclass
class CarrierSearch:
    """Every candidate's scores and the chosen carrier (None if no candidate qualifies)."""

    carrier: tuple[int, int] | None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    reused_prefix: bool = False
    # Prompt filter record: enabled, and kept / total per set (see filter_by_baseline).
    prompt_filter: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 0
    ci: float = 0.95
    # Rank-k carriers around the rank-1 one (select_carrier's subspace_ranks), one per rank.
    subspaces: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SearchSettings:
    """How :func:`select_carrier` scores and admits candidates.

    The settings the config also has take the schema's ``carrier`` defaults. The rest are
    off unless asked for: the workflow's stage (:func:`rgeom.carrier_table.carrier_search_table`)
    passes the config's bootstrap and ranks, and applies ``carrier.filter_prompts`` as the
    shared source-model filter, so ``filter_prompts`` here (this model's own baseline
    filter, :func:`~rgeom.geometry.filter_by_baseline`) stays off there.
    """

    max_layer_frac: float = schema_default("carrier.max_layer_frac")
    kl_max: float = schema_default("carrier.kl_max")
    batch_size: int = schema_default("carrier.batch_size")
    reuse_prefix: bool = schema_default("carrier.reuse_prefix")
    filter_prompts: bool = False
    min_prompts: int = 1
    n_boot: int = 0
    ci: float = schema_default("carrier.ci")
    seed: int = 0
    subspace_ranks: Sequence[int] = ()


@functools.lru_cache(maxsize=8)
def _resamples(seed: int, stream: int, n_boot: int, n: int) -> np.ndarray:
    """[n_boot, n] resampled indices, drawn once and shared by every candidate."""
    return np.stack(
        [np.random.default_rng([seed, stream, b]).integers(0, n, n) for b in range(n_boot)]
    )


def bootstrap_means(
    values: np.ndarray, n_boot: int, ci: float, seed: int, stream: int = 0
) -> tuple[float | None, float | None]:
    """Percentile interval of the mean of ``values`` over ``n_boot`` prompt resamples.

    Replicate b draws from a generator seeded by (seed, stream, b) alone, so every candidate
    resamples the same prompts (stream 0: harmful, 1: harmless) and their intervals are
    paired. None without replicates, or where any value is not finite.
    """
    values = np.asarray(values, dtype=np.float64)
    if n_boot < 1 or len(values) == 0 or not np.isfinite(values).all():
        return None, None
    means = values[_resamples(seed, stream, n_boot, len(values))].mean(axis=1)
    tail = 100 * (1 - ci) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class _ValidationSets:
    """The validation prompts every candidate is scored on, after any prompt filter, and
    the base model's refusal scores and the filter's record."""

    scoring: ScoringSets
    baseline: dict[str, float]
    prompt_filter: dict[str, Any]


@dataclass(frozen=True)
class _Scorer:
    """:func:`score_direction` with everything but the direction fixed for one search."""

    model: Any
    tokenizer: Any
    sets: ScoringSets
    settings: SearchSettings

    def __call__(self, vec, layer: int, ablate=None) -> dict[str, Any]:
        return score_direction(
            self.model,
            self.tokenizer,
            vec,
            layer,
            self.sets,
            self.settings.batch_size,
            ablate=ablate,
            share_prefix=self.settings.reuse_prefix,
        )


def _candidate_vectors(
    directions: Mapping[tuple[int, int], Any], n_layers: int
) -> dict[tuple[int, int], np.ndarray]:
    """The candidate directions as float64 vectors, in (layer, position) order."""
    candidates = {
        key: np.asarray(r, dtype=np.float64).reshape(-1) for key, r in sorted(directions.items())
    }
    for layer, _ in candidates:
        if not 0 <= layer < n_layers:
            raise RgeomError(f"candidate direction at layer {layer}: n_layers={n_layers}")
    return candidates


def _addition_cache(
    model, tokenizer, harmless: Sequence[str], layers: set[int], settings: SearchSettings
) -> PrefixCache | None:
    """The base model's block inputs on ``harmless`` at ``layers`` (the evaluable
    candidates'), or None where ``reuse_prefix`` is off or the model cannot restart."""
    if not settings.reuse_prefix:
        return None
    cache = PrefixCache(
        model, tokenizer, harmless, sorted(layers), settings.batch_size, settings.reuse_prefix
    )
    return cache if cache.usable else None


def _validation_sets(
    model,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    cache: PrefixCache | None,
    settings: SearchSettings,
) -> _ValidationSets:
    """The base model's refusal scores on both sets and, with ``filter_prompts``, the
    prompts :func:`filter_by_baseline` keeps."""
    # The cache already ran the base model over the harmless prompts.
    base_harmless = (
        cache.base
        if cache is not None
        else last_logits(model, tokenizer, harmless, settings.batch_size, settings.reuse_prefix)
    )
    base_harmful = last_logits(
        model, tokenizer, harmful, settings.batch_size, settings.reuse_prefix
    )
    score_h = refusal_score_from_logits(base_harmful, refusal_ids).numpy()
    score_b = refusal_score_from_logits(base_harmless, refusal_ids).numpy()
    baseline = {"harmful": float(score_h.mean()), "harmless": float(score_b.mean())}
    if not settings.filter_prompts:
        record = {
            "enabled": False,
            "harmful_kept": len(harmful),
            "harmful_total": len(harmful),
            "harmless_kept": len(harmless),
            "harmless_total": len(harmless),
        }
        sets = ScoringSets(list(harmful), list(harmless), refusal_ids, base_harmless, cache)
        return _ValidationSets(sets, baseline, record)
    keep_h, keep_b, record = filter_by_baseline(score_h, score_b, settings.min_prompts)
    log.info(
        "prompt filter: harmful %d/%d, harmless %d/%d kept",
        len(keep_h),
        len(harmful),
        len(keep_b),
        len(harmless),
    )
    baseline.update(
        harmful_kept=float(score_h[keep_h].mean()), harmless_kept=float(score_b[keep_b].mean())
    )
    sets = ScoringSets(
        harmful=[harmful[i] for i in keep_h],
        harmless=[harmless[i] for i in keep_b],
        refusal_ids=refusal_ids,
        base_harmless=base_harmless[keep_b],
        cache=cache,
        # The cache keeps every harmless prompt; the additions are read at the kept rows.
        cache_rows=keep_b.tolist(),
    )
    return _ValidationSets(sets, baseline, record)


def _unscored(row: dict[str, Any]) -> dict[str, Any]:
    row.update(bypass=math.nan, induce=math.nan, kl=math.nan, admissible=False)
    return row


def _candidate_row(
    layer: int, pos: int, vec: np.ndarray, score: _Scorer, settings: SearchSettings
) -> dict[str, Any]:
    """One evaluable candidate's scores, bootstrap intervals and admissibility."""
    row: dict[str, Any] = {"layer": layer, "position": pos}
    scores = score(vec, layer)
    bypass, induce, kl = scores["bypass"], scores["induce"], scores["kl"]
    # Streams: harmful prompts 0, harmless 1, so induce and kl share their resamples.
    for name, values, stream in (
        ("bypass", scores["bypass_scores"], 0),
        ("induce", scores["induce_scores"], 1),
        ("kl", scores["kl_values"], 1),
    ):
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_means(
            values, settings.n_boot, settings.ci, settings.seed, stream
        )
    row.update(
        bypass=bypass,
        induce=induce,
        kl=kl,
        admissible=admissible(bypass, induce, kl, settings.kl_max),
    )
    log.info("candidate L%d p%d: bypass %.3f induce %.3f kl %.4f", layer, pos, bypass, induce, kl)
    return row


def _subspace_rows(
    anchor: tuple[int, int],
    anchor_admissible: bool,
    raw: np.ndarray,
    subspace: SubspaceFn,
    score: _Scorer,
    settings: SearchSettings,
) -> list[dict[str, Any]]:
    """The rank-k carriers around ``anchor`` (raw direction ``raw``), one per rank: the span
    ablated for bypass and KL, ``raw`` projected onto it added for induce."""
    rows = []
    for k in sorted(set(settings.subspace_ranks)):
        basis = subspace(anchor, k)
        sub: dict[str, Any] = {
            "rank": k,
            "layer": anchor[0],
            "position": anchor[1],
            "anchor_admissible": anchor_admissible,
        }
        if basis is None:
            rows.append(_unscored(sub))
            continue
        scores = score(basis.T @ (basis @ raw), anchor[0], ablate=basis)
        bypass, induce, kl = scores["bypass"], scores["induce"], scores["kl"]
        sub.update(
            bypass=bypass,
            induce=induce,
            kl=kl,
            admissible=admissible(bypass, induce, kl, settings.kl_max),
        )
        rows.append(sub)
        log.info(
            "rank-%d subspace at L%d p%d: bypass %.3f induce %.3f kl %.4f",
            k,
            anchor[0],
            anchor[1],
            bypass,
            induce,
            kl,
        )
    return rows


def _carrier_and_anchor(
    rows: Sequence[dict[str, Any]],
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The carrier (the admissible row with the lowest bypass) and the rank-k carriers'
    anchor: the carrier, or with none admissible the lowest-bypass scored row."""
    chosen = [row for row in rows if row["admissible"]]
    best = min(chosen, key=lambda row: row["bypass"]) if chosen else None
    carrier = (best["layer"], best["position"]) if best else None
    scored = [r for r in rows if math.isfinite(r["bypass"])]
    anchor = carrier
    if anchor is None and scored:
        low = min(scored, key=lambda r: (r["bypass"], r["layer"]))
        anchor = (low["layer"], low["position"])
    return carrier, anchor


def select_carrier(
    model,
    tokenizer,
    directions: Mapping[tuple[int, int], Any],
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    subspace: SubspaceFn | None = None,
    settings: SearchSettings | None = None,
    **overrides: Any,
) -> CarrierSearch:
    """Pick the refusal direction that carries refusal (Arditi et al. 2024, appendix C).

    ``settings`` (a :class:`SearchSettings`, its defaults when None) with any of its fields
    overridden by keyword (``kl_max=0.05``) say how.

    For each candidate (layer, position) direction r: ``bypass`` is the mean refusal score
    on the harmful validation prompts with r-hat ablated everywhere; ``induce`` the mean
    score on the harmless ones with r added at its layer's input; ``kl`` the mean
    KL(base || ablated) of the next-token distribution on the harmless ones. Admissible
    candidates are finite, sit below layer ``int(max_layer_frac * n_layers)``
    (:func:`layer_cut`; later layers tend to act on the output vocabulary, not on the
    decision), keep ``kl <= kl_max`` and have ``induce >= 0`` (Arditi et al. discard
    ``kl > 0.1`` and ``induce < 0``); the carrier is the admissible one with the lowest
    ``bypass``.
    Candidates at or above the layer cut are recorded but not evaluated. With
    ``reuse_prefix`` the addition reruns only the blocks from its layer on, starting from
    cached base activations (see :class:`~rgeom.hooks.PrefixCache`), and every other pass
    runs the prompts' shared opening once (see :func:`~rgeom.scoring.last_logits`).

    ``filter_prompts`` first drops the prompts whose baseline behaviour is already the
    wrong one (:func:`filter_by_baseline`); the base logits it needs are computed anyway.
    ``n_boot`` > 0 adds prompt-bootstrap ``ci`` intervals to every evaluated candidate's
    three scores (``bypass_ci_low`` ... ``kl_ci_high``), resampled with ``seed``.

    ``subspace_ranks`` adds rank-k carriers around the rank-1 carrier (or, with none
    admissible, the lowest-bypass candidate): ``subspace(anchor, k)`` gives the span's
    orthonormal rows [k, d] (None where it has rank < k). Bypass and KL ablate the whole
    span; induce adds the anchor's raw direction projected onto the span at the anchor's
    layer (the subspace's component of the mean difference); the same :func:`admissible`
    rule applies.
    """
    settings = dataclasses.replace(settings or SearchSettings(), **overrides)
    if not harmful or not harmless:
        raise RgeomError("carrier search needs both harmful and harmless validation prompts")
    n_layers = len(decoder_layers(model))
    refusal_ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(tokenizer)
    candidates = _candidate_vectors(directions, n_layers)
    cut = layer_cut(n_layers, settings.max_layer_frac)
    # A zero or non-finite vector (e.g. at a template token every prompt shares) is no
    # direction to ablate.
    evaluable = {
        (layer, pos)
        for (layer, pos), vec in candidates.items()
        if layer < cut and np.isfinite(vec).all() and vec.any()
    }
    cache = _addition_cache(model, tokenizer, harmless, {layer for layer, _ in evaluable}, settings)
    sets = _validation_sets(model, tokenizer, harmful, harmless, refusal_ids, cache, settings)
    score = _Scorer(model, tokenizer, sets.scoring, settings)
    rows = [
        _candidate_row(layer, pos, vec, score, settings)
        if (layer, pos) in evaluable
        else _unscored({"layer": layer, "position": pos})
        for (layer, pos), vec in candidates.items()
    ]
    carrier, anchor = _carrier_and_anchor(rows)
    subspaces = []
    if anchor is not None and subspace is not None:
        raw = np.asarray(candidates[anchor], dtype=np.float64).reshape(-1)
        subspaces = _subspace_rows(anchor, carrier is not None, raw, subspace, score, settings)
    return CarrierSearch(
        carrier=carrier,
        candidates=rows,
        baseline=sets.baseline,
        reused_prefix=cache is not None,
        prompt_filter=sets.prompt_filter,
        n_boot=int(settings.n_boot),
        ci=float(settings.ci),
        subspaces=subspaces,
    )
