"""Inputs of the causal stages: table provenance checks, refusal tokens and prompt texts.

Shared by the interventions stage (:mod:`rgeom.causal`) and the cross-anchor test
(:mod:`rgeom.causal_transfer`). The torch-side modules are imported inside the functions, so
the analysis stages that import those modules for their readers run without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rgeom.errors import RgeomError
from rgeom.io import read_meta


def check_tables(tokenizer, model, *paths: str | Path) -> dict[str, Any]:
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


def carrier_refusal_ids(tokenizer, carriers: str | Path) -> list[int]:
    """The refusal tokens the carrier search used, so scores compare with its table."""
    from rgeom.interventions import refusal_token_ids

    ids = read_meta(carriers).get("refusal_token_ids")
    return [int(i) for i in ids] if ids else refusal_token_ids(tokenizer)


def read_prompts(
    key: str, path: str | Path, n: int | None = None, with_target: bool = False
) -> tuple[list[str], list[Any]]:
    """The chat prompt texts of a prompt set (the first ``n``) and their targets; with
    ``with_target``, only the prompts that have a non-blank target."""
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
