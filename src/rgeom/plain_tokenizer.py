"""A tokenizer read straight from ``tokenizer.json``, without torch or transformers.

prepare-data's length check only needs token counts; for a folder whose tokenizer is that
file alone, :func:`load_plain_tokenizer` gives the ids transformers would, at a fraction of
the import cost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rgeom.errors import RgeomError

#: tokenizer_config classes that are tokenizer.json alone: no class code rewrites the
#: backend's pre-tokenizer or post-processor, so the ``tokenizers`` library reads it exactly.
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
#: Config keys with which transformers edits the backend on load (BOS/EOS post-processing,
#: extra added tokens): a folder that sets any of them takes the transformers path.
_BACKEND_EDITS = ("add_bos_token", "add_eos_token", "added_tokens_decoder", "legacy")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token")


class PlainTokenizer:
    """The part of a transformers fast tokenizer that :func:`~rgeom.chat.encode_chat` uses, read
    from ``tokenizer.json`` with the ``tokenizers`` library: no torch or transformers import.

    Built by :func:`load_plain_tokenizer` only for folders whose tokenizer is that file
    alone, where its ids and offsets are the ones transformers returns
    (``tests/test_tokenization.py`` compares the two). The chat template is rendered with
    transformers' own renderer, which imports neither.
    """

    def __init__(self, backend, chat_template: str, special_tokens: dict[str, str]):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self._template = _compile_template(chat_template)
        self.special_tokens_map = special_tokens
        for name in SPECIAL_TOKEN_NAMES:
            setattr(self, name, special_tokens.get(name))
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.pad_token_id = backend.token_to_id(self.pad_token) if self.pad_token else None

    def apply_chat_template(
        self, messages, tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        if tokenize:
            raise RgeomError("PlainTokenizer renders templates as text only (tokenize=False)")
        return self._template.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend_tokenizer.get_added_tokens_decoder().items()}

    def __call__(
        self,
        text,
        add_special_tokens: bool = True,
        split_special_tokens: bool = False,
        return_offsets_mapping: bool = False,
    ) -> dict[str, list]:
        # As transformers' fast tokenizers do: one batch call, special-token text split
        # into plain text through the backend's own switch.
        backend = self.backend_tokenizer
        backend.encode_special_tokens = split_special_tokens
        batch = [text] if isinstance(text, str) else list(text)
        encs = backend.encode_batch(batch, add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out


def _compile_template(template: str):
    """The chat template in the sandboxed Jinja environment transformers renders it in
    (``transformers.utils.chat_template_utils``, whose import alone costs a second):
    same options, filter and globals, less its ``{% generation %}`` tag, which makes the
    template fail to compile here and the folder take the transformers path."""
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = jinja2.utils.Namespace
    return env.from_string(template)


def load_plain_tokenizer(path: str | os.PathLike) -> PlainTokenizer | None:
    """A :class:`PlainTokenizer` for a local model folder whose tokenizer is plain
    ``tokenizer.json`` with a chat template; None where only transformers can load it
    faithfully (then use :func:`rgeom.models.load_tokenizer`)."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES or any(
        key in config for key in _BACKEND_EDITS
    ):
        return None
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if not isinstance(template, str) or not template:
        return None
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        # Saved as a string, or as a serialised AddedToken.
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    if "eos_token" not in special:
        return None
    # load_tokenizer pads with EOS where the tokenizer names no pad token; same here.
    special.setdefault("pad_token", special["eos_token"])
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # an unreadable or newer-format file: transformers reports it better
        return None
    backend.no_truncation()
    backend.no_padding()
    import jinja2

    try:
        return PlainTokenizer(backend, template, special)
    except jinja2.TemplateError:
        return None
