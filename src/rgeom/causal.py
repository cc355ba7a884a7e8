"""Causal interventions at each cell's carrier, and the cross-anchor transfer test (issue #5).

Direction of a cell
-------------------
Every stage here acts on one direction per (arm, step) cell, chosen by
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

Rank-k subspace: r-hat followed by the top k - 1 right singular vectors of the per-prompt
contrast vectors ``x_i - mean_harmless`` (the ``dir`` harmful prompts' activations at the
carrier site, from the activation table) with their r-hat component removed. The subspaces
are nested, rank 1 is exactly directional ablation, and each further axis is the direction
along which individual harmful prompts differ most from the harmless mean beyond r: what a
refusal representation spread over more than one direction would add. (The top-k SVD of
the carrier window's unit directions was the alternative; adjacent layers' directions are
nearly parallel, so their second and later axes are mostly noise and a 2-layer window
cannot give k > 2.) Ranks above the contrasts' rank are skipped and listed in the metadata.

Cross-anchor transfer (``rgeom cross-anchor``)
----------------------------------------------
For a target cell b, the direction of every source cell a of the same arm (the base
included; for the base, every cell) is applied to b's model at a's layer, with b's own
validation prompts and refusal tokens: ``bypass``, ``induce`` and ``kl`` exactly as in the
carrier search (a == b reproduces b's carrier-table row). Per-prompt bypass scores and b's
unedited harmful scores are stored, so ``rgeom drift`` can bootstrap the transfer ratio
(:func:`transfer`): how much of b's own direction's bypass effect a's direction achieves.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.layout import BASE
from rgeom.schemas import CARRIER_BASE_SCHEMA, CROSS_SCHEMA, INTERVENTION_SCHEMA

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CARRIER = "carrier"
FALLBACK_MIN_BYPASS = "fallback_min_bypass"
FALLBACK_MAX_NORM = "fallback_max_norm"

DEFAULTS: dict[str, Any] = {
    "coefficients": [0.0, 0.5, 1.0, 2.0],
    "ranks": [1, 2, 3, 4],
    "n_generate": 64,
    "max_new_tokens": 64,
    "n_utility": 32,
    "utility_max_new_tokens": 32,
    "ce_tokens": 32,
    "batch_size": 16,
    "generate_set": "harmbench",
    "utility_set": "utility",
}

# --- the direction of a cell --------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    layer: int
    position: int
    admissible: bool
    source: str

    @property
    def key(self) -> tuple[int, int]:
        return self.layer, self.position


def choose_direction(
    carriers: str | Path,
    directions: Mapping[tuple[int, int], np.ndarray],
    max_layer_frac: float = 0.8,
    kl_max: float = 0.1,
) -> Choice:
    """The carrier of a cell, or the labelled fallback (see the module docstring)."""
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

    def usable(key) -> bool:
        vec = directions.get(key)
        return vec is not None and bool(np.isfinite(vec).all()) and bool(np.any(vec))

    scored = [
        r
        for r in rows
        if r["bypass"] is not None
        and math.isfinite(r["bypass"])
        and r["layer"] < cut
        and usable((r["layer"], r["position"]))
    ]
    if scored:
        # A direction whose ablation breaks the model also "bypasses" refusal; prefer not.
        gentle = [r for r in scored if r["kl"] is not None and r["kl"] <= kl_max]
        best = min(gentle or scored, key=lambda r: (r["bypass"], r["layer"]))
        return Choice(int(best["layer"]), int(best["position"]), False, FALLBACK_MIN_BYPASS)
    positions = sorted({int(r["position"]) for r in rows}) or sorted({p for _, p in directions})
    pos = -1 if -1 in positions else positions[0]
    keys = [k for k in directions if k[1] == pos and k[0] < cut and usable(k)]
    if not keys:
        keys = [k for k in directions if usable(k)]
    if not keys:
        raise RgeomError(f"{carriers}: no usable direction to fall back to")
    layer, pos = max(keys, key=lambda k: float(np.linalg.norm(directions[k])))
    return Choice(int(layer), int(pos), False, FALLBACK_MAX_NORM)


# --- settings -----------------------------------------------------------------------


def settings(params: Mapping[str, Any]) -> dict[str, Any]:
    section = dict(params.get("interventions") or {})
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise RgeomError(f"interventions: unknown key(s) {', '.join(unknown)}")
    s = {**DEFAULTS, **section}
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


def _carrier_settings(params: Mapping[str, Any]) -> tuple[float, float, int]:
    carrier = params.get("carrier") or {}
    return (
        float(carrier.get("max_layer_frac", 0.8)),
        float(carrier.get("kl_max", 0.1)),
        int(carrier.get("batch_size", 16)),
    )


# --- inputs -------------------------------------------------------------------------


def _check_tables(tokenizer, model, *paths: str | Path) -> dict[str, Any]:
    """Every table must come from this tokenizer and depth; returns the first's metadata."""
    from rgeom.activations import template_hash, tokenizer_hash
    from rgeom.models import decoder_layers

    n_layers = len(decoder_layers(model))
    first: dict[str, Any] = {}
    # Hashed once, not per table: the vocabulary's hash costs about 0.3 s on SmolLM2, and
    # cross-anchor checks two tables per source cell.
    hashes: dict[str, str] = {}
    for path in paths:
        meta = read_meta(path)
        first = first or meta
        for key, fn in (("template_hash", template_hash), ("tokenizer_hash", tokenizer_hash)):
            if key in meta and key not in hashes:
                hashes[key] = fn(tokenizer)
            if key in meta and meta[key] != hashes[key]:
                raise RgeomError(
                    f"{path}: {key} differs from the model's tokenizer; it was written with "
                    "another chat template or vocabulary"
                )
        if "n_layers" in meta and int(meta["n_layers"]) != n_layers:
            raise RgeomError(
                f"{path}: written for a model with n_layers={meta['n_layers']}, but the model "
                f"has {n_layers}"
            )
    return first


def _refusal_ids(tokenizer, carriers: str | Path) -> list[int]:
    """The refusal tokens the carrier search used, so scores compare with its table."""
    from rgeom.interventions import refusal_token_ids

    ids = read_meta(carriers).get("refusal_token_ids")
    return [int(i) for i in ids] if ids else refusal_token_ids(tokenizer)


def _prompts(key: str, path: str | Path, n: int | None = None, with_target: bool = False):
    from rgeom.activations import load_prompt_set, prompt_text

    cols = load_prompt_set(key, path).to_pydict()
    contexts = cols.get("context") or [None] * len(cols["text"])
    targets = cols.get("target") or [None] * len(cols["text"])
    rows = [
        (prompt_text(t, c), tgt)
        for t, c, tgt in zip(cols["text"], contexts, targets, strict=True)
        if not with_target or (tgt is not None and str(tgt).strip())
    ]
    rows = rows[:n] if n is not None else rows
    return [r[0] for r in rows], [r[1] for r in rows]


def contrast_vectors(activations: str | Path, layer: int, position: int) -> np.ndarray:
    """Per-prompt contrasts ``x_i - mean_harmless`` [n_harmful, d] of the ``dir`` split at
    one (layer, position), accumulated in float64."""
    from rgeom.geometry import DIRECTION_SPLIT, HARMFUL, HARMLESS

    try:
        table = pq.read_table(
            activations,
            columns=["label", "vector"],
            filters=[
                ("split", "=", DIRECTION_SPLIT),
                ("layer", "=", layer),
                ("position", "=", position),
                ("label", "in", [HARMFUL, HARMLESS]),
            ],
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{activations} is not a readable activation table") from exc
    if table.num_rows == 0:
        raise RgeomError(
            f"{activations}: no {DIRECTION_SPLIT!r} rows at layer {layer} position {position}"
        )
    d = table.schema.field("vector").type.list_size
    vec = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vec = vec.astype(np.float64).reshape(-1, d)
    labels = np.asarray(table.column("label").to_pylist())
    if not (labels == HARMFUL).any() or not (labels == HARMLESS).any():
        raise RgeomError(f"{activations}: needs both harmful and harmless rows at layer {layer}")
    return vec[labels == HARMFUL] - vec[labels == HARMLESS].mean(axis=0)


def subspace_basis(direction, contrasts: np.ndarray | None, k: int) -> np.ndarray:
    """Orthonormal rows [k', d], k' <= k: r-hat, then the top k - 1 right singular vectors
    of ``contrasts`` with their r-hat component removed (see the module docstring)."""
    r = np.asarray(direction, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(r)
    if not norm > 0:
        raise RgeomError("subspace_basis: the direction is zero")
    r_hat = r / norm
    rows = [r_hat]
    if k > 1 and contrasts is not None and len(contrasts):
        c = np.asarray(contrasts, dtype=np.float64)
        c = c - np.outer(c @ r_hat, r_hat)
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        scale = max(float(np.linalg.norm(contrasts, axis=1).max()), 1e-300)
        keep = s > 1e-8 * scale
        for v in vt[keep][: k - 1]:
            # Re-orthogonalise against r-hat: the SVD leaves rounding residue along it.
            v = v - (v @ r_hat) * r_hat
            rows.append(v / np.linalg.norm(v))
    return np.stack(rows)


# --- measurement --------------------------------------------------------------------


def _inference_mode(fn):
    """``torch.inference_mode()`` as a decorator that imports torch only when called: this
    module's readers (drift, interventions-summary, summary) run without torch."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run


@_inference_mode
def completion_nll(
    model, tokenizer, prompts: Sequence[str], completions: Sequence[Sequence[int]], batch_size=16
) -> tuple[float, int]:
    """Token-weighted mean negative log-likelihood of each chat prompt's ``completions``
    (token ids, teacher-forced) and the number of tokens scored."""
    import torch

    from rgeom.activations import padded_positions
    from rgeom.models import encode_chat, left_pad

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = [
        (encode_chat(tokenizer, p).ids + list(c), len(c))
        for p, c in zip(prompts, completions, strict=True)
        if len(c)
    ]
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        ids, mask = left_pad([seq for seq, _ in batch], pad, device)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=padded_positions(mask), use_cache=False
        ).logits
        for row, (_, n) in enumerate(batch):
            # Left padding: the completion is the last n tokens of every row.
            logp = torch.log_softmax(logits[row, -n - 1 : -1].double(), dim=-1)
            target = ids[row, -n:]
            total -= float(logp.gather(-1, target[:, None]).sum())
            count += n
    return (total / count if count else math.nan), count


@_inference_mode
def greedy_ids(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int):
    """Greedy continuation token ids per prompt, up to and including the end-of-turn token
    (so never empty when ``max_new_tokens`` > 0)."""
    from rgeom.models import encode_chat, left_pad

    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        encs = [encode_chat(tokenizer, p).ids for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(encs, pad if pad is not None else 0, device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for seq in gen[:, ids.shape[1] :].tolist():
            out.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return out


@dataclass
class _Sets:
    harmful: list[str]
    harmless: list[str]
    generate: list[str]
    utility: list[str]
    utility_targets: list[str]
    reference: list[list[int]]  # the unedited model's greedy harmless completions, token ids
    base_harmless: torch.Tensor  # unedited last-position logits on harmless


def _measure(
    model, tokenizer, sets: _Sets, refusal_ids, s: Mapping[str, Any], edited: bool = True
) -> dict[str, Any]:
    from rgeom.generation import generate_completions
    from rgeom.interventions import kl_last_position, last_logits, refusal_score_from_logits
    from rgeom.judges.metrics import check_answer

    bs = s["batch_size"]
    harmful = last_logits(model, tokenizer, sets.harmful, bs)
    # Unedited, the harmless logits are sets.base_harmless: the same call, already made.
    harmless = last_logits(model, tokenizer, sets.harmless, bs) if edited else sets.base_harmless
    row: dict[str, Any] = {
        "refusal_score_harmful": float(refusal_score_from_logits(harmful, refusal_ids).mean()),
        "refusal_score_harmless": float(refusal_score_from_logits(harmless, refusal_ids).mean()),
        "kl_harmless": float(kl_last_position(sets.base_harmless, harmless).mean()),
        "ce_harmless": completion_nll(model, tokenizer, sets.harmless, sets.reference, bs)[0],
        "n_generate": len(sets.generate),
        "n_utility": len(sets.utility),
        "refusal_rate": None,
        "asr": None,
        "utility_accuracy": None,
    }
    if sets.generate:
        # Judged after every condition has run, with one load of the configured judge.
        row["_completions"] = generate_completions(
            model, tokenizer, sets.generate, bs, s["max_new_tokens"]
        )[0]
    if sets.utility:
        texts = generate_completions(
            model, tokenizer, sets.utility, bs, s["utility_max_new_tokens"]
        )[0]
        row["utility_accuracy"] = float(
            np.mean([check_answer(t, g) for t, g in zip(texts, sets.utility_targets, strict=True)])
        )
    return row


def judge_generations(
    rows: list[dict[str, Any]],
    prompts: str | Path,
    n: int,
    judge: Mapping[str, Any],
    meta: Mapping[str, Any],
    loader=None,
) -> str:
    """Fill ``refusal_rate`` and ``asr`` of every condition row from its ``_completions`` on
    the first ``n`` prompts of ``prompts``, under the configured judge (the judge stage's
    :func:`rgeom.judges.label_completions`): the HarmBench classifier's "yes" is success
    when ``judge.harmbench`` names it, else "neither refused nor degenerate". Returns the
    judge's name."""
    from rgeom.activations import load_prompt_set, prompt_text
    from rgeom.judges import JUDGE_NAME, attack_success, label_completions
    from rgeom.judges.model_judges import configured

    name = "+".join([judge.get("name", JUDGE_NAME), *configured(dict(judge))])
    done = [r for r in rows if r.get("_completions") is not None]
    if not done:
        return name
    cols = load_prompt_set("generate_set", prompts).slice(0, n).to_pydict()
    k = len(cols["prompt_id"])
    contexts = cols.get("context") or [None] * k
    users = [prompt_text(t, c) for t, c in zip(cols["text"], contexts, strict=True)]
    table = pa.table(
        {
            "prompt_id": [str(p) for _ in done for p in cols["prompt_id"]],
            "label": ["harmful"] * (k * len(done)),
            "category": [c for _ in done for c in (cols.get("category") or [None] * k)],
            "prompt": users * len(done),
            "target": pa.nulls(k * len(done), pa.string()),
            "completion": [t for r in done for t in r["_completions"]],
            "arm": [str(meta.get("arm"))] * (k * len(done)),
            "step": pa.array([int(meta.get("step") or 0)] * (k * len(done)), pa.int32()),
            "benchmark": [f"interventions/{i}" for i in range(len(done)) for _ in range(k)],
        }
    )
    labels, _ = label_completions(table, str(prompts), dict(judge), str(prompts), loader)
    refused = labels.column("refused").to_pylist()
    success = attack_success(labels)
    for i, r in enumerate(done):
        part = slice(i * k, (i + 1) * k)
        r["refusal_rate"] = float(np.mean(refused[part]))
        counted = [s for s in success[part] if s is not None]
        r["asr"] = float(np.mean(counted)) if counted else None
    return name


def interventions_table(
    model,
    tokenizer,
    directions: str | Path,
    carriers: str | Path,
    activations: str | Path,
    val_harmful: str | Path,
    val_harmless: str | Path,
    generate_prompts: str | Path,
    utility_prompts: str | Path,
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    loader=None,
) -> pa.Table:
    """Measure every intervention at the cell's direction and write one row per condition.

    ``params["judge"]`` is the run's judge section: the generations' refusal rate and ASR
    are scored by the configured judge (``loader`` loads its models; tests pass fakes)."""
    from rgeom.geometry import load_directions
    from rgeom.interventions import ablation, addition, last_logits
    from rgeom.judges.refusal import JUDGE_VERSION

    s = settings(params)
    max_layer_frac, kl_max, _ = _carrier_settings(params)
    source = _check_tables(tokenizer, model, directions, carriers)
    raw = load_directions(directions)
    choice = choose_direction(carriers, raw, max_layer_frac, kl_max)
    r = raw[choice.key]
    if choice.admissible:
        log.info("carrier L%d p%d", *choice.key)
    else:
        log.warning(
            "no admissible carrier: using %s L%d p%d (flagged admissible=false)",
            choice.source,
            *choice.key,
        )
    refusal_ids = _refusal_ids(tokenizer, carriers)
    harmful = _prompts("val_harmful", val_harmful)[0]
    harmless = _prompts("val_harmless", val_harmless)[0]
    if not harmful or not harmless:
        raise RgeomError("interventions need harmful and harmless validation prompts")
    generate = _prompts("generate_set", generate_prompts, s["n_generate"])[0]
    utility, targets = _prompts("utility_set", utility_prompts, s["n_utility"], with_target=True)
    if s["n_utility"] and not utility:
        log.warning("%s has no prompts with a target; utility accuracy is null", utility_prompts)

    start = time.perf_counter()
    base_harmless = last_logits(model, tokenizer, harmless, s["batch_size"])
    reference = greedy_ids(model, tokenizer, harmless, s["batch_size"], s["ce_tokens"])
    sets = _Sets(harmful, harmless, generate, utility, targets, reference, base_harmless)

    contrasts = None
    if any(k > 1 for k in s["ranks"]):
        contrasts = contrast_vectors(activations, *choice.key)
    bases = {k: subspace_basis(r, contrasts, k) for k in s["ranks"]}
    skipped = [k for k, b in bases.items() if b.shape[0] < k]
    if skipped:
        log.warning("ranks %s exceed the contrast vectors' rank; skipped", skipped)

    conditions: list[tuple[str, float | None, int | None, Any]] = [
        ("none", None, None, None),
        ("ablation", None, None, lambda: ablation(model, r)),
    ]
    for c in s["coefficients"]:
        conditions.append(("addition", c, None, lambda c=c: addition(model, r, choice.layer, c)))
    for k in s["ranks"]:
        if k not in skipped:
            conditions.append(("subspace_ablation", None, k, lambda k=k: ablation(model, bases[k])))

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
            measured = _measure(model, tokenizer, sets, refusal_ids, s, edited=False)
        else:
            with hook():
                measured = _measure(model, tokenizer, sets, refusal_ids, s)
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
    judge_name = judge_generations(
        rows, generate_prompts, s["n_generate"], params.get("judge") or {}, meta, loader
    )
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
            "directions": str(directions),
            "carriers": str(carriers),
            "activations": str(activations),
            "generate_set": str(generate_prompts),
            "utility_set": str(utility_prompts),
        },
        seconds=round(time.perf_counter() - start, 2),
    )
    write_table(out, table, INTERVENTION_SCHEMA, record)
    return table


# --- cross-anchor transfer ----------------------------------------------------------


def _cell(meta: Mapping[str, Any], path) -> tuple[str, int]:
    if meta.get("arm") is None or meta.get("step") is None:
        raise RgeomError(f"{path}: provenance lacks arm or step")
    return str(meta["arm"]), int(meta["step"])


def cross_anchor_table(
    model,
    tokenizer,
    directions: Sequence[str | Path],
    carriers: Sequence[str | Path],
    val_harmful: str | Path,
    val_harmless: str | Path,
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> pa.Table:
    """Apply every source cell's direction to this model (the target cell in ``meta``)."""
    from rgeom.geometry import load_directions
    from rgeom.interventions import PrefixCache, last_logits, refusal_score_from_logits
    from rgeom.interventions import score_direction as score

    max_layer_frac, kl_max, batch_size = _carrier_settings(params)
    target = (str(meta.get("arm")), int(meta.get("step")))
    _check_tables(tokenizer, model, *directions, *carriers)
    dirs = {_cell(read_meta(p), p): Path(p) for p in directions}
    cars = {_cell(read_meta(p), p): Path(p) for p in carriers}
    if len(dirs) != len(directions) or len(cars) != len(carriers):
        raise RgeomError("cross-anchor: two direction or carrier tables for the same cell")
    if set(dirs) != set(cars):
        raise RgeomError(
            f"cross-anchor: direction tables for {sorted(dirs)} but carrier tables for "
            f"{sorted(cars)}"
        )
    if target not in dirs:
        raise RgeomError(f"cross-anchor: the target cell {target} is not among the sources")
    refusal_ids = _refusal_ids(tokenizer, cars[target])
    own = load_directions(dirs[target])
    sources = []
    for cell in sorted(dirs, key=lambda c: (c[1], c[0] != BASE, c[0])):
        raw = load_directions(dirs[cell])
        choice = choose_direction(cars[cell], raw, max_layer_frac, kl_max)
        sources.append((cell, choice, raw[choice.key]))

    harmful = _prompts("val_harmful", val_harmful)[0]
    harmless = _prompts("val_harmless", val_harmless)[0]
    if not harmful or not harmless:
        raise RgeomError("cross-anchor needs harmful and harmless validation prompts")
    cache = PrefixCache(
        model, tokenizer, harmless, sorted({c.layer for _, c, _ in sources}), batch_size
    )
    base_harmless = cache.base if cache.usable else last_logits(model, tokenizer, harmless)
    cache = cache if cache.usable else None
    baseline = refusal_score_from_logits(
        last_logits(model, tokenizer, harmful, batch_size), refusal_ids
    ).numpy()
    baseline_harmless = float(refusal_score_from_logits(base_harmless, refusal_ids).mean())

    rows = []
    for cell, choice, vec in sources:
        got = score(
            model, tokenizer, vec, choice.layer, harmful, harmless, refusal_ids, base_harmless,
            batch_size, cache,
        )  # fmt: skip
        mine = own.get(choice.key)
        cos = None
        if mine is not None and np.linalg.norm(mine) > 0:
            cos = float(vec @ mine / (np.linalg.norm(vec) * np.linalg.norm(mine)))
        rows.append(
            {
                "arm": target[0],
                "step": target[1],
                "source_arm": cell[0],
                "source_step": cell[1],
                "layer": choice.layer,
                "position": choice.position,
                "admissible": choice.admissible,
                "carrier_source": choice.source,
                "cos_same_site": cos,
                "baseline_harmful": float(baseline.mean()),
                "baseline_harmless": baseline_harmless,
                "bypass": got["bypass"],
                "induce": got["induce"],
                "kl": got["kl"],
                "baseline_scores": baseline.tolist(),
                "bypass_scores": got["bypass_scores"].tolist(),
            }
        )
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


def read_cross_anchor(paths: Sequence[str | Path]) -> pa.Table:
    """Every cross-anchor table in one, one target cell per file."""
    tables, seen = [], {}
    for p in map(Path, paths):
        meta = read_meta(p)
        key = _cell(meta, p)
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


# --- summary over cells -------------------------------------------------------------


def interventions_summary(
    tables: Sequence[str | Path], out_dir: str | Path, params: Mapping[str, Any], meta
) -> pa.Table:
    """All cells' intervention rows in one table, and a refusal-vs-KL frontier per arm."""
    from rgeom.report import _formats

    if not tables:
        raise RgeomError("interventions-summary: no intervention tables given")
    parts = [
        read_table(p, schema=INTERVENTION_SCHEMA).select(INTERVENTION_SCHEMA.names) for p in tables
    ]
    combined = pa.concat_tables(parts).cast(INTERVENTION_SCHEMA)
    out = Path(out_dir)
    write_table(
        out / "interventions.parquet",
        combined,
        INTERVENTION_SCHEMA,
        {**meta, "inputs": [str(p) for p in tables]},
    )
    arms = list(params.get("arms") or sorted({a for a in combined["arm"].to_pylist()} - {BASE}))
    formats = _formats(params)
    for arm in arms:
        plot_frontier(combined, arm, out / f"frontier_{arm}", formats)
    return combined


def plot_frontier(table: pa.Table, arm: str, stem: Path, formats) -> list[Path]:
    """Refusal (score and generated refusal rate) against KL(base || edited), one colour per
    anchor of ``arm`` (the base included); lines join the addition and the rank sweeps.
    Hollow markers: the direction is a fallback, not an admissible carrier."""
    from matplotlib import colormaps

    from rgeom.report import _figure, _save

    rows = [r for r in table.to_pylist() if r["arm"] in (arm, BASE)]
    steps = sorted({r["step"] for r in rows})
    cmap = colormaps["viridis"]
    fig, axes = _figure(2, width=4.6, height=3.6)
    markers = {"none": "o", "ablation": "X", "addition": "^", "subspace_ablation": "s"}
    for ax, metric, label in (
        (axes[0], "refusal_score_harmful", "refusal score, harmful (log-odds)"),
        (axes[1], "refusal_rate", "refusal rate of generations"),
    ):
        for i, step in enumerate(steps):
            colour = cmap(i / max(1, len(steps) - 1))
            cell = [r for r in rows if r["step"] == step]
            for kind, order in (("addition", "coeff"), ("subspace_ablation", "k")):
                sweep = sorted(
                    (r for r in cell if r["intervention"] == kind), key=lambda r: r[order]
                )
                if sweep:
                    ax.plot(
                        [r["kl_harmless"] for r in sweep],
                        [math.nan if r[metric] is None else r[metric] for r in sweep],
                        color=colour,
                        alpha=0.5,
                        linewidth=1,
                    )
            for r in cell:
                y = math.nan if r[metric] is None else r[metric]
                filled = r["admissible"]
                ax.scatter(
                    [r["kl_harmless"]],
                    [y],
                    marker=markers.get(r["intervention"], "o"),
                    facecolors=colour if filled else "none",
                    edgecolors=colour,
                    s=30,
                )
            ax.plot([], [], color=colour, label=f"{cell[0]['arm']}@{step}")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("KL(unedited || edited), harmless, last position")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for kind, marker in markers.items():
        axes[1].scatter([], [], marker=marker, color="grey", label=kind)
    axes[1].legend(fontsize="x-small")
    fallback = any(not r["admissible"] for r in rows)
    fig.suptitle(
        f"{arm}: refusal vs KL"
        + (" (hollow: fallback direction, no admissible carrier)" if fallback else "")
    )
    return _save(fig, stem, formats)
