"""Greedy, batched, left-padded completions for one (arm, step, benchmark) cell.

Prompts are length-sorted so each batch pads little, and decoded with the KV cache;
rows go back to the prompt order of the input file before writing.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from rgeom.attacks.cases import is_test_case_table
from rgeom.config import schema_default, section_with_defaults
from rgeom.data import PROMPT_SCHEMA, prompt_text
from rgeom.errors import RgeomError
from rgeom.io import Shards, file_sha256, files_fingerprint, read_table, write_table
from rgeom.models import encode_chat, left_pad
from rgeom.schemas import GENERATION_SCHEMA, TEST_CASE_SCHEMA
from rgeom.schemas import GENERATION_SHARD_SCHEMA as SHARD_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = schema_default("generate.batch_size")
DEFAULT_MAX_NEW_TOKENS = schema_default("generate.max_new_tokens")


def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
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


def read_inputs(path: str) -> dict[str, list]:
    """Prompt set or attack test-case file -> the columns generation carries through.

    A test-case file (rgeom.attacks.testcases) replays each ``test_case`` verbatim; its
    behaviour id becomes ``prompt_id``, so the judge's per-behaviour ASR averages over a
    behaviour's test cases, and ``method`` says which attack made it.
    """
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


def _shard_size(settings: dict[str, Any], batch_size: int) -> int:
    """Test cases per shard (``settings``: the generate section with its defaults), rounded
    up to whole batches so every batch is the one an unsharded run would decode: the output
    then does not depend on the shard size. The schema's default is minutes of decoding on a
    CPU, seconds on a GPU, so a preempted job loses little, while the embedded benchmark sets
    fit one shard and skip the parts folder."""
    size = int(settings["shard_size"])
    if size < 1:
        raise RgeomError(f"generate.shard_size must be >= 1, got {size}")
    return -(-size // batch_size) * batch_size


def completions_table(
    cols: dict[str, list], messages: list, encoded: list, texts: list, n_new: list, meta: dict
) -> pa.Table:
    """The generation table, one row per test case, whichever backend decoded it."""
    n = len(messages)
    return pa.table(
        {
            "prompt_id": cols["prompt_id"],
            "label": cols["label"],
            "category": cols["category"],
            "prompt": messages,
            "target": cols["target"],
            "completion": texts,
            "n_prompt_tokens": [len(e) for e in encoded],
            "n_new_tokens": n_new,
            "arm": [meta.get("arm")] * n,
            "step": [meta.get("step")] * n,
            "benchmark": [meta.get("benchmark")] * n,
            "method": cols["method"],
        },
        schema=GENERATION_SCHEMA,
    )


def generate_table(model, tokenizer, prompts: str, out: str, params: dict[str, Any], meta: dict):
    """Complete every prompt of ``prompts`` into ``out``, resumably.

    Prompts are length-sorted once; consecutive slices of that order are shards, each
    written to ``<out>.parts/`` as it finishes (:class:`rgeom.io.Shards`). A rerun after a
    kill decodes only the missing shards, and the rows go back to input order at the end,
    so the table equals an undisturbed run's. An input that fits one shard skips the parts
    folder altogether.
    """
    cols = read_inputs(prompts)
    messages = cols["prompt"]
    # The filled section is read, not recorded: the shards' fingerprint keeps the caller's.
    settings = section_with_defaults("generate", params)
    batch_size = int(settings["batch_size"])
    max_new_tokens = int(settings["max_new_tokens"])
    n = len(messages)
    # Compact int32 arrays: all prompts are held at once for the global length sort, and
    # lists of Python ints would cost ~1 KiB per test case.
    encoded = [array("i", encode_chat(tokenizer, p).ids) for p in messages]
    order = sorted(range(n), key=lambda i: len(encoded[i]))
    shard_size = _shard_size(settings, batch_size)
    slices = [order[i : i + shard_size] for i in range(0, n, shard_size)]
    texts: list[str] = [""] * n
    n_new = [0] * n
    if len(slices) <= 1:
        Shards.discard(out)
        texts, _, n_new = generate_from_ids(model, tokenizer, encoded, batch_size, max_new_tokens)
        shards = None
    else:
        shards = Shards(
            out,
            {
                "stage": "generate",
                "prompts": {"path": str(prompts), "sha256": file_sha256(prompts)},
                "model": files_fingerprint(meta["model"]) if meta.get("model") else None,
                "params": params,
                "meta": meta,
                "shard_size": shard_size,
                "n": n,
            },
            len(slices),
        )
        for index, rows in enumerate(tqdm(slices, desc="generate shards", unit="shard")):
            if not shards.done(index):
                got, _, new = generate_from_ids(
                    model, tokenizer, [encoded[i] for i in rows], batch_size, max_new_tokens
                )
                part = pa.table({"row": rows, "completion": got, "n_new_tokens": new})
                write_table(shards.path(index), part, SHARD_SCHEMA, {"shard": index, **meta})
                shards.mark_done(index)
            part = read_table(shards.path(index), SHARD_SCHEMA)
            if part.column("row").to_pylist() != rows:
                raise RgeomError(f"{shards.path(index)}: rows do not match shard {index}")
            for row, text, new in zip(
                rows,
                part.column("completion").to_pylist(),
                part.column("n_new_tokens").to_pylist(),
                strict=True,
            ):
                texts[row] = text
                n_new[row] = new
    result = completions_table(cols, messages, encoded, texts, n_new, meta)
    write_table(out, result, GENERATION_SCHEMA, {**meta, "prompts": prompts, **params})
    if shards is not None:
        shards.finish()
    log.info("wrote %d completions to %s", n, out)
