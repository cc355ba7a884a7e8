"""What the interventions stage measures under one condition (issue #5; see :mod:`rgeom.causal`).

The mean refusal score (log-odds of a refusal-opening first token) on the harmful and
harmless validation prompts, the mean KL(base || edited) of the next-token distribution at
the last position of the harmless prompts, the mean cross-entropy of the base model's own
greedy completions of the harmless prompts (``ce_harmless``; its rise is the utility cost),
greedy generations for the judge (:func:`judge_generations`) and the answer accuracy on the
checkable utility prompts. Torch is imported when a measurement runs, not with the module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rgeom.config import schema_default
from rgeom.judges import attack_success, label_completions
from rgeom.judges.metrics import check_answer
from rgeom.judges.model_judges import configured

if TYPE_CHECKING:
    import torch


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
class MeasureSets:
    """The prompts every condition is measured on, and the unedited model's references."""

    harmful: list[str]
    harmless: list[str]
    generate: list[str]
    utility: list[str]
    utility_targets: list[str]
    reference: list[list[int]]  # the unedited model's greedy harmless completions, token ids
    base_harmless: torch.Tensor  # unedited last-position logits on harmless


def measure(
    model, tokenizer, sets: MeasureSets, refusal_ids, s: Mapping[str, Any], edited: bool = True
) -> dict[str, Any]:
    """One condition's row (``s`` the interventions settings); its generations wait in
    ``_completions`` for :func:`judge_generations`."""
    from rgeom.generation import generate_completions
    from rgeom.interventions import kl_last_position, last_logits, refusal_score_from_logits

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

    name = "+".join([judge.get("name", schema_default("judge.name")), *configured(dict(judge))])
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
