"""Greedy, batched, left-padded completions for one (arm, step, benchmark) cell.

Prompts are length-sorted so each batch pads little, and decoded with the KV cache;
rows go back to the prompt order of the input file before writing.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from rgeom.io import write_table
from rgeom.models import encode_chat, left_pad

log = logging.getLogger(__name__)

GENERATION_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("label", pa.string()),
        ("category", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("completion", pa.string()),
        ("n_prompt_tokens", pa.int32()),
        ("n_new_tokens", pa.int32()),
        ("arm", pa.string()),
        ("step", pa.int32()),
        ("benchmark", pa.string()),
    ]
)


@torch.inference_mode()
def generate_completions(
    model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 48
) -> tuple[list[str], list[int], list[int]]:
    """Greedy completions in input order; returns (texts, prompt lengths, new-token counts)."""
    encoded = [encode_chat(tokenizer, p).ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    new_tokens = [0] * len(prompts)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in rows], tokenizer.pad_token_id, device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        for row, seq in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
            if eos in seq:
                seq = seq[: seq.index(eos)]
            new_tokens[row] = len(seq)
            texts[row] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    return texts, [len(e) for e in encoded], new_tokens


def generate_table(model, tokenizer, prompts: str, out: str, params: dict[str, Any], meta: dict):
    from rgeom.data import prompt_text, read_prompts

    table = read_prompts(prompts)
    cols = table.to_pydict()
    messages = [prompt_text(t, c) for t, c in zip(cols["text"], cols["context"], strict=True)]
    texts, n_prompt, n_new = generate_completions(
        model,
        tokenizer,
        messages,
        batch_size=params.get("batch_size", 16),
        max_new_tokens=params.get("max_new_tokens", 48),
    )
    n = table.num_rows
    result = pa.table(
        {
            "prompt_id": cols["prompt_id"],
            "label": cols["label"],
            "category": cols["category"],
            "prompt": messages,
            "target": cols["target"],
            "completion": texts,
            "n_prompt_tokens": n_prompt,
            "n_new_tokens": n_new,
            "arm": [meta.get("arm")] * n,
            "step": [meta.get("step")] * n,
            "benchmark": [meta.get("benchmark")] * n,
        }
    )
    write_table(out, result, GENERATION_SCHEMA, {**meta, "prompts": prompts, **params})
    log.info("wrote %d completions to %s", n, out)
