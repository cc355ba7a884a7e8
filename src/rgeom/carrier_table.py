"""The carrier search on files: a direction table and two validation prompt sets in, one
row per candidate (scores, intervals, whether it is the carrier) out.

The search itself is :func:`rgeom.carrier_search.select_carrier`; this module picks the
candidates (:func:`select_candidates`), the validation prompts (after the shared prompt
filter) and the rank-k spans, and writes ``carriers.parquet`` with its metadata.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rgeom.activations import load_prompt_set, prompt_text, template_hash, tokenizer_hash
from rgeom.carrier_search import (
    CarrierSearch,
    SearchSettings,
    SubspaceFn,
    layer_cut,
    select_carrier,
)
from rgeom.causal_subspace import contrast_vectors, subspace_basis
from rgeom.config import schema_default, section_with_defaults
from rgeom.errors import RgeomError
from rgeom.geometry import load_directions, load_prompt_filter
from rgeom.io import read_meta, write_table
from rgeom.models import decoder_layers
from rgeom.schemas import CARRIER_SCHEMA
from rgeom.scoring import refusal_token_ids

log = logging.getLogger(__name__)

CI_COLUMNS = tuple(f"{s}_ci_{e}" for s in ("bypass", "induce", "kl") for e in ("low", "high"))


def _prompt_texts(
    key: str,
    path: str | Path,
    keep: set[str] | None = None,
    expected: set[str] | None = None,
) -> list[str]:
    """The chat user messages of a prompt set, in file order; with ``keep``, only the
    prompts whose ids it holds (a shared prompt filter's kept ids), after checking that the
    set's ids are the filter's ``expected`` ones."""
    table = load_prompt_set(key, path).to_pydict()
    contexts = table.get("context") or [None] * len(table["text"])
    if keep is not None:
        ids = set(map(str, table["prompt_id"]))
        strangers, unknown = sorted((expected or keep) - ids), sorted(ids - (expected or ids))
        if strangers or unknown:
            raise RgeomError(
                f"prompt set {key!r}: {path} lacks prompt(s) {strangers[:3]} and has "
                f"prompt(s) {unknown[:3]} unknown to the prompt filter; the filter was built "
                "from other prompt sets"
            )
    return [
        prompt_text(t, c)
        for pid, t, c in zip(table["prompt_id"], table["text"], contexts, strict=True)
        if keep is None or str(pid) in keep
    ]


def _int_list(value, key: str) -> list[int]:
    if not isinstance(value, list | tuple) or not value:
        raise RgeomError(f"carrier.{key} must be a non-empty list of integers, got {value!r}")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool):
            raise RgeomError(f"carrier.{key}: {v!r} is not an integer")
    return sorted(set(value))


def select_candidates(
    directions: Mapping[tuple[int, int], Any],
    n_layers: int,
    params: Mapping[str, Any],
    source: str | Path = "the direction table",
) -> dict[tuple[int, int], Any]:
    """The (layer, position) candidates the carrier search evaluates.

    Every candidate costs three forward passes over the validation sets. ``positions``
    null (the default, as in Arditi et al.) takes every post-instruction position in the
    direction table; a list restricts the search to those. ``layers`` is an explicit list,
    or (null) every layer below :func:`layer_cut` whose index is a multiple of
    ``layer_stride``. Striding on the absolute index, not on the list of captured layers,
    keeps the same candidates in every (arm, step) cell.
    """
    params = section_with_defaults("carrier", params)
    have = {(int(layer), int(pos)) for layer, pos in directions}
    raw_positions = params["positions"]
    if raw_positions is None:
        positions = sorted({p for _, p in have})
    else:
        positions = _int_list(raw_positions, "positions")
    bad = [p for p in positions if p >= 0]
    if bad:
        raise RgeomError(
            f"carrier.positions: {bad} are not negative; positions count back from the end "
            "of the prompt (-1 is the last template token)"
        )
    stride = params["layer_stride"]
    stride = 1 if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise RgeomError(f"carrier.layer_stride must be an integer >= 1, got {stride!r}")
    for pos in positions:
        if not any(p == pos for _, p in have):
            held = sorted({p for _, p in have})
            raise RgeomError(f"carrier.positions: position {pos} is not in {source} (has {held})")
    if params["layers"] is None:
        cut = layer_cut(n_layers, float(params["max_layer_frac"]))
        keys = [
            (layer, pos)
            for layer, pos in sorted(have)
            if pos in positions and layer < cut and layer % stride == 0
        ]
        if not keys:
            raise RgeomError(
                f"carrier: no candidate in {source} below layer {cut} with layer_stride "
                f"{stride} at positions {positions}"
            )
    else:
        layers = _int_list(params["layers"], "layers")
        outside = [layer for layer in layers if not 0 <= layer < n_layers]
        if outside:
            raise RgeomError(
                f"carrier.layers: {outside} outside the model (n_layers={n_layers}, valid "
                f"0..{n_layers - 1})"
            )
        keys = [(layer, pos) for layer in layers for pos in positions]
        missing = [k for k in keys if k not in have]
        if missing:
            raise RgeomError(
                f"carrier.layers: (layer, position) {missing[0]} is not in {source}; "
                "capture it with activations.layers"
            )
    return {k: directions[k] for k in keys}


def _check_direction_source(directions: str | Path, model, tokenizer) -> dict[str, Any]:
    """The direction table's metadata, after checking that it was extracted with this
    model's chat template, vocabulary and depth."""
    source = read_meta(directions)
    for key, fn in (("template_hash", template_hash), ("tokenizer_hash", tokenizer_hash)):
        if key in source and source[key] != fn(tokenizer):
            raise RgeomError(
                f"{directions}: {key} differs from the model's tokenizer; the directions were "
                "extracted with another chat template or vocabulary"
            )
    n_layers = len(decoder_layers(model))
    if "n_layers" in source and int(source["n_layers"]) != n_layers:
        raise RgeomError(
            f"{directions}: written for a model with n_layers={source['n_layers']}, but the "
            f"model has {n_layers}"
        )
    return source


def _search_settings(params: Mapping[str, Any], seed: int) -> SearchSettings:
    """The search's settings from a ``carrier`` config section (its defaults filled in),
    after checking the ones the schema cannot."""
    n_boot = params["n_boot"]
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 0:
        raise RgeomError(f"carrier.n_boot must be an integer >= 0, got {n_boot!r}")
    ci = params["ci"]
    if not isinstance(ci, int | float) or isinstance(ci, bool) or not 0 < ci < 1:
        raise RgeomError(f"carrier.ci must be in (0, 1), got {ci!r}")
    ranks = params["subspace_ranks"]
    ranks = [] if ranks in (None, []) else _int_list(ranks, "subspace_ranks")
    if any(not 2 <= k <= 3 for k in ranks):
        raise RgeomError(f"carrier.subspace_ranks must lie in 2..3, got {ranks}")
    return SearchSettings(
        max_layer_frac=float(params["max_layer_frac"]),
        kl_max=float(params["kl_max"]),
        batch_size=int(params["batch_size"]),
        reuse_prefix=bool(params["reuse_prefix"]),
        n_boot=n_boot,
        ci=float(ci),
        seed=int(seed),
        subspace_ranks=ranks,
    )


def _rank_k_spans(
    activations: str | Path | None, candidates: Mapping[tuple[int, int], Any], ranks
) -> SubspaceFn | None:
    """The rank-k span around a candidate (:func:`rgeom.causal_subspace.subspace_basis`:
    r-hat, then the top per-prompt contrasts of the cell's activation table); None without
    that table or without ranks."""
    if activations is None or not ranks:
        return None

    def subspace(anchor: tuple[int, int], k: int) -> np.ndarray | None:
        basis = subspace_basis(candidates[anchor], contrast_vectors(activations, *anchor), k)
        return basis if len(basis) == k else None

    return subspace


def _validation_prompts(
    harmful: str | Path, harmless: str | Path, prompt_filter: str | Path | None
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Both validation sets' prompts, restricted to the shared prompt filter's kept ``val``
    ids when there is one, and the filter's record with the kept counts."""
    keep: dict[str, set[str] | None] = {"harmful": None, "harmless": None}
    every: dict[str, set[str] | None] = {"harmful": None, "harmless": None}
    pf: dict[str, Any] = {"enabled": False}
    if prompt_filter is not None:
        kept, every, pf = load_prompt_filter(prompt_filter, "val")
        keep = {label: kept[label] for label in keep}
    harmful_texts = _prompt_texts("val_harmful", harmful, keep["harmful"], every["harmful"])
    harmless_texts = _prompt_texts("val_harmless", harmless, keep["harmless"], every["harmless"])
    pf.update(harmful_kept=len(harmful_texts), harmless_kept=len(harmless_texts))
    return harmful_texts, harmless_texts, pf


def _candidate_table(result: CarrierSearch, pf: Mapping[str, Any]) -> pa.Table:
    rows = result.candidates
    # Rows at or above the layer cut were never scored, so they have no interval keys.
    evaluated = ["bypass_ci_low" in r for r in rows]
    return pa.table(
        {
            "layer": [r["layer"] for r in rows],
            "position": [r["position"] for r in rows],
            "bypass": [r["bypass"] for r in rows],
            "induce": [r["induce"] for r in rows],
            "kl": [r["kl"] for r in rows],
            "admissible": [r["admissible"] for r in rows],
            "is_carrier": [(r["layer"], r["position"]) == result.carrier for r in rows],
            **{c: pa.array([r.get(c) for r in rows], pa.float64()) for c in CI_COLUMNS},
            "n_harmful": pa.array(
                [pf["harmful_kept"] if e else None for e in evaluated], pa.int32()
            ),
            "n_harmless": pa.array(
                [pf["harmless_kept"] if e else None for e in evaluated], pa.int32()
            ),
        }
    )


def _selection_record(
    settings: SearchSettings,
    candidates: Mapping[tuple[int, int], Any],
    params: Mapping[str, Any],
    n_layers: int,
    searched_ranks: bool,
) -> dict[str, Any]:
    """What the search chose among: the metadata's ``selection``."""
    return {
        "max_layer_frac": settings.max_layer_frac,
        "kl_max": settings.kl_max,
        "layers": sorted({layer for layer, _ in candidates}),
        "positions": sorted({pos for _, pos in candidates}),
        "layer_stride": int(params["layer_stride"] or 1),
        "layer_cut": layer_cut(n_layers, settings.max_layer_frac),
        "subspace_ranks": list(settings.subspace_ranks) if searched_ranks else [],
    }


def _finite_or_none(record: Mapping[str, Any]) -> dict[str, Any]:
    # NaN (a rank the window cannot span) becomes null in the JSON record.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


@dataclass(frozen=True)
class CarrierInputs:
    """The files :func:`carrier_search_table` reads: the cell's direction table, the two
    validation prompt sets and, optionally, the source model's prompt filter and the cell's
    activation table (for the rank-k carriers)."""

    directions: str | Path
    harmful: str | Path
    harmless: str | Path
    prompt_filter: str | Path | None = None
    activations: str | Path | None = None


def carrier_search_table(
    model,
    tokenizer,
    inputs: CarrierInputs,
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    seed: int = schema_default("seed"),
) -> CarrierSearch:
    """Run :func:`~rgeom.carrier_search.select_carrier` on a direction table and two
    validation prompt files (``inputs``) and write every candidate's scores to ``out``; the
    carrier (or null) goes in the metadata.

    params: the ``carrier`` config section, the schema's defaults filled in:
    ``max_layer_frac``, ``kl_max``, ``batch_size``, ``reuse_prefix``, the candidate subset
    (see :func:`select_candidates`): ``layers``, ``layer_stride``, ``positions`` (null:
    every post-instruction position); ``n_boot`` prompt-bootstrap replicates for ``ci``
    intervals on every score, drawn with ``seed``; and the rank-k carriers
    ``subspace_ranks``, written to the metadata (``subspaces``): the interventions' rank-k
    subspace at the carrier (:func:`rgeom.causal_subspace.subspace_basis`: r-hat, then the
    top per-prompt contrasts of the cell's ``inputs.activations`` table), so none without that
    table. The refusal score reads the tokens of :data:`rgeom.scoring.REFUSAL_PREFIXES`.
    ``inputs.prompt_filter`` (a :func:`rgeom.geometry.prompt_filter_table` of the source model)
    restricts the validation prompts to its kept ``val`` ids, the same in every cell; its
    kept / total counts go in the metadata (``prompt_filter``) and the ``n_harmful`` /
    ``n_harmless`` columns.
    """
    params = section_with_defaults("carrier", params)
    directions = inputs.directions
    source = _check_direction_source(directions, model, tokenizer)
    n_layers = len(decoder_layers(model))
    settings = _search_settings(params, seed)
    candidates = select_candidates(load_directions(directions), n_layers, params, directions)
    subspace = _rank_k_spans(inputs.activations, candidates, settings.subspace_ranks)
    refusal_ids = refusal_token_ids(tokenizer)
    harmful_texts, harmless_texts, pf = _validation_prompts(
        inputs.harmful, inputs.harmless, inputs.prompt_filter
    )
    result = select_carrier(
        model, tokenizer, candidates, harmful_texts, harmless_texts, refusal_ids, subspace, settings
    )
    record = dict(meta)
    record.update({k: source[k] for k in ("d_model", "n_layers", "template_hash") if k in source})
    record.update(
        carrier=list(result.carrier) if result.carrier else None,
        baseline_refusal_score=result.baseline,
        refusal_token_ids=refusal_ids,
        refusal_tokens=[tokenizer.decode([i]) for i in refusal_ids],
        selection=_selection_record(settings, candidates, params, n_layers, subspace is not None),
        prompt_filter=pf,
        bootstrap={"n_boot": result.n_boot, "ci": result.ci, "seed": int(seed)},
        subspaces=[_finite_or_none(sub) for sub in result.subspaces],
    )
    if result.carrier is None:
        log.warning("no admissible carrier direction among %d candidates", len(result.candidates))
    write_table(out, _candidate_table(result, pf), CARRIER_SCHEMA, record)
    return result
