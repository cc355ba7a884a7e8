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
        # The attack method of a test case (DirectRequest, Templates, GCG-transfer, ...) when
        # the prompts are a test-case file; null for plain prompt sets.
        ("method", pa.string()),
    ]
)


def generate_completions(
    model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 48
) -> tuple[list[str], list[int], list[int]]:
    """Greedy completions in input order; returns (texts, prompt lengths, new-token counts)."""
    encoded = [encode_chat(tokenizer, p).ids for p in prompts]
    return generate_from_ids(model, tokenizer, encoded, batch_size, max_new_tokens)


@torch.inference_mode()
def generate_from_ids(
    model, tokenizer, encoded: list[list[int]], batch_size: int = 16, max_new_tokens: int = 48
) -> tuple[list[str], list[int], list[int]]:
    """Greedy completions of already chat-encoded prompts (e.g. GCG's exact ids)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    new_tokens = [0] * len(encoded)
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


def _read_inputs(path: str) -> dict[str, list]:
    """Prompt set or attack test-case file -> the columns generation carries through.

    A test-case file (rgeom.attacks.testcases) replays each ``test_case`` verbatim; its
    behaviour id becomes ``prompt_id``, so the judge's per-behaviour ASR averages over a
    behaviour's test cases, and ``method`` says which attack made it.
    """
    from rgeom.attacks.testcases import TEST_CASE_SCHEMA, is_test_case_table
    from rgeom.data import PROMPT_SCHEMA, prompt_text
    from rgeom.io import read_table

    table = read_table(path)
    if is_test_case_table(table):
        cols = read_table(path, TEST_CASE_SCHEMA).to_pydict()
        return {
            "prompt_id": cols["behavior_id"],
            "label": [lab or "harmful" for lab in cols["label"]],
            "category": cols["category"],
            "prompt": cols["test_case"],
            "target": cols["target"],
            "method": cols["method"],
        }
    cols = read_table(path, PROMPT_SCHEMA).to_pydict()
    return {
        "prompt_id": cols["prompt_id"],
        "label": cols["label"],
        "category": cols["category"],
        "prompt": [prompt_text(t, c) for t, c in zip(cols["text"], cols["context"], strict=True)],
        "target": cols["target"],
        "method": [None] * len(cols["prompt_id"]),
    }


def generate_table(model, tokenizer, prompts: str, out: str, params: dict[str, Any], meta: dict):
    cols = _read_inputs(prompts)
    messages = cols["prompt"]
    texts, n_prompt, n_new = generate_completions(
        model,
        tokenizer,
        messages,
        batch_size=params.get("batch_size", 16),
        max_new_tokens=params.get("max_new_tokens", 48),
    )
    n = len(messages)
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
            "method": cols["method"],
        }
    )
    write_table(out, result, GENERATION_SCHEMA, {**meta, "prompts": prompts, **params})
    log.info("wrote %d completions to %s", n, out)
