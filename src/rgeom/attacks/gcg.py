"""Greedy Coordinate Gradient (Zou et al. 2023) against a chat model.

The user message is ``behaviour + " " + suffix``; GCG optimises the suffix tokens so that the
assistant's reply starts with an affirmative target ("Sure, here is ..."). One engine serves
both the attack stage and R2D2's test-case refresh.

Layout of the optimised token sequence (one entry)::

    [template prefix | behaviour + " "] [suffix] [template post | target]
     \\______ prefix, run once ______/  \\optim/  \\___ same for every candidate ___/

The prefix does not depend on the suffix, so its key/value cache is computed once per entry
and broadcast over each candidate batch; only ``suffix + post + target`` is re-run.

The separator space belongs to the suffix: the behaviour is tokenized alone and the suffix ids
are those of ``" " + suffix_text`` *in context* (byte-level BPE joins the space with the next
character, so a separate trailing-space token could never be reproduced from text). Every
candidate must round-trip: decoding ``behaviour ids + candidate`` and re-encoding
``behaviour + " " + suffix_text`` must give back exactly those ids, otherwise the candidate is
dropped (HarmBench and nanoGCG filter the suffix alone; the context is what the judged text
is replayed in). A suffix GCG returns therefore re-encodes, as text, to the ids that were
optimised. :func:`build_prompt_ids` still gives those exact ids for replay.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rgeom.errors import RgeomError
from rgeom.kvcache import expand_cache as _expand_cache
from rgeom.kvcache import prefix_kv as _prefix_kv
from rgeom.kvcache import run_cached as _run_cached
from rgeom.models import encode_chat, encode_chat_batch, encode_response

log = logging.getLogger(__name__)

SEPARATOR = " "


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


@dataclass(frozen=True)
class PromptParts:
    """Token ids of one GCG entry, split around the optimised suffix."""

    prefix: list[int]  # template prefix + behaviour (the separator is the suffix's)
    post: list[int]  # template tokens after the user message
    target: list[int]
    body_start: int = 0  # where the behaviour's ids start in ``prefix``
    system: str | None = None  # the system prompt the ids were encoded under

    @property
    def body(self) -> list[int]:
        """The behaviour's own ids, the context a candidate suffix must round-trip in."""
        return self.prefix[self.body_start :]

    def prompt_ids(self, suffix_ids: Sequence[int]) -> list[int]:
        return self.prefix + list(suffix_ids) + self.post


def _around_suffix(
    tokenizer, behaviour: str, system: str | None
) -> tuple[list[int], list[int], list[int]]:
    """Chat ids before the behaviour (BOS included), the behaviour's ids, the ids after it.

    Cut out of :func:`~rgeom.models.encode_chat`, so that the behaviour is tokenized in its
    template context (under SentencePiece, no '▁' of its own after a special token) and
    the layout is exactly the project's chat encoding.
    """
    enc = encode_chat(tokenizer, behaviour, system)
    return (
        enc.ids[: enc.user_start],
        enc.ids[enc.user_start : enc.user_end],
        enc.ids[enc.user_end :],
    )


def split_prompt(tokenizer, behaviour: str, target: str, system: str | None = None) -> PromptParts:
    """Tokenize one GCG entry around its (absent) suffix."""
    pre, body, post = _around_suffix(tokenizer, behaviour, system)
    tgt = encode_response(tokenizer, target, eos=False)
    if not tgt:
        raise RgeomError(f"GCG target for behaviour {behaviour[:60]!r} is empty")
    return PromptParts(prefix=pre + body, post=post, target=tgt, body_start=len(pre), system=system)


def build_prompt_ids(
    tokenizer, behaviour: str, suffix_ids: Sequence[int], system: str | None = None
) -> list[int]:
    """Chat-template ids of ``behaviour + " " + suffix`` exactly as GCG optimised them."""
    pre, body, post = _around_suffix(tokenizer, behaviour, system)
    return pre + body + list(suffix_ids) + post


def suffix_ids_in_context(
    tokenizer, behaviour: str, text: str, system: str | None = None
) -> list[int]:
    """Ids of ``" " + text`` as they come out of encoding ``behaviour + " " + text``.

    This is the starting point GCG needs for its suffixes to round-trip in context: encoded
    alone, ``"! ! !"`` starts with a bare ``"!"`` that the separator space would join.
    """
    base = encode_chat(tokenizer, behaviour, system)
    full = encode_chat(tokenizer, behaviour + SEPARATOR + text.strip(), system)
    head, post = base.ids[: base.user_end], base.ids[base.user_end :]
    if (
        full.ids[: len(head)] != head
        or full.ids[full.user_end :] != post
        or full.user_end == len(head)
    ):
        raise RgeomError(
            f"the suffix {text.strip()[:40]!r} merges with the end of the behaviour "
            f"{behaviour[-40:]!r} when tokenized; GCG needs them to stay separate"
        )
    return full.ids[len(head) : full.user_end]


def suffix_text_in_context(
    tokenizer, behaviour: str, suffix_ids: Sequence[int], system: str | None = None
) -> str:
    """The suffix as text, such that ``behaviour + " " + text`` is the decoded user message."""
    body = _around_suffix(tokenizer, behaviour, system)[1]
    full = tokenizer.decode(body + list(suffix_ids), clean_up_tokenization_spaces=False)
    body_text = tokenizer.decode(body, clean_up_tokenization_spaces=False)
    tail = full[len(body_text) :] if full.startswith(body_text) else full
    return tail.removeprefix(SEPARATOR)


def ascii_token_ids(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """Ids of non-special tokens whose decoded text is non-empty printable ASCII.

    ``vocab_size`` is the model's embedding size, which may exceed the tokenizer's (padding
    rows); ids beyond the tokenizer never qualify.
    """
    n = len(tokenizer) if vocab_size is None else min(vocab_size, len(tokenizer))
    special = set(tokenizer.all_special_ids)
    special.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    keep = [
        i
        for i, text in enumerate(texts)
        if i not in special and text and text.isascii() and text.isprintable()
    ]
    if not keep:
        raise RgeomError("the tokenizer has no printable-ASCII tokens for GCG to use")
    return torch.tensor(keep, dtype=torch.long)


def initial_suffix_ids(tokenizer, text: str = "! " * 20) -> list[int]:
    """Token ids of a suffix such as ``"! ! ! ..."`` encoded on its own.

    Not what GCG starts from (see :func:`suffix_ids_in_context`): alone, the first ``"!"``
    has no leading space, so these ids do not round-trip after a behaviour.
    """
    ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise RgeomError(f"initial GCG suffix {text!r} encodes to no tokens")
    return ids


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


def candidate_losses(
    model,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    candidates: torch.Tensor,
    post: torch.Tensor,
    target: torch.Tensor,
    batch_size: int | None = None,
    current: torch.Tensor | None = None,
    overhead: float = CALL_OVERHEAD_TOKENS,
    max_cache_bytes: int = MAX_CACHE_BYTES,
    collective: bool = False,
) -> torch.Tensor:
    """Target CE of every candidate suffix (rows of ``candidates``), cached context reused.

    Without ``current``, ``kv`` holds the prefix and every candidate runs in full. With it,
    ``kv`` holds the prefix *and* the suffix ``current``: a GCG candidate is ``current`` with
    one token swapped, so the positions before its swap are already in that cache (causal
    attention) and the pass starts at the swap. :func:`plan_buckets` groups the rows so the
    saved tokens are not eaten by extra passes; the losses are the same either way, up to
    floating-point summation order. ``max_cache_bytes`` bounds a pass's expanded cache
    (:func:`cache_bounded_batch`): long contextual prompts run in several passes.

    ``collective``: pad to the same number of forward passes on every rank of the default
    process group (:func:`_pad_passes`); every rank must then call this equally often.
    """
    n, width = candidates.shape
    tail = torch.cat([post, target]).unsqueeze(0)
    batch_size = cache_bounded_batch(kv, width + tail.shape[1], n, batch_size, max_cache_bytes)
    if current is None:
        starts = torch.zeros(n, dtype=torch.long)
        context = kv[0][0].shape[2]
    else:
        starts = _first_difference(candidates.cpu(), current.cpu())
        context = kv[0][0].shape[2] - width
    out = torch.empty(n, dtype=torch.float32)
    length = width + tail.shape[1]
    plan = plan_buckets(starts, length, overhead, batch_size) if n else []
    if collective:
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


def roundtrip_mask(
    tokenizer, candidates: torch.Tensor, behaviour: str | None = None, system: str | None = None
) -> torch.Tensor:
    """True where a candidate suffix survives decoding and re-encoding.

    With ``behaviour``, in context: ``behaviour ids + candidate`` is decoded, the text after
    the behaviour must start with the separator, and ``behaviour + that text`` (what a test
    case replays) must chat-encode (under ``system``) to exactly the optimised prompt: the
    template ids, ``behaviour ids + candidate``, the template ids after it. Without, the suffix
    alone (HarmBench's and nanoGCG's test). Equal ids, not just equal lengths: they are what
    makes a suffix saved as text reproduce the optimised attack.

    One batched decode and one batched encode (the fast tokenizer's Rust loop); what is left
    in Python is a list comparison per candidate, microseconds next to a forward pass.
    """
    rows = candidates.tolist()
    if behaviour is None:
        texts = tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)
        again = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
        return torch.tensor(
            [a == b for a, b in zip(again["input_ids"], rows, strict=True)], dtype=torch.bool
        )
    pre, body, post = _around_suffix(tokenizer, behaviour, system)
    body_text = tokenizer.decode(body, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode([body + r for r in rows], clean_up_tokenization_spaces=False)
    lead = body_text + SEPARATOR
    shaped = [t.startswith(lead) for t in decoded]
    # Re-encode the text a test case replays: the behaviour as given, then the suffix.
    cut = len(body_text)
    texts = [behaviour + t[cut:] if ok else "" for t, ok in zip(decoded, shaped, strict=True)]
    again = encode_chat_batch(tokenizer, texts, system)
    head = pre + body
    return torch.tensor(
        [ok and a.ids == head + r + post for a, r, ok in zip(again, rows, shaped, strict=True)],
        dtype=torch.bool,
    )


def screen_dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"float16"`` / ``None`` from a config value, with one clear error."""
    if name in (None, "", "none", "null"):
        return None
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise RgeomError(f"GCG screen_dtype {name!r} is not one of {sorted(choices)} or null")
    return choices[name]


@dataclass(frozen=True)
class _Search:
    """The per-run GCG settings one entry's optimisation needs."""

    steps: int
    search_width: int
    topk: int
    batch_size: int | None
    allowed: torch.Tensor
    generator: torch.Generator
    device: torch.device
    screen_dtype: torch.dtype | None
    rescore_top: int
    progress: bool
    keep_best: bool = True
    collective: bool = False


def gcg(
    model,
    tokenizer,
    behaviours: Sequence[str],
    targets: Sequence[str],
    suffixes: Sequence[Sequence[int]] | None = None,
    steps: int = 250,
    search_width: int = 512,
    topk: int = 256,
    batch_size: int | None = None,
    seed: int = 0,
    allowed_tokens: torch.Tensor | None = None,
    system: str | None = None,
    init_suffix: str = "! " * 20,
    progress: bool = False,
    screen_dtype: torch.dtype | str | None = None,
    rescore_top: int = 8,
    keep_best: bool = True,
    collective: bool = False,
) -> list[GCGResult]:
    """Run GCG on each (behaviour, target) pair; return the best suffix found for each.

    ``suffixes`` warm-starts each entry from given ids (R2D2 refreshes a pool entry from its
    current suffix); otherwise every entry starts from ``init_suffix``. ``batch_size`` caps the
    candidates per forward pass (``None``: all ``search_width`` at once). Deterministic for a
    ``seed``: candidate sampling uses its own CPU generator, never the global RNG.

    ``screen_dtype`` (e.g. ``torch.bfloat16``) scores the candidates under autocast in that
    precision, then rescores the ``rescore_top`` best in the model's own precision and moves
    only on those exact losses: every loss GCG reports or compares is the model's. Off by
    default; it pays on hardware with fast low-precision matmuls (CUDA, CPUs with AMX) for a
    model held in float32, and is a no-op for a model already in that dtype.

    ``keep_best``: move only to a candidate that beats the current suffix (a buffer of one,
    as nanoGCG does). False moves to each step's lowest-loss candidate even when it is worse,
    as HarmBench's R2D2 refresh does; the result is then the last step's suffix.

    ``collective``: every rank of the default process group runs this call together (R2D2
    under ZeRO-3, where each forward pass is a collective); each scoring phase is padded to
    the same number of forward passes on every rank. The ranks must pass the same number of
    entries and ``steps``.

    The model runs in eval mode (no dropout) and is returned to its previous mode afterwards.
    """
    if len(behaviours) != len(targets):
        raise RgeomError(f"GCG got {len(behaviours)} behaviours but {len(targets)} targets")
    if suffixes is not None and len(suffixes) != len(behaviours):
        raise RgeomError(f"GCG got {len(behaviours)} behaviours but {len(suffixes)} suffixes")
    if steps < 0 or search_width < 1 or topk < 1 or rescore_top < 1:
        raise RgeomError("GCG needs steps >= 0, search_width >= 1, topk >= 1 and rescore_top >= 1")
    device = _embedding_matrix(model).device
    vocab = _vocab_size(model)
    allowed = ascii_token_ids(tokenizer, vocab) if allowed_tokens is None else allowed_tokens
    if not isinstance(screen_dtype, torch.dtype):
        screen_dtype = screen_dtype_from_name(screen_dtype)
    if screen_dtype == _embedding_matrix(model).dtype:
        screen_dtype = None
    search = _Search(
        steps=steps,
        search_width=search_width,
        topk=topk,
        batch_size=batch_size,
        allowed=allowed.cpu().long(),
        generator=torch.Generator().manual_seed(seed),
        device=device,
        screen_dtype=screen_dtype,
        rescore_top=rescore_top,
        progress=progress,
        keep_best=keep_best,
        collective=collective,
    )

    was_training = model.training
    model.eval()
    results = []
    try:
        for i, (behaviour, target) in enumerate(zip(behaviours, targets, strict=True)):
            parts = split_prompt(tokenizer, behaviour, target, system)
            if suffixes is not None:
                start = list(suffixes[i])
            else:
                start = suffix_ids_in_context(tokenizer, behaviour, init_suffix, system)
            if not start:
                raise RgeomError(f"GCG warm-start suffix for entry {i} is empty")
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
    score = dict(batch_size=search.batch_size, current=current, collective=search.collective)
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
