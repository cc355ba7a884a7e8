"""Edits of a model along refusal directions, as hooks that remove themselves on exit.

* Directional (or rank-k subspace) ablation: project the direction out of every block input
  and of every attention and MLP output, so no component ever writes along it.
* Activation addition: add ``coeff * r`` to one block's input at every position.
* Weight orthogonalization: the same ablation baked into the embedding, ``o_proj`` and
  ``down_proj`` weights (Arditi et al. 2024, section 4.1).
* :class:`PrefixCache`: additions that rerun only the blocks from their layer on.

All hooks are context managers that remove themselves on exit, so a shared model is never
left modified.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rgeom.errors import RgeomError
from rgeom.kvcache import KV, SharedPrefix, cache_kwarg, expand_cache
from rgeom.models import decoder_layers, encode_chat
from rgeom.scoring import last_position_logits

log = logging.getLogger(__name__)


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
                logits = last_position_logits(model, inputs)
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
                logits = last_position_logits(self.model, inputs)
                if out is None:
                    out = torch.empty(self.base.shape[0], logits.shape[-1])
                out[idx] = logits
        return out
