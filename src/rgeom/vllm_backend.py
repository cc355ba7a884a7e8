"""Optional vLLM generation backend (``generate.backend: vllm``), for paper-scale GPU runs.

It writes exactly what the Hugging Face path (:func:`rgeom.generation.generate_table`)
writes, :data:`~rgeom.generation.GENERATION_SCHEMA`, from the same inputs:

* prompts are rendered by rgeom's :func:`~rgeom.models.encode_chat` (the model's chat
  template, user text tokenized with ``split_special_tokens``) and handed to vLLM as token
  ids, so both backends see the same ids, never vLLM's own rendering;
* sampling is greedy (``temperature=0``) with the same ``generate.max_new_tokens``;
* a completion ends at the tokenizer's EOS, is decoded with ``skip_special_tokens`` and
  stripped, as in the Hugging Face path.

vLLM is imported only inside :func:`generate_table`, which ``rgeom.stages.generate`` calls
only when the backend is ``vllm``: with the default ``hf`` backend it is never imported, and
CPU-only installs need not have it. vLLM schedules its own batches, so
``generate.batch_size`` and ``generate.shard_size`` do not apply (a killed vLLM job reruns
the whole cell, minutes on a GPU).

Greedy outputs can still differ from the Hugging Face path in rare near-ties: the kernels
sum in another order (and vLLM may stop at extra EOS ids of the model's generation config).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from rgeom.config import section_with_defaults
from rgeom.errors import RgeomError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install -e '.[vllm]' (the vllm extra; a CUDA machine is needed), "
    "or set generate.backend: hf"
)


def import_vllm():
    """The vllm module, or one clear error when it is not installed."""
    try:
        import vllm
    except ImportError as exc:
        raise RgeomError(
            f"generate.backend is 'vllm' but vLLM cannot be imported ({exc}); {INSTALL_HINT}"
        ) from None
    return vllm


def vllm_completions(
    llm, sampling_params, tokenizer, encoded: list[list[int]]
) -> tuple[list[str], list[int]]:
    """Greedy completions of chat-encoded prompts in input order: (texts, new-token counts)."""
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling_params)
    if len(outputs) != len(encoded):
        raise RgeomError(f"vLLM returned {len(outputs)} completions for {len(encoded)} prompts")
    eos = tokenizer.eos_token_id
    texts, n_new = [], []
    for out in outputs:
        seq = list(out.outputs[0].token_ids)
        if eos in seq:
            seq = seq[: seq.index(eos)]
        n_new.append(len(seq))
        texts.append(tokenizer.decode(seq, skip_special_tokens=True).strip())
    return texts, n_new


def generate_table(
    model_dir: str,
    prompts: str,
    out: str,
    params: dict[str, Any],
    model_settings: dict[str, Any],
    seed: int,
    meta: dict[str, Any],
) -> pa.Table:
    """The generate stage on vLLM: same inputs, same output schema as the HF path."""
    from rgeom.generation import GENERATION_SCHEMA, completions_table, read_inputs
    from rgeom.io import write_table
    from rgeom.models import encode_chat, load_tokenizer

    vllm = import_vllm()
    # Filled for reading only: the table's metadata records the caller's ``params``.
    settings = section_with_defaults("generate", params)
    model_cfg = section_with_defaults("model", model_settings)
    trust = bool(model_cfg["trust_remote_code"])
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust)
    cols = read_inputs(prompts)
    messages = cols["prompt"]
    encoded = [encode_chat(tokenizer, p).ids for p in messages]
    max_new_tokens = int(settings["max_new_tokens"])
    options = dict(settings["vllm"] or {})
    llm = vllm.LLM(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=model_cfg["dtype"],
        seed=int(seed),
        trust_remote_code=trust,
        **options,
    )
    sampling = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    texts, n_new = vllm_completions(llm, sampling, tokenizer, encoded)
    n = len(messages)
    table = completions_table(cols, messages, encoded, texts, n_new, meta)
    record = {**meta, "prompts": prompts, **params, "backend": "vllm"}
    record["vllm_version"] = getattr(vllm, "__version__", None)
    write_table(out, table, GENERATION_SCHEMA, record)
    log.info("wrote %d completions (vLLM) to %s", n, out)
    return table
