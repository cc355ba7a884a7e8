"""What a forward pass says about refusal: last-position logits and the scores read off them.

* Refusal score: log-odds that the first response token starts a refusal (Arditi et al.
  2024), from the probability mass on the first tokens of :data:`REFUSAL_PREFIXES`.
* KL at the last position: how far an edit moves the next-token distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from rgeom.errors import RgeomError
from rgeom.kvcache import SharedPrefix
from rgeom.models import encode_chat, encode_response

REFUSAL_PREFIXES = ("I", "Sorry", "As", "I'm", "Unfortunately")


def refusal_token_ids(tokenizer, prefixes: Sequence[str] = REFUSAL_PREFIXES) -> list[int]:
    """First token of each refusal opening as it follows the chat template's generation
    prompt (:func:`~rgeom.models.encode_response`): ``I`` after ``[/INST]`` or
    ``assistant\\n``, ``▁I`` after a template that puts a space before the reply."""
    ids = []
    for word in prefixes:
        toks = encode_response(tokenizer, word, eos=False)
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise RgeomError("none of the refusal prefixes tokenizes to any token")
    return ids


def last_position_logits(model, inputs: dict) -> torch.Tensor:
    """float32 next-token logits [batch, V] on the CPU of one forward over ``inputs``.

    Only the last position gets logits (``logits_to_keep=1``): the head over every position
    would cost far more (SmolLM2's 49k-word head dominates its 135M parameters).
    """
    return model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()


@torch.inference_mode()
def last_logits(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 16, share_prefix: bool = True
) -> torch.Tensor:
    """float32 next-token logits [n, V] at the last position of each chat-encoded prompt,
    in the order given.

    ``share_prefix`` runs the opening tokens every prompt shares (the chat template's
    system turn) once, under the hooks active now, and the rest of each prompt against its
    cache (:class:`rgeom.kvcache.SharedPrefix`): the same logits up to rounding, for about
    half the work on short prompts.
    """
    encs = [encode_chat(tokenizer, p).ids for p in prompts]
    order = sorted(range(len(encs)), key=lambda i: -len(encs[i]))
    out: list[torch.Tensor | None] = [None] * len(encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shared = SharedPrefix.build(model, encs, enabled=share_prefix)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logits = last_position_logits(model, shared.inputs(model, [encs[i] for i in idx], pad))
        for row, i in enumerate(idx):
            out[i] = logits[row]
    return torch.stack(out) if out else torch.empty(0)


def refusal_score_from_logits(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log p_R - log(1 - p_R) per row, where p_R is the probability mass on refusal_ids.

    Both terms are log-sum-exps over disjoint token sets, so the score stays finite even
    when p_R is within float error of 0 or 1.
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    in_r = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
    in_r[list(refusal_ids)] = True
    log_r = torch.logsumexp(logp.masked_fill(~in_r, -math.inf), dim=-1)
    log_not = torch.logsumexp(logp.masked_fill(in_r, -math.inf), dim=-1)
    return log_r - log_not


def refusal_score(
    model, tokenizer, prompts: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 16
) -> np.ndarray:
    """Per-prompt refusal log-odds at the first response position."""
    logits = last_logits(model, tokenizer, prompts, batch_size)
    return refusal_score_from_logits(logits, refusal_ids).numpy()


def kl_last_position(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || edited) per row of next-token logits ([n, V], or [n, T, V]: last T)."""
    if base_logits.ndim == 3:
        base_logits, edited_logits = base_logits[:, -1], edited_logits[:, -1]
    p = torch.log_softmax(base_logits.double(), dim=-1)
    q = torch.log_softmax(edited_logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
