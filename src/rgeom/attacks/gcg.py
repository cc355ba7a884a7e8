"""Greedy Coordinate Gradient (Zou et al. 2023) against a chat model.

The user message is ``behaviour + " " + suffix``; GCG optimises the suffix tokens so that the
assistant's reply starts with an affirmative target ("Sure, here is ..."). One engine serves
both the attack stage and R2D2's test-case refresh.

Layout of the optimised token sequence (one entry)::

    [template prefix | behaviour + " "] [suffix] [template post | target]
     \\______ prefix, run once ______/  \\optim/  \\___ same for every candidate ___/

The prefix does not depend on the suffix, so its key/value cache is computed once per entry
and broadcast over each candidate batch; only ``suffix + post + target`` is re-run.

The prompt is tokenized around the suffix by :mod:`rgeom.attacks.gcg_prompts`; every
candidate must round-trip there, so a suffix GCG returns re-encodes, as text, to the ids that
were optimised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rgeom.attacks.gcg_prompts import (  # noqa: F401 (re-exported: R2D2 and tests import them here)
    SEPARATOR,
    PromptParts,
    ascii_token_ids,
    build_prompt_ids,
    initial_suffix_ids,
    roundtrip_mask,
    split_prompt,
    suffix_ids_in_context,
    suffix_text_in_context,
)
from rgeom.errors import RgeomError
from rgeom.kvcache import expand_cache as _expand_cache
from rgeom.kvcache import prefix_kv as _prefix_kv
from rgeom.kvcache import run_cached as _run_cached

log = logging.getLogger(__name__)


@dataclass
class GCGResult:
    """Outcome of GCG on one behaviour.

    ``loss`` is the target cross-entropy (mean over target tokens) of ``suffix_ids``, the
    best suffix seen; ``losses_per_step[i]`` is that best loss after step ``i`` (so it never
    increases), with ``initial_loss`` the loss of the starting suffix.
    """

    behaviour: str
    target: str
    suffix_ids: list[int]
    suffix_text: str
    loss: float
    initial_loss: float
    losses_per_step: list[float] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def user_text(self) -> str:
        return self.behaviour + SEPARATOR + self.suffix_text


def _embedding_matrix(model) -> torch.Tensor:
    return model.get_input_embeddings().weight


def _vocab_size(model) -> int:
    # num_embeddings, not weight.shape[0]: under ZeRO-3 the weight is a partitioned
    # placeholder whose shape says nothing about the vocabulary.
    return int(model.get_input_embeddings().num_embeddings)


def _full_embedding(model) -> torch.Tensor:
    """The whole input-embedding matrix, detached, as a plain tensor.

    The one-hot trick multiplies by the weight directly, outside any module forward, so
    under DeepSpeed ZeRO-3 (R2D2 runs GCG on the partitioned training model) the weight is
    an empty placeholder. It is gathered and copied: a tied LM head re-partitions the
    shared parameter after its own forward, which would pull the storage out from under
    the autograd graph before the gradient is taken.
    """
    weight = _embedding_matrix(model)
    if not hasattr(weight, "ds_id"):
        return weight.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()


def _target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE per row of ``target``, given the logits of the last ``len(target) + 1`` tokens.

    Position ``j`` of those logits predicts target token ``j``; the last one looks past it.
    """
    t = target.shape[-1]
    pred = logits[:, -t - 1 : -1, :].float()
    labels = target.expand(pred.shape[0], -1)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), reduction="none")
    return ce.view(pred.shape[0], t).mean(dim=1)


# What one extra forward pass costs, in candidate tokens: reading every weight once, which
# dominates a small batch. Measured on SmolLM2 on 2 CPU cores (a 1-row pass of 42 tokens
# costs as much as ~75 tokens inside a 121-row pass); a 7B model on a GPU, where streaming
# 14 GB of weights takes about as long as ~140 tokens of compute, is of the same order.
CALL_OVERHEAD_TOKENS = 64


def plan_buckets(
    starts: torch.Tensor, length: int, overhead: float, batch_size: int | None = None
) -> list[tuple[int, torch.Tensor]]:
    """Group candidates into forward passes that each resume from one shared position.

    ``starts[i]`` is the first suffix position where candidate ``i`` differs from the current
    suffix; everything before it is already in the cache. A pass starting at ``s`` re-runs
    ``length - s`` tokens per row and costs ``overhead`` tokens more; merging the rows of
    several starts into one pass runs them all from the smallest. Exact dynamic programme over
    the distinct starts (at most suffix length + 1 of them). Returns ``(start, row indices)``.
    """
    order = torch.argsort(starts, stable=True)
    values, counts = torch.unique_consecutive(starts[order], return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    m = len(values)
    cap = batch_size or max(1, int(starts.numel()))
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        rows = 0
        for i in range(j - 1, -1, -1):
            rows += counts[i]
            passes = -(-rows // cap)
            cost = best[i] + passes * overhead + rows * (length - values[i])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets = []
    j = m
    bounds = [0, *torch.cumsum(torch.tensor(counts), 0).tolist()]
    while j > 0:
        i = cut[j]
        buckets.append((values[i], order[bounds[i] : bounds[j]]))
        j = i
    return buckets[::-1]


#: The most expanded key/value cache one forward pass of GCG candidates may hold when no
#: ``batch_size`` is set. HarmBench's contextual behaviours run to ~1,000 prompt tokens; on a
#: Mistral-7B (32 layers x 8 KV heads x 128 dims x K and V x 2 bytes = 128 KiB per token)
#: that is ~125 MiB per candidate and ~62 GiB for all 512 at once, beside 14 GB of weights.
#: 16 GiB keeps a pass to ~128 such candidates on an 80 GB card; short prompts (a 100-token
#: behaviour: 512 candidates in ~8 GiB) still run in one pass, so results are unchanged there.
MAX_CACHE_BYTES = 16 << 30


def cache_bounded_batch(
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    new_tokens: int,
    n: int,
    batch_size: int | None,
    max_bytes: int = MAX_CACHE_BYTES,
) -> int | None:
    """``batch_size``, lowered so one pass's cache (``kv``'s tokens plus ``new_tokens`` per
    row, for every row) stays within ``max_bytes``; unchanged when it already fits.

    Depends only on the prompt's length and the model, never on which positions a step
    sampled, so every rank of a ZeRO-3 run that shares a prompt length bounds alike.
    """
    seq = kv[0][0].shape[2]
    per_token = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
    per_row = per_token / max(seq, 1) * (seq + new_tokens)
    cap = max(1, int(max_bytes // max(per_row, 1)))
    if cap >= (batch_size or n):
        return batch_size
    return cap


def _first_difference(candidates: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per row, the first position differing from ``current`` (its length if none does)."""
    diff = candidates != current.unsqueeze(0)
    n = candidates.shape[1]
    return torch.where(
        diff.any(dim=1), diff.int().argmax(dim=1), torch.full_like(diff[:, 0], n, dtype=torch.long)
    )


def _max_over_ranks(n: int, device: torch.device) -> int:
    """The largest ``n`` over the ranks of the default process group."""
    import torch.distributed as dist

    # NCCL reduces only CUDA tensors; gloo (CPU runs, tests) only CPU ones.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([n], dtype=torch.long, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _pad_passes(model, planned: int, tail: torch.Tensor) -> None:
    """Run dummy forward passes until this rank has run as many as the busiest rank.

    Under ZeRO-3 every forward pass gathers each layer's weights from all ranks, so every
    rank must run the same number of them; how many a candidate batch needs depends on
    where its swaps fall (:func:`plan_buckets`), which differs between ranks refreshing
    different entries. The dummy pass is one token: its cost is the weights' gathering.
    """
    extra = _max_over_ranks(planned, tail.device) - planned
    with torch.no_grad():
        for _ in range(extra):
            model(input_ids=tail[:, :1], use_cache=False, logits_to_keep=1)


@dataclass(frozen=True)
class Batching:
    """How :func:`candidate_losses` splits its rows into forward passes.

    ``batch_size`` caps the rows of one pass (``None``: all at once); ``max_cache_bytes``
    bounds a pass's expanded cache (:func:`cache_bounded_batch`), so long contextual prompts
    run in several passes; ``overhead`` is what :func:`plan_buckets` charges for one pass
    more. ``collective``: pad to the same number of forward passes on every rank of the
    default process group (:func:`_pad_passes`); every rank must then score equally often.
    """

    batch_size: int | None = None
    overhead: float = CALL_OVERHEAD_TOKENS
    max_cache_bytes: int = MAX_CACHE_BYTES
    collective: bool = False


def candidate_losses(
    model,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    candidates: torch.Tensor,
    post: torch.Tensor,
    target: torch.Tensor,
    current: torch.Tensor | None = None,
    batching: Batching = Batching(),
) -> torch.Tensor:
    """Target CE of every candidate suffix (rows of ``candidates``), cached context reused.

    Without ``current``, ``kv`` holds the prefix and every candidate runs in full. With it,
    ``kv`` holds the prefix *and* the suffix ``current``: a GCG candidate is ``current`` with
    one token swapped, so the positions before its swap are already in that cache (causal
    attention) and the pass starts at the swap. :func:`plan_buckets` groups the rows so the
    saved tokens are not eaten by extra passes; the losses are the same either way, up to
    floating-point summation order. ``batching`` sizes the passes (:class:`Batching`).
    """
    n, width = candidates.shape
    tail = torch.cat([post, target]).unsqueeze(0)
    batch_size = cache_bounded_batch(
        kv, width + tail.shape[1], n, batching.batch_size, batching.max_cache_bytes
    )
    if current is None:
        starts = torch.zeros(n, dtype=torch.long)
        context = kv[0][0].shape[2]
    else:
        starts = _first_difference(candidates.cpu(), current.cpu())
        context = kv[0][0].shape[2] - width
    out = torch.empty(n, dtype=torch.float32)
    length = width + tail.shape[1]
    plan = plan_buckets(starts, length, batching.overhead, batch_size) if n else []
    if batching.collective:
        passes = sum(-(-rows.numel() // (batch_size or rows.numel())) for _, rows in plan)
        _pad_passes(model, passes, tail)
    with torch.no_grad():
        for start, rows in plan:
            layer_kv = [(k[:, :, : context + start], v[:, :, : context + start]) for k, v in kv]
            chunk = batch_size or rows.numel()
            for lo in range(0, rows.numel(), chunk):
                idx = rows[lo : lo + chunk]
                picked = candidates[idx.to(candidates.device), start:]
                ids = torch.cat([picked, tail.expand(idx.numel(), -1)], dim=1)
                cache = _expand_cache(model, layer_kv, idx.numel())
                logits = _run_cached(model, cache, target.numel() + 1, input_ids=ids)
                out[idx] = _target_ce(logits, target).float().cpu()
    return out.to(candidates.device)


def _token_gradient(
    model,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    suffix: torch.Tensor,
    post: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, float, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Gradient of the target CE w.r.t. the one-hot suffix, the suffix's loss, and the
    per-layer (key, value) of prefix + suffix."""
    embed = _full_embedding(model)
    one_hot = torch.zeros(suffix.numel(), embed.shape[0], device=embed.device, dtype=embed.dtype)
    one_hot.scatter_(1, suffix.unsqueeze(1), 1.0)
    one_hot.requires_grad_(True)
    rest = embed[torch.cat([post, target])]
    inputs = torch.cat([one_hot @ embed, rest], dim=0).unsqueeze(0)
    cache = _expand_cache(model, kv, 1)
    logits = _run_cached(model, cache, target.numel() + 1, inputs_embeds=inputs)
    loss = _target_ce(logits, target)[0]
    # autograd.grad, not backward: the weights' .grad must stay untouched when R2D2 calls
    # GCG in the middle of a training step.
    (grad,) = torch.autograd.grad(loss, one_hot)
    # The pass has just computed the suffix's keys and values: kept, they are the shared
    # context that candidate scoring resumes from (one-hot rows times the embedding are the
    # embedding rows exactly, so these equal an ``input_ids`` pass's).
    n = kv[0][0].shape[2] + suffix.numel()
    suffix_kv = [
        (layer.keys[:, :, :n].detach(), layer.values[:, :, :n].detach()) for layer in cache.layers
    ]
    return grad, float(loss.detach()), suffix_kv


def sample_candidates(
    suffix: torch.Tensor,
    grad: torch.Tensor,
    allowed: torch.Tensor,
    search_width: int,
    topk: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``search_width`` one-token swaps of ``suffix``, drawn from the top-k gradient tokens.

    Each candidate changes one uniformly drawn position to one of the ``topk`` allowed tokens
    with the most negative gradient there. Sampling runs on the CPU generator so results do
    not depend on the device.
    """
    grad = grad.detach().float().cpu()
    masked = torch.full_like(grad, float("inf"))
    masked[:, allowed] = grad[:, allowed]
    k = min(topk, allowed.numel())
    top = (-masked).topk(k, dim=1).indices  # [n_suffix, k]
    n = suffix.numel()
    pos = torch.randint(0, n, (search_width,), generator=generator)
    pick = torch.randint(0, k, (search_width,), generator=generator)
    cands = suffix.cpu().unsqueeze(0).repeat(search_width, 1)
    cands[torch.arange(search_width), pos] = top[pos, pick]
    return cands


def screen_dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"float16"`` / ``None`` from a config value, with one clear error."""
    if name in (None, "", "none", "null"):
        return None
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise RgeomError(f"GCG screen_dtype {name!r} is not one of {sorted(choices)} or null")
    return choices[name]


@dataclass(frozen=True)
class GCGSettings:
    """The search knobs of one :func:`gcg` call, the same for every entry it attacks.

    ``steps`` optimisation steps, each scoring ``search_width`` one-token swaps drawn from
    the ``topk`` tokens of most negative gradient; ``batch_size`` caps the candidates per
    forward pass (``None``: all ``search_width`` at once). ``init_suffix`` starts an entry
    with no warm start; ``system`` is the chat template's system message.

    ``screen_dtype`` (e.g. ``torch.bfloat16``) scores the candidates under autocast in that
    precision, then rescores the ``rescore_top`` best in the model's own precision and moves
    only on those exact losses: every loss GCG reports or compares is the model's. Off by
    default; it pays on hardware with fast low-precision matmuls (CUDA, CPUs with AMX) for a
    model held in float32, and is a no-op for a model already in that dtype.

    ``keep_best``: move only to a candidate that beats the current suffix (a buffer of one,
    as nanoGCG does). False moves to each step's lowest-loss candidate even when it is worse,
    as HarmBench's R2D2 refresh does; the result is then the last step's suffix.

    ``collective``: every rank of the default process group runs the call together (R2D2
    under ZeRO-3, where each forward pass is a collective); each scoring phase is padded to
    the same number of forward passes on every rank. The ranks must pass the same number of
    entries and ``steps``.
    """

    steps: int = 250
    search_width: int = 512
    topk: int = 256
    batch_size: int | None = None
    init_suffix: str = "! " * 20
    system: str | None = None
    screen_dtype: torch.dtype | str | None = None
    rescore_top: int = 8
    keep_best: bool = True
    collective: bool = False
    progress: bool = False


@dataclass(frozen=True)
class _Search:
    """The per-run GCG settings one entry's optimisation needs."""

    steps: int
    search_width: int
    topk: int
    batching: Batching
    allowed: torch.Tensor
    generator: torch.Generator
    device: torch.device
    screen_dtype: torch.dtype | None
    rescore_top: int
    progress: bool
    keep_best: bool = True


def _check_arguments(
    behaviours: Sequence[str],
    targets: Sequence[str],
    suffixes: Sequence[Sequence[int]] | None,
    settings: GCGSettings,
) -> None:
    """One clear error for mismatched entries or an empty search, before any model work."""
    if len(behaviours) != len(targets):
        raise RgeomError(f"GCG got {len(behaviours)} behaviours but {len(targets)} targets")
    if suffixes is not None and len(suffixes) != len(behaviours):
        raise RgeomError(f"GCG got {len(behaviours)} behaviours but {len(suffixes)} suffixes")
    s = settings
    if s.steps < 0 or s.search_width < 1 or s.topk < 1 or s.rescore_top < 1:
        raise RgeomError("GCG needs steps >= 0, search_width >= 1, topk >= 1 and rescore_top >= 1")


def _screening_dtype(model, screen_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to screen candidates in; None when it is the model's own (nothing to gain)."""
    if not isinstance(screen_dtype, torch.dtype):
        screen_dtype = screen_dtype_from_name(screen_dtype)
    if screen_dtype == _embedding_matrix(model).dtype:
        return None
    return screen_dtype


def _start_ids(
    tokenizer,
    entry: int,
    behaviour: str,
    suffixes: Sequence[Sequence[int]] | None,
    init_suffix: str,
    system: str | None,
) -> list[int]:
    """The suffix ids entry ``entry`` starts from: its warm start, else ``init_suffix``."""
    if suffixes is not None:
        start = list(suffixes[entry])
    else:
        start = suffix_ids_in_context(tokenizer, behaviour, init_suffix, system)
    if not start:
        raise RgeomError(f"GCG warm-start suffix for entry {entry} is empty")
    return start


def gcg(
    model,
    tokenizer,
    behaviours: Sequence[str],
    targets: Sequence[str],
    settings: GCGSettings = GCGSettings(),
    seed: int = 0,
    suffixes: Sequence[Sequence[int]] | None = None,
    allowed_tokens: torch.Tensor | None = None,
) -> list[GCGResult]:
    """Run GCG on each (behaviour, target) pair; return the best suffix found for each.

    ``settings`` holds the search knobs (:class:`GCGSettings`). ``suffixes`` warm-starts each
    entry from given ids (R2D2 refreshes a pool entry from its current suffix); otherwise
    every entry starts from ``settings.init_suffix``. ``allowed_tokens`` are the token ids a
    swap may insert (None: the ASCII tokens, :func:`ascii_token_ids`). Deterministic for a
    ``seed``: candidate sampling uses its own CPU generator, never the global RNG.

    The model runs in eval mode (no dropout) and is returned to its previous mode afterwards.
    """
    _check_arguments(behaviours, targets, suffixes, settings)
    device = _embedding_matrix(model).device
    vocab = _vocab_size(model)
    allowed = ascii_token_ids(tokenizer, vocab) if allowed_tokens is None else allowed_tokens
    screen = _screening_dtype(model, settings.screen_dtype)
    search = _Search(
        steps=settings.steps,
        search_width=settings.search_width,
        topk=settings.topk,
        batching=Batching(batch_size=settings.batch_size, collective=settings.collective),
        allowed=allowed.cpu().long(),
        generator=torch.Generator().manual_seed(seed),
        device=device,
        screen_dtype=screen,
        rescore_top=settings.rescore_top,
        progress=settings.progress,
        keep_best=settings.keep_best,
    )

    was_training = model.training
    model.eval()
    results = []
    system, init_suffix = settings.system, settings.init_suffix
    try:
        for i, (behaviour, target) in enumerate(zip(behaviours, targets, strict=True)):
            parts = split_prompt(tokenizer, behaviour, target, system)
            start = _start_ids(tokenizer, i, behaviour, suffixes, init_suffix, system)
            results.append(_gcg_one(model, tokenizer, behaviour, target, parts, start, search))
    finally:
        model.train(was_training)
    return results


def _best_candidate(model, kv, cands, current, post, target, search: _Search) -> tuple[int, float]:
    """Index and exact loss of the lowest-loss candidate (screened first when asked).

    With no candidates, ``(-1, inf)``: the scoring calls still run, with no rows, so that a
    collective search makes as many of them as the other ranks.
    """
    device = search.device
    score = dict(current=current, batching=search.batching)
    if search.screen_dtype is None:
        losses = candidate_losses(model, kv, cands, post, target, **score)
        if not losses.numel():
            return -1, float("inf")
        best = int(losses.argmin())
        return best, float(losses[best])
    with torch.autocast(device_type=device.type, dtype=search.screen_dtype):
        rough = candidate_losses(model, kv, cands, post, target, **score)
    short = rough.float().topk(min(search.rescore_top, rough.numel()), largest=False).indices
    exact = candidate_losses(model, kv, cands[short.to(cands.device)], post, target, **score)
    if not exact.numel():
        return -1, float("inf")
    pick = int(exact.argmin())
    return int(short[pick]), float(exact[pick])


def _gcg_one(
    model,
    tokenizer,
    behaviour: str,
    target: str,
    parts: PromptParts,
    start: list[int],
    search: _Search,
) -> GCGResult:
    device = search.device
    prefix = torch.tensor(parts.prefix, device=device)
    post = torch.tensor(parts.post, device=device)
    target_ids = torch.tensor(parts.target, device=device)
    kv = _prefix_kv(model, prefix)

    current = torch.tensor(start, dtype=torch.long)
    current_loss = float(
        candidate_losses(model, kv, current.unsqueeze(0).to(device), post, target_ids)[0]
    )
    initial_loss = current_loss
    losses: list[float] = []
    for _ in tqdm(range(search.steps), desc="gcg", leave=False, disable=not search.progress):
        # enable_grad: callers (generation code, R2D2's refresh) may hold no_grad around us.
        with torch.enable_grad():
            grad, _, suffix_kv = _token_gradient(model, kv, current.to(device), post, target_ids)
        cands = sample_candidates(
            current, grad, search.allowed, search.search_width, search.topk, search.generator
        )
        cands = cands[roundtrip_mask(tokenizer, cands, behaviour, parts.system)]
        # Repeated draws of one swap would be scored again for nothing (about 5% of a
        # 128-wide draw from 64 x 20 swaps); sorted unique rows keep the result seeded.
        cands = torch.unique(cands, dim=0)
        # Scored even when the filter left none, so a collective search stays in step.
        best, best_loss = _best_candidate(
            model, suffix_kv, cands.to(device), current.to(device), post, target_ids, search
        )
        # keep_best: a step whose candidates are all worse changes nothing, and the next
        # draw tries other swaps. Otherwise the step's argmin is taken whatever its loss.
        if best >= 0 and (best_loss < current_loss or not search.keep_best):
            current, current_loss = cands[best].clone(), best_loss
        losses.append(current_loss)

    suffix_ids = current.tolist()
    return GCGResult(
        behaviour=behaviour,
        target=target,
        suffix_ids=suffix_ids,
        suffix_text=suffix_text_in_context(tokenizer, behaviour, suffix_ids, parts.system),
        loss=current_loss,
        initial_loss=initial_loss,
        losses_per_step=losses,
        prompt_ids=parts.prompt_ids(suffix_ids),
    )
