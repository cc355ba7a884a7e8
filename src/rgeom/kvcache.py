"""Key/value caches of a prefix that many forward passes share.

Two users: GCG (:mod:`rgeom.attacks.gcg`) runs its ``template + behaviour`` prefix once
per entry and broadcasts it over every candidate batch; the forward passes that read a
prompt set (:func:`rgeom.scoring.last_logits`, :func:`rgeom.activations.extract_activations`)
run the opening tokens every chat-encoded prompt shares (SmolLM2's system prompt: 22 of
about 41 tokens of a short prompt) once per call, not once per prompt.

Running the shared opening once is exact up to floating-point rounding: a causal model's
states at those positions do not depend on what follows, and hooks active during the call
(an ablation, an addition) act on the prefix pass as on the full one. In float32 the
logits agree to about 1e-6 relative; in bfloat16 to the format's own rounding, since
the matrix products have other shapes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


def cache_kwarg(model) -> str:
    """The name of the forward's cache argument.

    transformers 5.2x renamed ``past_key_values`` to ``cache``; earlier 5.x only knows the
    old name, and passing it to a newer release logs a deprecation warning on every call.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_cached(model, cache, tail_logits: int, **inputs) -> torch.Tensor:
    """Logits of the last ``tail_logits`` positions of a forward pass that extends ``cache``.

    Only the needed positions get logits; skipping the LM head elsewhere saves most of a
    small model's compute (SmolLM2's 49k-word head dominates its 135M parameters).
    """
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": tail_logits}
    return model(**inputs, **kwargs).logits


def prefix_kv(model, prefix: torch.Tensor) -> KV:
    """Per-layer (key, value) tensors of the prefix ids [T], batch size 1, detached."""
    with torch.no_grad():
        out = model(input_ids=prefix.unsqueeze(0), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]


def expand_cache(model, kv: KV, batch: int):
    """A fresh cache holding ``kv`` for ``batch`` rows.

    The forward pass appends to the cache it is given, so every call gets its own object;
    ``expand`` makes views and ``DynamicCache`` copies them once on construction.
    """
    from transformers import DynamicCache

    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so a padded prompt sees the same rotary
    positions as it would alone (HF models only derive them from the mask in generate)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def uncached_inputs(
    ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
) -> dict:
    """Forward keyword arguments of a plain left-padded pass over ``ids``/``mask``, with
    :func:`padded_positions` unless ``positions`` are given."""
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": padded_positions(mask) if positions is None else positions,
        "use_cache": False,
    }


def common_prefix_len(seqs: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Length of the longest prefix all ``seqs`` share, leaving at least ``keep`` tokens of
    each after it (the positions a caller reads must be in the pass that sees them)."""
    if not seqs:
        return 0
    limit = min(len(s) for s in seqs) - keep
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return max(n, 0)


#: A shared opening shorter than this is not worth a separate pass.
MIN_SHARED = 2


@dataclass
class SharedPrefix:
    """The opening ``length`` tokens every prompt of a call shares, and their cache.

    ``kv`` is None when the prompts share fewer than :data:`MIN_SHARED` tokens (or sharing
    is off); :meth:`inputs` then gives plain left-padded full passes.
    """

    length: int
    kv: KV | None

    @classmethod
    def build(
        cls, model, seqs: Sequence[Sequence[int]], keep: int = 1, enabled: bool = True
    ) -> SharedPrefix:
        """Run the shared opening of ``seqs`` once, under whatever hooks are active now."""
        n = common_prefix_len(seqs, keep) if enabled else 0
        if n < MIN_SHARED:
            return cls(0, None)
        device = next(model.parameters()).device
        return cls(n, prefix_kv(model, torch.tensor(list(seqs[0][:n]), device=device)))

    def inputs(self, model, seqs: Sequence[Sequence[int]], pad_id: int) -> dict:
        """Forward keyword arguments for ``seqs`` (one batch): their tails left-padded after
        the shared opening, with positions that skip the padding as if each ran alone."""
        from rgeom.models import left_pad

        device = next(model.parameters()).device
        ids, mask = left_pad([list(s[self.length :]) for s in seqs], pad_id, device)
        # Positions count the real tokens only: padding takes the next one's and is masked.
        positions = padded_positions(mask) + self.length
        if self.kv is None:
            return uncached_inputs(ids, mask, positions)
        opening = torch.ones(len(seqs), self.length, dtype=mask.dtype, device=device)
        return {
            "input_ids": ids,
            "attention_mask": torch.cat([opening, mask], dim=1),
            "position_ids": positions,
            cache_kwarg(model): expand_cache(model, self.kv, len(seqs)),
            "use_cache": True,
        }
