"""Causal interventions at each cell's carrier, and the cross-anchor transfer test (issue #5).

This module runs the interventions stage; its parts live in modules of their own, and every
name they define stays importable from here:

* :mod:`rgeom.causal_choice`: the direction of a cell, its carrier or a labelled fallback;
* :mod:`rgeom.causal_subspace`: the rank-k subspace around that direction;
* :mod:`rgeom.causal_inputs`: provenance checks, refusal tokens and prompt texts;
* :mod:`rgeom.causal_measure`: what is measured under one condition, and the judging;
* :mod:`rgeom.causal_transfer`: cross-anchor transfer (``rgeom cross-anchor``) and its ratio;
* :mod:`rgeom.causal_summary`: ``rgeom interventions-summary`` and the frontier figure.

Interventions (``rgeom interventions``)
---------------------------------------
One row per condition: ``none``; ``ablation`` (directional ablation of r-hat at every block
input, attention output and MLP output); ``addition`` (``coeff * r`` added to the carrier
layer's input at every position, r the raw difference in means, one row per coefficient);
``subspace_ablation`` (rank k, one row per k). Under each: the mean refusal score (log-odds
of a refusal-opening first token) on the harmful and harmless validation prompts, the mean
KL(base || edited) of the next-token distribution at the last position of the harmless
prompts, the mean cross-entropy of the base model's own greedy completions of the harmless
prompts (``ce_harmless``; its rise is the utility cost), and from greedy generations the
refusal rate and attack success rate of the first ``n_generate`` prompts of
``generate_set`` (labelled by the configured judge as the judge stage labels generations:
the HarmBench classifier decides ASR where ``judge.harmbench`` names it) and the answer
accuracy on the first ``n_utility`` checkable prompts of ``utility_set``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from rgeom.causal_choice import (
    CARRIER,
    FALLBACK_MAX_NORM,
    FALLBACK_MIN_BYPASS,
    Choice,
    carrier_settings,
    choose_direction,
)
from rgeom.causal_inputs import carrier_refusal_ids, check_tables, read_prompts
from rgeom.causal_measure import (
    MeasureSets,
    completion_nll,
    greedy_ids,
    judge_generations,
    measure,
)
from rgeom.causal_subspace import contrast_vectors, subspace_basis
from rgeom.causal_summary import interventions_summary, plot_frontier
from rgeom.causal_transfer import (
    CrossAnchorInputs,
    Transfer,
    cross_anchor_table,
    read_cross_anchor,
    transfer,
)
from rgeom.config import section_with_defaults
from rgeom.errors import RgeomError
from rgeom.geometry import load_directions
from rgeom.io import write_table
from rgeom.judges.refusal import JUDGE_VERSION
from rgeom.schemas import CARRIER_BASE_SCHEMA, CROSS_SCHEMA, INTERVENTION_SCHEMA

# The stage's names, most of them re-exported from the causal_* modules for importers.
__all__ = [
    "CARRIER",
    "CARRIER_BASE_SCHEMA",
    "CROSS_SCHEMA",
    "FALLBACK_MAX_NORM",
    "FALLBACK_MIN_BYPASS",
    "INTERVENTION_SCHEMA",
    "Choice",
    "CrossAnchorInputs",
    "InterventionInputs",
    "Transfer",
    "choose_direction",
    "completion_nll",
    "contrast_vectors",
    "cross_anchor_table",
    "greedy_ids",
    "interventions_summary",
    "interventions_table",
    "judge_generations",
    "plot_frontier",
    "read_cross_anchor",
    "settings",
    "subspace_basis",
    "transfer",
]

log = logging.getLogger(__name__)

# (intervention, coeff, k, the edit as a context-manager factory; None: the unedited model)
Condition = tuple[str, float | None, int | None, Callable[[], Any] | None]


def settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``interventions`` section with the schema's defaults, checked: coefficients kept
    once each in their order, ranks sorted."""
    s = section_with_defaults("interventions", params.get("interventions"))
    coeffs = s["coefficients"]
    if not isinstance(coeffs, list) or not all(
        isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c) for c in coeffs
    ):
        raise RgeomError(f"interventions.coefficients must be a list of numbers, got {coeffs!r}")
    ranks = s["ranks"]
    if not isinstance(ranks, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ranks
    ):
        raise RgeomError(f"interventions.ranks must be a list of integers >= 1, got {ranks!r}")
    for key in ("n_generate", "n_utility", "ce_tokens"):
        v = s[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RgeomError(f"interventions.{key} must be an integer >= 0, got {v!r}")
    for key in ("max_new_tokens", "utility_max_new_tokens", "batch_size"):
        v = s[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RgeomError(f"interventions.{key} must be an integer >= 1, got {v!r}")
    s["coefficients"] = [float(c) for c in dict.fromkeys(coeffs)]
    s["ranks"] = sorted(set(ranks))
    return s


@dataclass(frozen=True)
class InterventionInputs:
    """The files :func:`interventions_table` reads: the cell's direction, carrier and
    activation tables (the last for the rank-k subspace), the validation prompt sets, the
    harmful prompts to generate on and the prompts with checkable answers."""

    directions: str | Path
    carriers: str | Path
    activations: str | Path
    val_harmful: str | Path
    val_harmless: str | Path
    generate_prompts: str | Path
    utility_prompts: str | Path


def interventions_table(
    model,
    tokenizer,
    inputs: InterventionInputs,
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    loader=None,
) -> pa.Table:
    """Measure every intervention at the cell's direction and write one row per condition.

    ``params["judge"]`` is the run's judge section: the generations' refusal rate and ASR
    are scored by the configured judge (``loader`` loads its models; tests pass fakes)."""
    s = settings(params)
    source, choice, r = _cell_direction(
        tokenizer, model, inputs.directions, inputs.carriers, params
    )
    refusal_ids = carrier_refusal_ids(tokenizer, inputs.carriers)
    texts = _prompt_texts(s, inputs)
    start = time.perf_counter()
    sets = _with_references(model, tokenizer, texts, s)
    conditions, skipped = _conditions(model, r, choice, inputs.activations, s)
    rows, reused = _measure_conditions(model, tokenizer, sets, refusal_ids, s, conditions)
    judge_name = judge_generations(
        rows, inputs.generate_prompts, s["n_generate"], params.get("judge") or {}, meta, loader
    )
    _complete_rows(rows, meta, choice, judge_name)
    table = pa.table(
        {name: [row[name] for row in rows] for name in INTERVENTION_SCHEMA.names},
        schema=INTERVENTION_SCHEMA,
    )
    record = dict(meta)
    record.update({k: source[k] for k in ("d_model", "n_layers", "template_hash") if k in source})
    record.update(
        interventions=s,
        carrier=list(choice.key),
        admissible=choice.admissible,
        carrier_source=choice.source,
        subspace="r-hat + top (k-1) SVD of per-prompt dir contrasts x_i - mean_harmless",
        ranks_skipped=skipped,
        reused=reused,
        refusal_token_ids=refusal_ids,
        judge={"name": judge_name, "version": JUDGE_VERSION},
        inputs={
            "directions": str(inputs.directions),
            "carriers": str(inputs.carriers),
            "activations": str(inputs.activations),
            "generate_set": str(inputs.generate_prompts),
            "utility_set": str(inputs.utility_prompts),
        },
        seconds=round(time.perf_counter() - start, 2),
    )
    write_table(out, table, INTERVENTION_SCHEMA, record)
    return table


def _cell_direction(
    tokenizer, model, directions: str | Path, carriers: str | Path, params: Mapping[str, Any]
) -> tuple[dict[str, Any], Choice, np.ndarray]:
    """The direction table's metadata, the cell's chosen site and its raw direction."""
    max_layer_frac, kl_max, _ = carrier_settings(params)
    source = check_tables(tokenizer, model, directions, carriers)
    raw = load_directions(directions)
    choice = choose_direction(carriers, raw, max_layer_frac, kl_max)
    if choice.admissible:
        log.info("carrier L%d p%d", *choice.key)
    else:
        log.warning(
            "no admissible carrier: using %s L%d p%d (flagged admissible=false)",
            choice.source,
            *choice.key,
        )
    return source, choice, raw[choice.key]


class _PromptTexts(NamedTuple):
    harmful: list[str]
    harmless: list[str]
    generate: list[str]
    utility: list[str]
    utility_targets: list[str]


def _prompt_texts(s: Mapping[str, Any], inputs: InterventionInputs) -> _PromptTexts:
    harmful = read_prompts("val_harmful", inputs.val_harmful)[0]
    harmless = read_prompts("val_harmless", inputs.val_harmless)[0]
    if not harmful or not harmless:
        raise RgeomError("interventions need harmful and harmless validation prompts")
    generate = read_prompts("generate_set", inputs.generate_prompts, s["n_generate"])[0]
    utility, targets = read_prompts(
        "utility_set", inputs.utility_prompts, s["n_utility"], with_target=True
    )
    if s["n_utility"] and not utility:
        log.warning(
            "%s has no prompts with a target; utility accuracy is null", inputs.utility_prompts
        )
    return _PromptTexts(harmful, harmless, generate, utility, targets)


def _with_references(model, tokenizer, texts: _PromptTexts, s: Mapping[str, Any]) -> MeasureSets:
    """The prompts, with the unedited model's harmless logits and greedy completions."""
    from rgeom.interventions import last_logits

    base_harmless = last_logits(model, tokenizer, texts.harmless, s["batch_size"])
    reference = greedy_ids(model, tokenizer, texts.harmless, s["batch_size"], s["ce_tokens"])
    return MeasureSets(*texts, reference=reference, base_harmless=base_harmless)


def _conditions(
    model, r: np.ndarray, choice: Choice, activations: str | Path, s: Mapping[str, Any]
) -> tuple[list[Condition], list[int]]:
    """Every condition, ``none`` first, and the ranks skipped for exceeding the contrasts'."""
    from rgeom.interventions import ablation, addition

    contrasts = None
    if any(k > 1 for k in s["ranks"]):
        contrasts = contrast_vectors(activations, *choice.key)
    bases = {k: subspace_basis(r, contrasts, k) for k in s["ranks"]}
    skipped = [k for k, b in bases.items() if b.shape[0] < k]
    if skipped:
        log.warning("ranks %s exceed the contrast vectors' rank; skipped", skipped)

    conditions: list[Condition] = [
        ("none", None, None, None),
        ("ablation", None, None, lambda: ablation(model, r)),
    ]
    for c in s["coefficients"]:
        conditions.append(("addition", c, None, lambda c=c: addition(model, r, choice.layer, c)))
    for k in s["ranks"]:
        if k not in skipped:
            conditions.append(("subspace_ablation", None, k, lambda k=k: ablation(model, bases[k])))
    return conditions, skipped


def _measure_conditions(
    model,
    tokenizer,
    sets: MeasureSets,
    refusal_ids: list[int],
    s: Mapping[str, Any],
    conditions: list[Condition],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One row per condition, and which conditions reuse another's measurement."""
    rows = []
    done: dict[str, dict[str, Any]] = {}
    reused = {}
    for name, coeff, k, hook in conditions:
        t0 = time.perf_counter()
        # Provably the same model (tests/test_interventions.py checks the logits): addition
        # with coefficient 0 is no edit, rank-1 subspace ablation is directional ablation.
        same = "none" if coeff == 0 else "ablation" if k == 1 else None
        if same is not None:
            measured = dict(done[same])
            reused[f"{name} {'coeff=0' if coeff == 0 else 'k=1'}"] = same
        elif hook is None:
            measured = measure(model, tokenizer, sets, refusal_ids, s, edited=False)
        else:
            with hook():
                measured = measure(model, tokenizer, sets, refusal_ids, s)
        if name in ("none", "ablation"):
            done[name] = measured
        rows.append({"intervention": name, "coeff": coeff, "k": k, **measured})
        log.info(
            "%s%s: refusal score %.3f / %.3f, kl %.4f, ce %.3f, refusal rate %s (%.1f s)",
            name,
            f" coeff={coeff:g}" if coeff is not None else f" k={k}" if k is not None else "",
            measured["refusal_score_harmful"],
            measured["refusal_score_harmless"],
            measured["kl_harmless"],
            measured["ce_harmless"],
            measured["refusal_rate"],
            time.perf_counter() - t0,
        )
    return rows, reused


def _complete_rows(
    rows: list[dict[str, Any]], meta: Mapping[str, Any], choice: Choice, judge_name: str
) -> None:
    """Drop the judged generations; add the change from the unedited row and the cell."""
    base = rows[0]
    for row in rows:
        row.pop("_completions", None)
        for key in ("refusal_rate", "asr"):
            row[f"{key}_delta"] = (
                None if row[key] is None or base[key] is None else row[key] - base[key]
            )
        row.update(
            arm=meta.get("arm"),
            step=meta.get("step"),
            layer=choice.layer,
            position=choice.position,
            admissible=choice.admissible,
            carrier_source=choice.source,
            judge=judge_name,
        )
