"""Chat encoding: a prompt rendered through the model's chat template, as token ids.

The ids equal the reference pipelines' (HarmBench, Arditi et al., R2D2: the rendered prompt
tokenized with the tokenizer's defaults), except that special-token text inside a user's
message stays plain text. Works with a transformers tokenizer or a
:class:`~rgeom.plain_tokenizer.PlainTokenizer`; torch is imported only by :func:`left_pad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rgeom.errors import RgeomError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ChatEncoding:
    """A prompt rendered through the chat template, as token ids.

    ``suffix_len`` counts the post-instruction tokens: everything the template puts after
    the user's message (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``). The user's message
    itself is ``ids[user_start:user_end]`` and ``user_end == len(ids) - suffix_len``.
    """

    ids: list[int]
    suffix_len: int
    user_start: int = 0
    user_end: int = 0


_SENTINEL = "\x00RGEOM_USER_MESSAGE\x00"
_REPLY_SENTINEL = "\x00RGEOM_ASSISTANT_REPLY\x00"


def _template_parts(tokenizer, system: str | None) -> tuple[str, str]:
    """The template's text before and after the user's message (inserted verbatim)."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _SENTINEL})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.count(_SENTINEL) != 1:
        raise RgeomError("the chat template does not place the user message exactly once")
    prefix, suffix = rendered.split(_SENTINEL)
    return prefix, suffix


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before any text (``add_special_tokens=True``).

    BOS for Llama-, Mistral- and Gemma-style tokenizers, nothing for ChatML ones such as
    SmolLM2's or Qwen's. HarmBench, Arditi et al. and HarmBench's R2D2 step tokenize the
    rendered prompt with the tokenizer's defaults, so this is what their inputs start with.
    """
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return list(with_special[:k])
    return []


def _segment_ends(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The ids of ``text``, and (token index, start, end) of each added token it splits at.

    An added id is a split point only where its own text stands in ``text``: an ``<unk>``
    that the model emits for an unknown character is not.
    """
    added = {i: t.strip() for t, i in tokenizer.get_added_vocab().items()}
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [
        (k, start, stop)
        for k, (tid, (start, stop)) in enumerate(
            zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        )
        if tid in added and text[start:stop].strip() == added[tid]
    ]


class _NotFirst:
    """Encode as a text segment that does not start the string.

    Tokenizers split the text at added (special) tokens and pre-tokenize each piece on its
    own; a ``Metaspace`` pre-tokenizer with ``prepend_scheme="first"`` (Llama, Mistral)
    adds its '▁' only to the piece at offset 0. A piece encoded alone is always at offset
    0, so while this is active the scheme is "never", which is what that pre-tokenizer
    does to a piece after a special token.
    """

    def __init__(self, tokenizer, active: bool):
        self.spaces = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        pre = getattr(backend, "pre_tokenizer", None) if active else None
        stack = [pre] if pre is not None else []
        while stack:
            p = stack.pop()
            if getattr(p, "prepend_scheme", None) == "first":
                self.spaces.append(p)
            elif type(p).__name__ == "Sequence":
                i = 0
                while True:
                    try:
                        stack.append(p[i])
                    except (IndexError, TypeError):
                        break
                    i += 1

    def __enter__(self):
        for p in self.spaces:
            p.prepend_scheme = "never"

    def __exit__(self, *exc):
        for p in self.spaces:
            p.prepend_scheme = "first"


@dataclass(frozen=True)
class _Frame:
    """The rendered template around the user's message, cut at special tokens.

    ``head`` and ``tail`` are ids of whole text segments (ending/starting at an added
    token), identical whatever the message. ``lead`` and ``trail`` are the template text
    that shares the message's segment: they are tokenized together with it, so that the
    ids equal those of the whole rendered string, merges and '▁' included.
    """

    bos: list[int]
    head: list[int]
    lead: str
    trail: str
    tail: list[int]
    first: bool  # the message's segment starts the rendered text


def _frame(tokenizer, system: str | None) -> _Frame:
    prefix, suffix = _template_parts(tokenizer, system)
    pre, ends = _segment_ends(tokenizer, prefix)
    n_head, cut = 0, 0
    for k, _, stop in ends:
        n_head, cut = k + 1, stop
    post, ends = _segment_ends(tokenizer, suffix)
    n_trail, split = len(post), len(suffix)
    for k, start, _ in ends[:1]:
        n_trail, split = k, start
    return _Frame(
        bos=bos_prefix(tokenizer),
        head=list(pre[:n_head]),
        lead=prefix[cut:],
        trail=suffix[:split],
        tail=list(post[n_trail:]),
        first=cut == 0,
    )


def encode_chat_batch(
    tokenizer, prompts: list[str], system: str | None = None
) -> list[ChatEncoding]:
    """:func:`encode_chat` for many prompts: one template rendering, one batched encode."""
    frame = _frame(tokenizer, system)
    texts = [frame.lead + p + frame.trail for p in prompts]
    with _NotFirst(tokenizer, active=not frame.first):
        mids = tokenizer(
            texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )
    out = []
    a = len(frame.lead)
    for prompt, ids, offsets in zip(
        prompts, mids["input_ids"], mids["offset_mapping"], strict=True
    ):
        b = a + len(prompt)
        # A token holding any character of the message belongs to it (under SentencePiece
        # the '▁' of the template's space before the message starts the message's first
        # token); the template's tokens are those wholly before or after it.
        n_lead = 0
        while n_lead < len(ids) and offsets[n_lead][1] <= a and offsets[n_lead][0] < a:
            n_lead += 1
        n_trail = 0
        while n_trail < len(ids) - n_lead and offsets[len(ids) - 1 - n_trail][0] >= b:
            n_trail += 1
        body = frame.head + list(ids) + frame.tail
        # The template's own BOS (``{{ bos_token }}``) is kept, never doubled.
        bos = [] if body[: len(frame.bos)] == frame.bos else frame.bos
        start = len(bos) + len(frame.head) + n_lead
        suffix_len = n_trail + len(frame.tail)
        total = len(bos) + len(body)
        out.append(ChatEncoding(bos + body, suffix_len, start, total - suffix_len))
    return out


def encode_chat(tokenizer, prompt: str, system: str | None = None) -> ChatEncoding:
    """Encode a user prompt inside the chat template, BOS included.

    The ids equal those of ``apply_chat_template(..., tokenize=True,
    add_generation_prompt=True)`` for a template that inserts the message verbatim, with
    the tokenizer's own BOS (:func:`bos_prefix`) put in front when the template does not
    emit it, as HarmBench, Arditi et al. and R2D2 do by tokenizing with the defaults. The
    one exception is deliberate: special-token text inside the user's message (an embedded
    ``<|im_start|>system`` in a jailbreak) is tokenized as plain text, so it can never open
    a new turn.
    """
    return encode_chat_batch(tokenizer, [prompt], system)[0]


@dataclass(frozen=True)
class _ReplyFrame:
    """Template text around an assistant reply, within the reply's text segment."""

    before: str  # the generation prompt's text after its last special token
    gap: str  # what the template puts between the generation prompt and the reply
    end: str  # what it puts between the reply and the end-of-turn token


def _reply_frame(tokenizer) -> _ReplyFrame:
    probe = [{"role": "user", "content": _SENTINEL}]
    prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    try:
        convo = tokenizer.apply_chat_template(
            [*probe, {"role": "assistant", "content": _REPLY_SENTINEL}], tokenize=False
        )
    except Exception:  # a template may reject this conversation; then assume no gap
        convo = ""
    gap = end = ""
    # Llama-2's template puts a space before the reply and one before EOS; ChatML nothing.
    if convo.startswith(prompt) and _REPLY_SENTINEL in convo:
        gap, after = convo[len(prompt) :].split(_REPLY_SENTINEL, 1)
        eos = tokenizer.eos_token or ""
        end = after[: after.index(eos)] if eos and eos in after else ""
    tail = prompt.split(_SENTINEL)[-1]
    cut = max((stop for _, _, stop in _segment_ends(tokenizer, tail)[1]), default=0)
    return _ReplyFrame(before=tail[cut:], gap=gap, end=end)


def encode_response(tokenizer, response: str, eos: bool = True) -> list[int]:
    """Token ids of an assistant reply as they follow the chat prompt, then end-of-turn.

    ``encode_chat(prompt).ids + encode_response(reply)`` equals the ids of the rendered
    conversation: the reply is tokenized after the template text it follows (under
    SentencePiece, ``[/INST]I`` gives ``I`` where the reply alone would give ``▁I``), with
    the template's text around it (Llama-2: a space before the reply and one before EOS).
    Special-token text in the reply stays plain text. ``eos=False`` leaves out the
    end-of-turn token and the template text before it: for targets, and for answers cut at
    a token limit.
    """
    frame = _reply_frame(tokenizer)
    body = frame.gap + response + (frame.end if eos else "")
    ids = _reply_ids(tokenizer, frame.before, body)
    return ids + [tokenizer.eos_token_id] if eos else ids


def _reply_ids(tokenizer, context: str, body: str) -> list[int]:
    # The reply never starts the rendered text, hence never gets a 'first' '▁'.
    with _NotFirst(tokenizer, active=True):
        enc = tokenizer(
            context + body,
            add_special_tokens=False,
            split_special_tokens=True,
            return_offsets_mapping=True,
        )
    cut = len(context)
    pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    if any(start < cut < stop for _, (start, stop) in pairs):
        # The reply's first characters merge with the prompt's last ones: no split of the
        # joint ids gives a prompt and a reply, so the reply is encoded on its own.
        with _NotFirst(tokenizer, active=True):
            return tokenizer(body, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [tid for tid, (start, _) in pairs if start >= cut]


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so that the last (post-instruction) positions line up across a batch."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)
