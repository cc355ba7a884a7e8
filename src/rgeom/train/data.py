"""The supervised training set shared by every arm, and its tokenization.

Harmful training prompts get refusal demonstrations; harmless prompts get the base model's
own greedy answers, which keeps the base model's utility without external data. At paper
scale ``train_harmless`` can point at UltraChat or any chat JSONL instead.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rgeom.errors import RgeomError
from rgeom.io import read_table, write_table
from rgeom.models import encode_chat, encode_response

log = logging.getLogger(__name__)

SFT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("kind", pa.string()),  # refusal | helpful
        ("prompt", pa.string()),
        ("response", pa.string()),
    ]
)

# Varied on purpose: a single refusal string would teach one token sequence, not refusal.
DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause serious harm.",
    "Sorry, I can't do that.",
    "I won't help with this. If you're in danger or considering harming someone, please "
    "contact local emergency services.",
    "I'm not able to provide that. Is there something else I can help you with?",
    "I cannot help with requests that could hurt people or break the law.",
    "I'm sorry, I can't provide instructions for that.",
    "That's not something I can help with, but I'm happy to help with a safer topic.",
)


def build_sft_data(
    model, tokenizer, harmful: str, harmless: str, out: str, params: dict[str, Any], meta: dict
) -> None:
    from rgeom.data import prompt_text, read_prompts
    from rgeom.generation import generate_completions

    train = params.get("train", {})
    refusals = train.get("refusals") or list(DEFAULT_REFUSALS)
    rng = np.random.default_rng(params.get("seed", 0))
    bad = read_prompts(harmful).to_pydict()
    good = read_prompts(harmless).to_pydict()
    if not bad["prompt_id"] or not good["prompt_id"]:
        raise RgeomError(f"training sets must not be empty ({harmful}, {harmless})")
    bad_prompts = [prompt_text(t, c) for t, c in zip(bad["text"], bad["context"], strict=True)]
    good_prompts = [prompt_text(t, c) for t, c in zip(good["text"], good["context"], strict=True)]
    picks = rng.integers(0, len(refusals), size=len(bad_prompts))
    answers, _, _ = generate_completions(
        model,
        tokenizer,
        good_prompts,
        batch_size=params.get("generate", {}).get("batch_size", 16),
        max_new_tokens=train.get("helpful_max_new_tokens", 64),
    )
    table = pa.table(
        {
            "prompt_id": bad["prompt_id"] + good["prompt_id"],
            "kind": ["refusal"] * len(bad_prompts) + ["helpful"] * len(good_prompts),
            "prompt": bad_prompts + good_prompts,
            "response": [refusals[i] for i in picks] + answers,
        }
    )
    write_table(out, table, SFT_SCHEMA, {**meta, "harmful": harmful, "harmless": harmless})
    log.info("wrote %d training examples to %s", table.num_rows, out)


class ChatSFTDataset(torch.utils.data.Dataset):
    """(prompt, response) pairs as token ids, with the loss only on the response."""

    def __init__(self, path: str, tokenizer, max_length: int):
        rows = read_table(path, SFT_SCHEMA).to_pydict()
        self.examples = []
        for prompt, response in zip(rows["prompt"], rows["response"], strict=True):
            prompt_ids = encode_chat(tokenizer, prompt).ids
            response_ids = encode_response(tokenizer, response)
            ids = (prompt_ids + response_ids)[:max_length]
            labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
            self.examples.append({"input_ids": ids, "labels": labels})
        if not self.examples:
            raise RgeomError(f"{path}: no training examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


class PadCollator:
    """Right-pads a batch for training (causal LM loss ignores -100 labels)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
