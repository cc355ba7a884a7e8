"""The supervised training set shared by every arm, and its tokenization for TRL.

Harmful training prompts get refusal demonstrations. The utility (harmless) rows come from
``train.utility_source``:

``dataset`` (the reference, HarmBench's R2D2 recipe): ``train_harmless`` is a chat set such
    as UltraChat and every row keeps its whole conversation (``messages``); it is trained on
    with the loss on every token, as the recipe's packed ``text`` field is.
``self_distill``: the base model's own greedy answers to the harmless prompts, with the loss
    on the answer only; keeps the base model's utility without external data (the embedded
    demo, whose built-in prompts carry no answers). An answer cut at
    ``train.helpful_max_new_tokens`` gets no end-of-turn token: appending one would teach
    the model to stop mid-answer.

:func:`sft_dataset` turns the table into a pre-tokenized :class:`datasets.Dataset`
(``input_ids`` and ``completion_mask``) that TRL's ``SFTTrainer`` masks, truncates and
packs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from rgeom.config import section_with_defaults, setting
from rgeom.errors import RgeomError
from rgeom.io import read_table, write_table
from rgeom.models import encode_chat, encode_response
from rgeom.prompts import read_prompt_set, user_messages
from rgeom.schemas import SFT_FULL_SCHEMA, SFT_SCHEMA

log = logging.getLogger(__name__)

UTILITY_SOURCES = ("dataset", "self_distill")

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
    """Write the training table; ``model`` and ``tokenizer`` are only used for self_distill."""
    train = section_with_defaults("train", params.get("train"))
    source = train["utility_source"]
    if source not in UTILITY_SOURCES:
        raise RgeomError(
            f"train.utility_source must be one of {', '.join(UTILITY_SOURCES)}, got {source!r}"
        )
    # train.refusals null (the schema's default) is rgeom's built-in list.
    refusals = train["refusals"] or list(DEFAULT_REFUSALS)
    rng = np.random.default_rng(setting(params, "seed"))
    bad = read_prompt_set(harmful).to_pydict()
    good = read_prompt_set(harmless).to_pydict()
    if not bad["prompt_id"] or not good["prompt_id"]:
        raise RgeomError(f"training sets must not be empty ({harmful}, {harmless})")
    bad_prompts, good_prompts = user_messages(bad), user_messages(good)
    picks = rng.integers(0, len(refusals), size=len(bad_prompts))
    if source == "dataset":
        answers, complete, messages = _dataset_answers(harmless, good)
    else:
        answers, complete = _self_distill(model, tokenizer, good_prompts, params)
        messages = [None] * len(answers)
    n_bad = len(bad_prompts)
    table = pa.table(
        {
            "prompt_id": bad["prompt_id"] + good["prompt_id"],
            "kind": ["refusal"] * n_bad + ["helpful"] * len(good_prompts),
            "prompt": bad_prompts + good_prompts,
            "response": [refusals[i] for i in picks] + answers,
            "complete": [True] * n_bad + complete,
            "messages": [None] * n_bad + messages,
        }
    )
    write_table(
        out,
        table,
        SFT_FULL_SCHEMA,
        {**meta, "harmful": harmful, "harmless": harmless, "utility_source": source},
    )
    log.info(
        "wrote %d training examples to %s (utility from %s; %d helpful answers truncated)",
        table.num_rows,
        out,
        source,
        complete.count(False),
    )


def _dataset_answers(path: str, good: dict[str, list]) -> tuple[list, list, list]:
    """The first assistant reply (for reading) and the whole conversation of every row."""
    from rgeom.data.loaders import MESSAGES_FIELD

    chats = good.get(MESSAGES_FIELD) or [None] * len(good["prompt_id"])
    answers = []
    for pid, chat in zip(good["prompt_id"], chats, strict=True):
        if not chat:
            raise RgeomError(
                f"{path}: row {pid!r} has no conversation, but train.utility_source is "
                "'dataset' (the reference: train on the set's own answers). Use a chat set "
                "with a 'messages' field (HuggingFaceH4/ultrachat_200k), or set "
                "train.utility_source: self_distill to answer with the base model"
            )
        turns = json.loads(chat)
        answers.append(next(t["content"] for t in turns if t["role"] == "assistant"))
    return answers, [True] * len(answers), list(chats)


def _self_distill(model, tokenizer, prompts: list[str], params: dict[str, Any]):
    from rgeom.generation import generate_completions

    limit = section_with_defaults("train", params.get("train"))["helpful_max_new_tokens"]
    answers, _, new_tokens = generate_completions(
        model,
        tokenizer,
        prompts,
        batch_size=section_with_defaults("generate", params.get("generate"))["batch_size"],
        max_new_tokens=limit,
    )
    # generate_completions cuts at the first EOS, so a full budget means none came.
    return answers, [n < limit for n in new_tokens]


def encode_example(tokenizer, prompt: str, response: str, complete: bool, messages: str | None):
    """``(input_ids, completion_mask)`` of one training row.

    A conversation is a document, as in the reference recipe: its chat-templated text with
    the loss on every token, closed by EOS (the separator the reference's packer puts
    between documents). A pair keeps the loss on the response, which ends in the end-of-turn
    token only if it is complete.
    """
    if messages:
        text = tokenizer.apply_chat_template(json.loads(messages), tokenize=False)
        bos = tokenizer.bos_token
        ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    prompt_ids = encode_chat(tokenizer, prompt).ids
    response_ids = encode_response(tokenizer, response)
    if not complete:
        response_ids = response_ids[:-1]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def sft_dataset(path: str, tokenizer):
    """The training table as a pre-tokenized ``datasets.Dataset`` for TRL's SFTTrainer."""
    import datasets

    rows = read_table(path, SFT_SCHEMA).to_pydict()
    n = len(rows["prompt"])
    rows.setdefault("complete", [True] * n)
    rows.setdefault("messages", [None] * n)
    ids, masks = [], []
    for prompt, response, complete, messages in zip(
        rows["prompt"], rows["response"], rows["complete"], rows["messages"], strict=True
    ):
        i, m = encode_example(tokenizer, prompt, response, complete is not False, messages)
        ids.append(i)
        masks.append(m)
    if not ids:
        raise RgeomError(f"{path}: no training examples")
    return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


class PadCollator:
    """Right-pads a batch (labels -100 on padding); the benchmark's utility batches."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

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
