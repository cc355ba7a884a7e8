"""Interventions along refusal directions, and the search for the carrier direction.

* Directional (or rank-k subspace) ablation: project the direction out of every block input
  and of every attention and MLP output, so no component ever writes along it.
* Activation addition: add ``coeff * r`` to one block's input at every position.
* Weight orthogonalization: the same ablation baked into the embedding, ``o_proj`` and
  ``down_proj`` weights (Arditi et al. 2024, section 4.1).
* Refusal score: log-odds that the first response token starts a refusal.

All hooks are context managers that remove themselves on exit, so a shared model is never
left modified.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rgeom.errors import RgeomError

# The filter lives with the direction stage, which runs without torch; callers of the
# carrier search keep importing it from here.
from rgeom.geometry import filter_by_baseline
from rgeom.kvcache import KV, SharedPrefix, cache_kwarg, expand_cache
from rgeom.models import decoder_layers, encode_chat, encode_response
from rgeom.schemas import CARRIER_SCHEMA

log = logging.getLogger(__name__)

REFUSAL_PREFIXES = ("I", "Sorry", "As", "I'm", "Unfortunately")


def _as_tensor(x, model) -> torch.Tensor:
    p = next(model.parameters())
    t = (
        x.detach()
        if isinstance(x, torch.Tensor)
        else torch.as_tensor(np.array(x, dtype=np.float64))
    )
    return t.to(device=p.device, dtype=torch.float64)


def orthonormal_basis(directions) -> torch.Tensor:
    """Orthonormal rows spanning ``directions`` ([d] or [k, d]), in float64."""
    t = (
        directions.detach()
        if isinstance(directions, torch.Tensor)
        else torch.as_tensor(np.array(directions, dtype=np.float64))
    )
    t = t.to(torch.float64)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"directions must be [d] or [k, d], got shape {tuple(t.shape)}")
    q, r = torch.linalg.qr(t.T)
    if (r.diagonal().abs() < 1e-10 * max(1.0, float(r.abs().max()))).any():
        raise ValueError("directions are linearly dependent or zero")
    return q.T.contiguous()


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x minus its component in the span of the orthonormal rows of ``basis``."""
    b = basis.to(x.dtype)
    return x - (x @ b.T) @ b


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _block_parts(block) -> tuple[torch.nn.Module, torch.nn.Module]:
    # Explicit None checks: `or` would call a module's __len__ (e.g. on a ModuleList).
    attn = getattr(block, "self_attn", None)
    if attn is None:
        attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    if attn is None or mlp is None:
        raise RgeomError(f"cannot find the attention and MLP of {type(block).__name__}")
    return attn, mlp


@contextlib.contextmanager
def ablation(model, directions) -> Iterator[torch.Tensor]:
    """Ablate the span of ``directions`` ([d] for directional ablation, [k, d] for rank-k
    subspace ablation) at every block input, attention output and MLP output."""
    basis = orthonormal_basis(directions).to(next(model.parameters()).device)
    handles = []

    def pre_hook(module, args, kwargs):
        if args:
            return (project_out(args[0], basis), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=project_out(kwargs["hidden_states"], basis))
        return args, kwargs

    def out_hook(module, args, output):
        return _replace_first(output, project_out(_first(output), basis))

    try:
        for block in decoder_layers(model):
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            for part in _block_parts(block):
                handles.append(part.register_forward_hook(out_hook))
        yield basis
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def addition(model, direction, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * direction`` (not normalised: Arditi et al. add the raw mean
    difference) to the input of block ``layer`` at every position."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise RgeomError(f"addition layer {layer} is out of range; n_layers={len(blocks)}")
    vec = _as_tensor(direction, model).reshape(-1) * coeff

    def pre_hook(module, args, kwargs):
        if args:
            return (args[0] + vec.to(args[0].dtype), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, dict(kwargs, hidden_states=hidden + vec.to(hidden.dtype))

    handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def orthogonalize_weights(model, directions) -> None:
    """Edit ``model`` in place so that nothing writes along ``directions``.

    The token embedding and every attention ``o_proj`` and MLP ``down_proj`` lose their
    output component in the span. A tied LM head is first given its own copy of the
    embedding: it reads the residual stream, and editing it too would change the logits
    beyond what the ablation does.
    """
    basis = orthonormal_basis(directions).to(next(model.parameters()).device)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
        # Keeps save_pretrained from re-tying (and so dropping) the untied head.
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    # Embedding rows live in the residual space: W_E [V, d].
    w = embed.weight
    w.copy_(project_out(w.double(), basis).to(w.dtype))
    for block in decoder_layers(model):
        attn, mlp = _block_parts(block)
        for name, module in (("o_proj", attn), ("down_proj", mlp)):
            lin = getattr(module, name, None)
            if not isinstance(lin, torch.nn.Linear):
                raise RgeomError(f"cannot find a Linear {name} in {type(module).__name__}")
            # nn.Linear computes x W^T, so the output side is W's first axis: W [d, in].
            w = lin.weight
            w.copy_(project_out(w.double().T, basis).T.to(w.dtype))
            if lin.bias is not None:
                lin.bias.copy_(project_out(lin.bias.double(), basis).to(lin.bias.dtype))


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
        inputs = shared.inputs(model, [encs[i] for i in idx], pad)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        for row, i in enumerate(idx):
            out[i] = logits[row].float().cpu()
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


@contextlib.contextmanager
def _blocks_from(model, layer: int) -> Iterator[None]:
    """Temporarily make block ``layer`` the model's first block, so that ``inputs_embeds``
    enter the residual stream there; the rest of the HF forward (rotary positions, masks,
    final norm, head) is reused unchanged."""
    inner = model.model
    full = inner.layers
    inner.layers = torch.nn.ModuleList(list(full)[layer:])
    try:
        yield
    finally:
        inner.layers = full


class PrefixCache:
    """Block inputs of the unedited model for a fixed prompt list, so that an addition at
    layer l reruns only blocks l..L-1: the blocks before l see exactly the base model.

    With ``share_prefix`` the prompts' shared opening (:class:`rgeom.kvcache.SharedPrefix`)
    is also run once: its block inputs are kept for one row, and an addition reruns the
    opening once from block l and each prompt's tail against that cache.

    On construction it checks that restarting at a block reproduces the base logits; where
    the architecture does not allow it (e.g. Gemma rescales ``inputs_embeds``),
    ``usable`` is False and callers fall back to full forwards.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        layers: Sequence[int],
        batch_size: int,
        share_prefix: bool = True,
    ):
        self.model = model
        self.layers = sorted(set(layers))
        encs = [encode_chat(tokenizer, p).ids for p in prompts]
        self.order = sorted(range(len(encs)), key=lambda i: -len(encs[i]))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # (prompt indices, tail mask, positions, {layer: block input of the tails})
        self.batches: list[tuple[list[int], torch.Tensor, torch.Tensor, dict]] = []
        self.opening: dict[int, torch.Tensor] = {}
        self.shared_len = 0
        self.base: torch.Tensor | None = None
        self.usable = bool(self.layers) and hasattr(getattr(model, "model", None), "layers")
        if not self.usable:
            return
        with self._capturing(self.opening), torch.inference_mode():
            shared = SharedPrefix.build(model, encs, enabled=share_prefix)
        self.shared_len = shared.length
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start : start + batch_size]
            inputs = shared.inputs(model, [encs[i] for i in idx], pad)
            captured: dict[int, torch.Tensor] = {}
            with self._capturing(captured), torch.inference_mode():
                logits = model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()
            tail_mask = inputs["attention_mask"][:, self.shared_len :]
            self.batches.append((idx, tail_mask, inputs["position_ids"], captured))
            self._scatter_base(idx, logits, len(encs))
        # Checked even at layer 0: a model that rescales inputs_embeds fails there too.
        zero = torch.zeros(model.config.hidden_size, dtype=torch.float64)
        diff = (self.logits_with_addition(self.layers[-1], zero) - self.base).abs().max()
        scale = max(1.0, float(self.base.abs().max()))
        self.usable = bool(diff <= 1e-4 * scale)
        if not self.usable:
            log.warning("cannot restart %s at a block; using full forwards", type(model).__name__)

    @contextlib.contextmanager
    def _capturing(self, captured: dict) -> Iterator[None]:
        blocks = decoder_layers(self.model)
        handles = [
            blocks[layer].register_forward_pre_hook(self._saver(captured, layer), with_kwargs=True)
            for layer in self.layers
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _saver(captured: dict, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer] = hidden.detach().clone()

        return hook

    def _scatter_base(self, idx: list[int], logits: torch.Tensor, n: int) -> None:
        if self.base is None:
            self.base = torch.empty(n, logits.shape[-1])
        self.base[idx] = logits

    def _opening_kv(self, layer: int, v: torch.Tensor) -> KV:
        """The opening's keys and values with ``v`` added at block ``layer``'s input, for
        every block: the blocks before ``layer`` never run from this cache, so theirs are
        zeros of the right length (the model reads the cache's length from block 0)."""
        hidden = self.opening[layer]
        n = hidden.shape[1]
        positions = torch.arange(n, device=hidden.device)[None]
        out = self.model(
            inputs_embeds=hidden + v.to(hidden.dtype),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        first = cache.layers[layer]
        blank = (torch.zeros_like(first.keys), torch.zeros_like(first.values))
        return [
            blank if i < layer else (cache.layers[i].keys, cache.layers[i].values)
            for i in range(self.model.config.num_hidden_layers)
        ]

    @torch.inference_mode()
    def logits_with_addition(self, layer: int, vec) -> torch.Tensor:
        """Last-position logits [n, V] with ``vec`` added to block ``layer``'s input."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not cached")
        v = _as_tensor(vec, self.model).reshape(-1)
        out = None
        with _blocks_from(self.model, layer):
            kv = self._opening_kv(layer, v) if self.shared_len else None
            for idx, mask, positions, captured in self.batches:
                hidden = captured[layer]
                inputs = {
                    "inputs_embeds": hidden + v.to(hidden.dtype),
                    "position_ids": positions,
                    "logits_to_keep": 1,
                }
                if kv is None:
                    inputs.update(attention_mask=mask, use_cache=False)
                else:
                    opening = torch.ones(len(idx), self.shared_len, dtype=mask.dtype)
                    inputs.update(
                        attention_mask=torch.cat([opening.to(mask.device), mask], dim=1),
                        use_cache=True,
                        **{cache_kwarg(self.model): expand_cache(self.model, kv, len(idx))},
                    )
                logits = self.model(**inputs).logits[:, -1].float().cpu()
                if out is None:
                    out = torch.empty(self.base.shape[0], logits.shape[-1])
                out[idx] = logits
        return out


def score_direction(
    model,
    tokenizer,
    vec,
    layer: int,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    base_harmless: torch.Tensor,
    batch_size: int = 16,
    cache: PrefixCache | None = None,
    cache_rows: Sequence[int] | None = None,
    ablate=None,
    share_prefix: bool = True,
) -> dict[str, Any]:
    """The carrier-search scores of one raw direction ``vec`` read at block ``layer``.

    ``bypass``: mean refusal score on ``harmful`` with r-hat ablated everywhere; ``induce``:
    mean score on ``harmless`` with r added at ``layer``'s input; ``kl``: mean
    KL(base || ablated) on ``harmless`` against ``base_harmless`` (the unedited logits).
    Also the per-prompt arrays ``bypass_scores``, ``induce_scores`` and ``kl_values``.
    ``cache`` (a :class:`PrefixCache` over ``harmless`` holding ``layer``) avoids rerunning
    the blocks before ``layer`` for the addition; ``cache_rows`` are the cache's prompts that
    make up ``harmless`` (all of them when None), for a cache built before a prompt filter.
    ``ablate`` ([k, d]) ablates that span instead of ``vec``'s, for a rank-k carrier.
    ``share_prefix``: see :func:`last_logits`.
    """
    # One call for both sets: their shared opening runs once, and batches fill up.
    with ablation(model, vec if ablate is None else ablate):
        ablated = last_logits(model, tokenizer, [*harmful, *harmless], batch_size, share_prefix)
    abl_harmful, abl_harmless = ablated[: len(harmful)], ablated[len(harmful) :]
    if cache is not None and layer in cache.layers:
        add_harmless = cache.logits_with_addition(layer, vec)
        if cache_rows is not None:
            add_harmless = add_harmless[list(cache_rows)]
    else:
        with addition(model, vec, layer, 1.0):
            add_harmless = last_logits(model, tokenizer, harmless, batch_size, share_prefix)
    bypass = refusal_score_from_logits(abl_harmful, refusal_ids).numpy()
    induce = refusal_score_from_logits(add_harmless, refusal_ids).numpy()
    kl = kl_last_position(base_harmless, abl_harmless).numpy()
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


def layer_cut(n_layers: int, max_layer_frac: float = 0.8) -> int:
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


def select_carrier(
    model,
    tokenizer,
    directions: Mapping[tuple[int, int], Any],
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    max_layer_frac: float = 0.8,
    kl_max: float = 0.1,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    filter_prompts: bool = False,
    min_prompts: int = 1,
    n_boot: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    subspace_ranks: Sequence[int] = (),
    subspace: Callable[[tuple[int, int], int], np.ndarray | None] | None = None,
) -> CarrierSearch:
    """Pick the refusal direction that carries refusal (Arditi et al. 2024, appendix C).

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
    cached base activations (see :class:`PrefixCache`), and every other pass runs the
    prompts' shared opening once (see :func:`last_logits`).

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
    if not harmful or not harmless:
        raise RgeomError("carrier search needs both harmful and harmless validation prompts")
    n_layers = len(decoder_layers(model))
    refusal_ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(tokenizer)

    cut = layer_cut(n_layers, max_layer_frac)

    def evaluable(layer: int, vec: np.ndarray) -> bool:
        return layer < cut and np.isfinite(vec).all() and vec.any()

    candidates = {
        key: np.asarray(r, dtype=np.float64).reshape(-1) for key, r in sorted(directions.items())
    }
    for layer, _ in candidates:
        if not 0 <= layer < n_layers:
            raise RgeomError(f"candidate direction at layer {layer}: n_layers={n_layers}")
    cache = None
    if reuse_prefix:
        layers = {layer for (layer, _), vec in candidates.items() if evaluable(layer, vec)}
        cache = PrefixCache(model, tokenizer, harmless, sorted(layers), batch_size, reuse_prefix)
        if not cache.usable:
            cache = None
    # The cache already ran the base model over the harmless prompts.
    base_harmless = (
        cache.base
        if cache is not None
        else last_logits(model, tokenizer, harmless, batch_size, reuse_prefix)
    )
    base_harmful = last_logits(model, tokenizer, harmful, batch_size, reuse_prefix)
    score_h = refusal_score_from_logits(base_harmful, refusal_ids).numpy()
    score_b = refusal_score_from_logits(base_harmless, refusal_ids).numpy()
    baseline = {"harmful": float(score_h.mean()), "harmless": float(score_b.mean())}
    prompt_filter: dict[str, Any] = {
        "enabled": False,
        "harmful_kept": len(harmful),
        "harmful_total": len(harmful),
        "harmless_kept": len(harmless),
        "harmless_total": len(harmless),
    }
    cache_rows = None
    if filter_prompts:
        keep_h, keep_b, prompt_filter = filter_by_baseline(score_h, score_b, min_prompts)
        log.info(
            "prompt filter: harmful %d/%d, harmless %d/%d kept",
            len(keep_h),
            len(harmful),
            len(keep_b),
            len(harmless),
        )
        harmful = [harmful[i] for i in keep_h]
        harmless = [harmless[i] for i in keep_b]
        base_harmless = base_harmless[keep_b]
        # The cache keeps every harmless prompt; the additions are read at the kept rows.
        cache_rows = keep_b.tolist()
        baseline.update(
            harmful_kept=float(score_h[keep_h].mean()), harmless_kept=float(score_b[keep_b].mean())
        )
    rows = []
    for (layer, pos), vec in candidates.items():
        row: dict[str, Any] = {"layer": layer, "position": pos}
        if not evaluable(layer, vec):
            row.update(bypass=math.nan, induce=math.nan, kl=math.nan, admissible=False)
            rows.append(row)
            continue
        scores = score_direction(
            model,
            tokenizer,
            vec,
            layer,
            harmful,
            harmless,
            refusal_ids,
            base_harmless,
            batch_size,
            cache,
            cache_rows,
            share_prefix=reuse_prefix,
        )
        bypass, induce, kl = scores["bypass"], scores["induce"], scores["kl"]
        # Streams: harmful prompts 0, harmless 1, so induce and kl share their resamples.
        for name, values, stream in (
            ("bypass", scores["bypass_scores"], 0),
            ("induce", scores["induce_scores"], 1),
            ("kl", scores["kl_values"], 1),
        ):
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_means(
                values, n_boot, ci, seed, stream
            )
        row.update(
            bypass=bypass,
            induce=induce,
            kl=kl,
            admissible=admissible(bypass, induce, kl, kl_max),
        )
        rows.append(row)
        log.info(
            "candidate L%d p%d: bypass %.3f induce %.3f kl %.4f", layer, pos, bypass, induce, kl
        )
    chosen = [row for row in rows if row["admissible"]]
    best = min(chosen, key=lambda row: row["bypass"]) if chosen else None
    carrier = (best["layer"], best["position"]) if best else None
    scored = [r for r in rows if math.isfinite(r["bypass"])]
    anchor = carrier
    if anchor is None and scored:
        low = min(scored, key=lambda r: (r["bypass"], r["layer"]))
        anchor = (low["layer"], low["position"])
    subspaces = []
    for k in sorted(set(subspace_ranks)):
        if anchor is None or subspace is None:
            break
        basis = subspace(anchor, k)
        sub: dict[str, Any] = {
            "rank": k,
            "layer": anchor[0],
            "position": anchor[1],
            "anchor_admissible": carrier is not None,
        }
        if basis is None:
            sub.update(bypass=math.nan, induce=math.nan, kl=math.nan, admissible=False)
            subspaces.append(sub)
            continue
        raw = np.asarray(candidates[anchor], dtype=np.float64).reshape(-1)
        scores = score_direction(
            model,
            tokenizer,
            basis.T @ (basis @ raw),
            anchor[0],
            harmful,
            harmless,
            refusal_ids,
            base_harmless,
            batch_size,
            cache,
            cache_rows,
            ablate=basis,
            share_prefix=reuse_prefix,
        )
        bypass, induce, kl = scores["bypass"], scores["induce"], scores["kl"]
        sub.update(
            bypass=bypass, induce=induce, kl=kl, admissible=admissible(bypass, induce, kl, kl_max)
        )
        subspaces.append(sub)
        log.info(
            "rank-%d subspace at L%d p%d: bypass %.3f induce %.3f kl %.4f",
            k,
            anchor[0],
            anchor[1],
            bypass,
            induce,
            kl,
        )
    return CarrierSearch(
        carrier=carrier,
        candidates=rows,
        baseline=baseline,
        reused_prefix=cache is not None,
        prompt_filter=prompt_filter,
        n_boot=int(n_boot),
        ci=float(ci),
        subspaces=subspaces,
    )


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
    from rgeom.activations import load_prompt_set, prompt_text

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
    have = {(int(layer), int(pos)) for layer, pos in directions}
    raw_positions = params.get("positions")
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
    stride = params.get("layer_stride")
    stride = 1 if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise RgeomError(f"carrier.layer_stride must be an integer >= 1, got {stride!r}")
    for pos in positions:
        if not any(p == pos for _, p in have):
            held = sorted({p for _, p in have})
            raise RgeomError(f"carrier.positions: position {pos} is not in {source} (has {held})")
    if params.get("layers") is None:
        cut = layer_cut(n_layers, float(params.get("max_layer_frac", 0.8)))
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


def carrier_search_table(
    model,
    tokenizer,
    directions: str | Path,
    harmful: str | Path,
    harmless: str | Path,
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    seed: int = 0,
    prompt_filter: str | Path | None = None,
    activations: str | Path | None = None,
) -> CarrierSearch:
    """Run :func:`select_carrier` on a direction table and two validation prompt files and
    write every candidate's scores to ``out``; the carrier (or null) goes in the metadata.

    params: ``max_layer_frac`` (0.8), ``kl_max`` (0.1), ``batch_size`` (16),
    ``reuse_prefix`` (true), ``refusal_prefixes`` (the opening words of refusals), the
    candidate subset (see :func:`select_candidates`): ``layers`` (null), ``layer_stride``
    (1), ``positions`` (null: every post-instruction position); ``n_boot`` (200)
    prompt-bootstrap replicates for ``ci`` (0.95) intervals on every score, drawn with
    ``seed``; and the rank-k carriers ``subspace_ranks`` ([2, 3]), written to the metadata
    (``subspaces``): the interventions' rank-k subspace at the carrier
    (:func:`rgeom.causal.subspace_basis`: r-hat, then the top per-prompt contrasts of the
    cell's ``activations`` table), so none without that table.
    ``prompt_filter`` (a :func:`rgeom.geometry.prompt_filter_table` of the source model)
    restricts the validation prompts to its kept ``val`` ids, the same in every cell; its
    kept / total counts go in the metadata (``prompt_filter``) and the ``n_harmful`` /
    ``n_harmless`` columns.
    """
    from rgeom.activations import template_hash, tokenizer_hash
    from rgeom.geometry import load_directions
    from rgeom.io import read_meta, write_table

    params = dict(params or {})
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
    max_layer_frac = float(params.get("max_layer_frac", 0.8))
    ints = {}
    for key, default, least in (("n_boot", 200, 0),):
        v = params.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise RgeomError(f"carrier.{key} must be an integer >= {least}, got {v!r}")
        ints[key] = v
    ci = params.get("ci", 0.95)
    if not isinstance(ci, int | float) or isinstance(ci, bool) or not 0 < ci < 1:
        raise RgeomError(f"carrier.ci must be in (0, 1), got {ci!r}")
    ranks = params.get("subspace_ranks", [2, 3])
    ranks = [] if ranks in (None, []) else _int_list(ranks, "subspace_ranks")
    if any(not 2 <= k <= 3 for k in ranks):
        raise RgeomError(f"carrier.subspace_ranks must lie in 2..3, got {ranks}")
    candidates = select_candidates(load_directions(directions), n_layers, params, directions)
    subspace = None
    if activations is not None and ranks:
        from rgeom.causal import contrast_vectors, subspace_basis

        def subspace(anchor: tuple[int, int], k: int) -> np.ndarray | None:
            basis = subspace_basis(candidates[anchor], contrast_vectors(activations, *anchor), k)
            return basis if len(basis) == k else None

    prefixes = params.get("refusal_prefixes") or REFUSAL_PREFIXES
    refusal_ids = refusal_token_ids(tokenizer, prefixes)
    keep: dict[str, set[str] | None] = {"harmful": None, "harmless": None}
    pf: dict[str, Any] = {"enabled": False}
    if prompt_filter is not None:
        from rgeom.geometry import load_prompt_filter

        kept, every, pf = load_prompt_filter(prompt_filter, "val")
        keep = {label: kept[label] for label in keep}
    else:
        every = {"harmful": None, "harmless": None}
    harmful_texts = _prompt_texts("val_harmful", harmful, keep["harmful"], every["harmful"])
    harmless_texts = _prompt_texts("val_harmless", harmless, keep["harmless"], every["harmless"])
    pf.update(harmful_kept=len(harmful_texts), harmless_kept=len(harmless_texts))
    result = select_carrier(
        model,
        tokenizer,
        candidates,
        harmful_texts,
        harmless_texts,
        refusal_ids=refusal_ids,
        max_layer_frac=max_layer_frac,
        kl_max=float(params.get("kl_max", 0.1)),
        batch_size=int(params.get("batch_size", 16)),
        reuse_prefix=bool(params.get("reuse_prefix", True)),
        n_boot=ints["n_boot"],
        ci=float(ci),
        seed=int(seed),
        subspace_ranks=ranks,
        subspace=subspace,
    )
    rows = result.candidates
    # Rows at or above the layer cut were never scored, so they have no interval keys.
    evaluated = ["bypass_ci_low" in r for r in rows]
    table = pa.table(
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
    record = dict(meta)
    record.update({k: source[k] for k in ("d_model", "n_layers", "template_hash") if k in source})
    record.update(
        carrier=list(result.carrier) if result.carrier else None,
        baseline_refusal_score=result.baseline,
        refusal_token_ids=refusal_ids,
        refusal_tokens=[tokenizer.decode([i]) for i in refusal_ids],
        selection={
            "max_layer_frac": max_layer_frac,
            "kl_max": float(params.get("kl_max", 0.1)),
            "layers": sorted({layer for layer, _ in candidates}),
            "positions": sorted({pos for _, pos in candidates}),
            "layer_stride": int(params.get("layer_stride") or 1),
            "layer_cut": layer_cut(n_layers, max_layer_frac),
            "subspace_ranks": ranks if subspace is not None else [],
        },
        prompt_filter=pf,
        bootstrap={"n_boot": result.n_boot, "ci": result.ci, "seed": int(seed)},
        # NaN (a rank the window cannot span) becomes null in the JSON record.
        subspaces=[
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in sub.items()
            }
            for sub in result.subspaces
        ],
    )
    if result.carrier is None:
        log.warning("no admissible carrier direction among %d candidates", len(rows))
    write_table(out, table, CARRIER_SCHEMA, record)
    return result
