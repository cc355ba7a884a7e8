"""GCG's prompts as token ids: the chat template, the behaviour and the suffix around it.

The separator space belongs to the suffix: the behaviour is tokenized alone and the suffix ids
are those of ``" " + suffix_text`` *in context* (byte-level BPE joins the space with the next
character, so a separate trailing-space token could never be reproduced from text). Every
candidate must round-trip (:func:`roundtrip_mask`): decoding ``behaviour ids + candidate`` and
re-encoding ``behaviour + " " + suffix_text`` must give back exactly those ids, otherwise the
candidate is dropped (HarmBench and nanoGCG filter the suffix alone; the context is what the
judged text is replayed in). :func:`build_prompt_ids` still gives the exact ids for replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rgeom.errors import RgeomError
from rgeom.models import encode_chat, encode_chat_batch, encode_response

SEPARATOR = " "


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
