"""R2D2's three losses (away, toward, utility) from one padded forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rgeom.attacks.gcg import build_prompt_ids
from rgeom.errors import RgeomError
from rgeom.models import encode_response
from rgeom.train.r2d2_cases import PoolEntry
from rgeom.train.r2d2_config import R2D2Config


def _right_pad(rows: list[list[int]], labels: list[list[int]], pad_id: int, device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device), lab.to(device)


def _unpad_utility(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """Rows of a collated utility batch without their padding (left or right)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, labs = [], []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        rows.append(ids[i][keep].tolist())
        labs.append(labels[i][keep].tolist())
    return rows, labs


def away_loss_terms(logp: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``-log(1 - p)`` and the mask of tokens that count (``log p >= floor``).

    ``-expm1(log p)`` is ``1 - p`` computed without cancellation when p is near 0; log p is
    capped just below 0 so a target the model is certain of gives a large finite loss.
    """
    keep = logp >= floor
    capped = logp.clamp(max=-1e-6)
    return -torch.log(-torch.expm1(capped)), keep


def away_loss(logp: torch.Tensor, floor: float) -> torch.Tensor:
    """The away loss of target tokens with log-probabilities ``logp`` (HarmBench's).

    ``-log(1 - p)`` summed over the tokens with ``log p >= floor``, divided by ALL the target
    tokens: a token pushed below the floor counts zero but stays in the denominator, so the
    term shrinks as training pushes the targets away. Zero (keeping the graph) for no tokens.
    """
    per_tok, keep = away_loss_terms(logp, floor)
    kept = torch.where(keep, per_tok, torch.zeros_like(per_tok))
    return kept.sum() / max(logp.numel(), 1)


def compute_r2d2_losses(
    model,
    tokenizer,
    utility_batch: dict[str, torch.Tensor] | None,
    pool_entries: Sequence[PoolEntry],
    cfg: R2D2Config,
) -> dict[str, torch.Tensor]:
    """The three R2D2 losses and their total, from ONE padded forward pass.

    Rows: the utility examples (their own labels), then each entry's adversarial prompt
    followed by its affirmative target (away), then the same prompt followed by the refusal
    and EOS (toward). Utility and toward are token-level mean CEs over their own tokens; away
    is :func:`away_loss` over all away target tokens of the batch, as in the reference.
    """
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    kinds: list[str] = []
    if utility_batch is not None:
        u_rows, u_labels = _unpad_utility(utility_batch)
        rows += u_rows
        labels += u_labels
        kinds += ["utility"] * len(u_rows)
    refusal = encode_response(tokenizer, cfg.refusal)
    for kind in ("away", "toward"):
        for e in pool_entries:
            prompt = build_prompt_ids(tokenizer, e.behaviour, e.suffix_ids, cfg.system)
            reply = encode_response(tokenizer, e.target, eos=False) if kind == "away" else refusal
            rows.append(prompt + reply)
            labels.append([-100] * len(prompt) + reply)
            kinds.append(kind)
    if not rows:
        raise RgeomError("compute_r2d2_losses got neither a utility batch nor pool entries")

    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Right padding keeps every row's positions 0..len-1, as in unpadded training.
    ids, mask, lab = _right_pad(rows, labels, pad, device)
    logits = model(input_ids=ids, attention_mask=mask).logits

    shift_lab = lab[:, 1:]
    sel = shift_lab != -100
    row_of = torch.arange(ids.shape[0], device=device).unsqueeze(1).expand_as(shift_lab)[sel]
    # Log-softmax only at labelled positions: the full [rows, len, vocab] tensor in float32
    # would be most of the step's memory.
    picked = logits[:, :-1, :][sel].float()
    logp = F.log_softmax(picked, dim=-1).gather(1, shift_lab[sel].unsqueeze(1)).squeeze(1)

    kind_ids = torch.tensor([("utility", "away", "toward").index(k) for k in kinds], device=device)
    token_kind = kind_ids[row_of]
    zero = logits.sum() * 0.0  # keeps the graph when a term has no tokens

    def mean_nll(k: int) -> torch.Tensor:
        m = token_kind == k
        return -logp[m].mean() if m.any() else zero

    utility = mean_nll(0)
    toward = mean_nll(2)
    away_rows = token_kind == 1
    away = away_loss(logp[away_rows], cfg.away_logp_floor) if away_rows.any() else zero
    total = utility + cfg.away_coef * away + cfg.toward_coef * toward
    return {"total": total, "away": away, "toward": toward, "utility": utility}
