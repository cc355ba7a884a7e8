"""Residual-stream activations at the post-instruction positions, streamed to Parquet.

Following Arditi et al. (2024), the refusal direction is read off the residual stream at the
input of each decoder block (``resid_pre``) at the chat-template tokens that follow the
user's message. Forward pre-hooks copy only those positions, and the forward is cut short
after the last layer asked for, so neither the unused blocks nor the LM head ever run.

With ``refusal_scores`` on (``carrier.filter_prompts``), the same forward instead runs on
to the last-position logits, and each prompt's baseline refusal score goes in the
``refusal_score`` column, so that the direction stage can apply Arditi et al.'s prompt
filter without a model of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rgeom.config import schema_default, section_with_defaults
from rgeom.errors import RgeomError
from rgeom.io import Shards, TableWriter, file_sha256, files_fingerprint
from rgeom.kvcache import SharedPrefix, uncached_inputs
from rgeom.kvcache import padded_positions as padded_positions  # re-exported for importers
from rgeom.models import decoder_layers, encode_chat
from rgeom.schemas import ACTIVATION_SCHEMA as ACTIVATION_SCHEMA
from rgeom.schemas import activation_schema as _activation_schema
from rgeom.scoring import last_position_logits, refusal_score_from_logits, refusal_token_ids

log = logging.getLogger(__name__)

HOOK_POINT = "resid_pre"
STORAGE_DTYPES = {"float32": (pa.float32(), np.float32), "float16": (pa.float16(), np.float16)}
PROMPT_COLUMNS = ("prompt_id", "text", "label")
# Prompts per resumable shard: one forward each, so a shard is about a minute of CPU work
# on a 135M model, while the embedded direction sets fit one shard and skip the parts folder.
DEFAULT_SHARD_SIZE = schema_default("activations.shard_size")


def activation_schema(d_model: int, dtype: str = "float32") -> pa.Schema:
    """The full activation-table schema for a model of width ``d_model``."""
    if dtype not in STORAGE_DTYPES:
        raise RgeomError(
            f"activations.dtype: {dtype!r} is not one of {', '.join(sorted(STORAGE_DTYPES))}"
        )
    return _activation_schema(d_model, dtype)


def _prompt_text_fallback(text: str, context: str | None) -> str:
    return text if context is None else f"{context}\n\n---\n\n{text}"


try:  # rgeom.data owns the rule; the fallback is the same rule until that module lands.
    from rgeom.data import prompt_text
except ImportError:
    prompt_text = _prompt_text_fallback


def template_hash(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(vocab.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Prompt:
    prompt_id: str
    label: str
    split: str
    # A compact int32 array, not a list of Python ints: every prompt is held at once (for
    # the global length sort), and at 100,000 prompts lists would cost ~1 KiB each.
    ids: array
    suffix_len: int


def split_of(key: str) -> str:
    """``dir_harmful`` -> ``dir``: the role a prompt set plays, from its key."""
    return key.split("_", 1)[0]


def load_prompt_set(key: str, path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise RgeomError(f"prompt set {key!r}: file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"prompt set {key!r}: {path} is not a readable Parquet file") from exc
    missing = [c for c in PROMPT_COLUMNS if c not in table.column_names]
    if missing:
        raise RgeomError(f"prompt set {key!r}: {path} lacks column(s) {', '.join(missing)}")
    return table


def encode_sets(tokenizer, sets: Mapping[str, str | Path]) -> list[Prompt]:
    """Every prompt of every set, encoded through the chat template."""
    prompts = []
    for key, path in sets.items():
        table = load_prompt_set(key, path)
        columns = table.to_pydict()
        contexts = columns.get("context") or [None] * table.num_rows
        for row, (pid, text, label, ctx) in enumerate(
            zip(columns["prompt_id"], columns["text"], columns["label"], contexts, strict=True)
        ):
            if pid is None or text is None or label is None:
                raise RgeomError(
                    f"prompt set {key!r}: {path} row {row} has a null prompt_id, text or label"
                )
            enc = encode_chat(tokenizer, prompt_text(text, ctx))
            ids = array("i", enc.ids)
            prompts.append(Prompt(pid, label, split_of(key), ids, enc.suffix_len))
    return prompts


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int | str) or not layers:
        raise RgeomError(f"activations.layers must be null or a non-empty list, got {layers!r}")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
            raise RgeomError(
                f"activations.layers: layer {layer!r} is out of range; the model has "
                f"n_layers={n_layers} (valid 0..{n_layers - 1})"
            )
    return sorted(set(layers))


class _StopForward(Exception):
    """Raised from the last needed hook to skip the rest of the forward pass."""


class ResidCapture:
    """Pre-hooks that keep the last ``suffix_len`` positions of each chosen block's input.

    Use as a context manager around forward calls; ``run`` does one batch and returns
    ``{layer: tensor[batch, suffix_len, d_model]}`` (float32, on the CPU), stopping after
    the last chosen block; ``run_with_logits`` lets the same pass go on to the LM head and
    also returns the last-position logits ``[batch, vocab]`` (float32, on the CPU).
    """

    def __init__(self, model, layers: Sequence[int], suffix_len: int):
        self.model = model
        self.layers = list(layers)
        self.suffix_len = suffix_len
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = []
        self._stop = True

    def _hook(self, layer: int, last: bool):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            # Copy now: the slice would otherwise pin the whole batch activation in memory.
            tail = hidden[:, -self.suffix_len :, :].detach()
            self.captured[layer] = tail.to("cpu", torch.float32, copy=True)
            if last and self._stop:
                raise _StopForward

        return hook

    def __enter__(self) -> ResidCapture:
        blocks = decoder_layers(self.model)
        for layer in self.layers:
            self._handles.append(
                blocks[layer].register_forward_pre_hook(
                    self._hook(layer, layer == self.layers[-1]), with_kwargs=True
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(
        self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None, *, inputs=None
    ) -> dict[int, torch.Tensor]:
        """``inputs`` (forward keyword arguments, e.g. a :class:`~rgeom.kvcache.SharedPrefix`
        batch) replace the plain left-padded pass over ``ids``/``mask``."""
        self.captured = {}
        self._stop = True
        with contextlib.suppress(_StopForward):
            self.model(**(inputs or uncached_inputs(ids, mask)))
        return self._take()

    def run_with_logits(
        self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None, *, inputs=None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """As :meth:`run`, but the forward goes on to the logits at the last position only
        (``logits_to_keep=1``: the head over every position would cost far more)."""
        self.captured = {}
        self._stop = False
        try:
            logits = last_position_logits(self.model, inputs or uncached_inputs(ids, mask))
        finally:
            self._stop = True
        return self._take(), logits

    def _take(self) -> dict[int, torch.Tensor]:
        missing = [layer for layer in self.layers if layer not in self.captured]
        if missing:
            raise RuntimeError(f"hooks for layers {missing} never fired")
        out, self.captured = self.captured, {}
        return out


def _layer_table(
    batch: Sequence[Prompt],
    layer: int,
    acts: torch.Tensor,
    np_dtype,
    schema: pa.Schema,
    scores: np.ndarray | None = None,
) -> pa.Table:
    n, s, d = acts.shape
    values = acts.numpy().astype(np_dtype, copy=False).reshape(-1)
    vector = pa.FixedSizeListArray.from_arrays(pa.array(values), d)
    score = (
        pa.nulls(n * s, pa.float32())
        if scores is None
        else pa.array(np.repeat(np.asarray(scores, np.float32), s), pa.float32())
    )
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat([p.prompt_id for p in batch], s), pa.string()),
            pa.array(np.repeat([p.label for p in batch], s), pa.string()),
            pa.array(np.repeat([p.split for p in batch], s), pa.string()),
            pa.array(np.full(n * s, layer, np.int16)),
            pa.array(np.tile(np.arange(-s, 0, dtype=np.int16), n)),
            score,
            vector,
        ],
        schema=schema,
    )


@dataclass(frozen=True)
class _ExtractSettings:
    """The ``activations`` config section, its defaults filled in and checked."""

    batch_size: int
    shard_size: int
    dtype: str
    reuse_prefix: bool
    layers: list[int]


def _extract_settings(params: Mapping[str, Any] | None, n_layers: int) -> _ExtractSettings:
    params = section_with_defaults("activations", params)
    batch_size = int(params["batch_size"])
    if batch_size < 1:
        raise RgeomError(f"activations.batch_size must be >= 1, got {batch_size}")
    shard_size = int(params["shard_size"])
    if shard_size < 1:
        raise RgeomError(f"activations.shard_size must be >= 1, got {shard_size}")
    return _ExtractSettings(
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=params["dtype"],
        reuse_prefix=bool(params["reuse_prefix"]),
        layers=resolve_layers(params["layers"], n_layers),
    )


def _encode_all(tokenizer, sets: Mapping[str, str | Path]) -> tuple[list[Prompt], int]:
    """Every prompt of ``sets``, longest first, and the post-instruction length they share."""
    if not sets:
        raise RgeomError("extract: no prompt sets given")
    prompts = encode_sets(tokenizer, sets)
    if not prompts:
        raise RgeomError(f"extract: the prompt sets {', '.join(sets)} hold no prompts")
    suffix_lens = {p.suffix_len for p in prompts}
    if len(suffix_lens) != 1 or 0 in suffix_lens:
        # Rows are only comparable across prompts if position -k means the same template
        # token for all of them.
        raise RgeomError(f"chat template gives varying post-instruction lengths {suffix_lens}")
    # Longest first: similar lengths waste little padding, and an out-of-memory batch shows
    # up at the start rather than after an hour.
    prompts.sort(key=lambda p: -len(p.ids))
    return prompts, suffix_lens.pop()


@dataclass(frozen=True)
class _BatchWriter:
    """Runs batches of prompts through the capture and writes one table per layer."""

    model: Any
    capture: ResidCapture
    shared: SharedPrefix
    pad_id: int
    layers: list[int]
    np_dtype: Any
    schema: pa.Schema
    refusal_ids: list[int] | None

    def __call__(self, batches: Sequence[Sequence[Prompt]], writer: TableWriter) -> None:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="extract", unit="batch", file=sys.stderr):
            inputs = self.shared.inputs(self.model, [p.ids for p in batch], self.pad_id)
            scores = None
            if self.refusal_ids is None:
                acts = self.capture.run(inputs=inputs)
            else:
                # The score rides on the capture's own forward, run on to the logits rather
                # than stopped after the last captured block. That adds only the blocks above
                # it, the final norm and a one-position head; a separate scoring pass would
                # rerun every block below it as well.
                acts, logits = self.capture.run_with_logits(inputs=inputs)
                scores = refusal_score_from_logits(logits, self.refusal_ids).numpy()
            for layer in self.layers:
                table = _layer_table(batch, layer, acts[layer], self.np_dtype, self.schema, scores)
                writer.write(table)


def _batches(
    prompts: list[Prompt], batch_size: int, shard_size: int
) -> tuple[list[list[Prompt]], int]:
    """``prompts`` in batches, and how many batches make a shard of about ``shard_size``
    prompts. Whole batches per shard: each batch is the one an unsharded run would see, so
    the table does not depend on the shard size."""
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    return batches, max(1, -(-shard_size // batch_size))


def _write_shards(
    out: str | Path,
    schema: pa.Schema,
    record: dict,
    fingerprint: dict,
    groups: Sequence[Sequence[Sequence[Prompt]]],
    run: _BatchWriter,
) -> Shards:
    """Write each group of batches to its resumable shard, skipping the shards an earlier
    run with the same ``fingerprint`` finished."""
    shards = Shards(out, fingerprint, len(groups))
    for index, group in enumerate(groups):
        if shards.done(index):
            continue
        with TableWriter(shards.path(index), schema, {**record, "shard": index}) as writer:
            run(group, writer)
        shards.mark_done(index)
    return shards


def _merge_shards(out: str | Path, schema: pa.Schema, record: dict, shards: Shards, n: int) -> None:
    """Concatenate the ``n`` finished shards into ``out`` row group by row group: memory
    stays bounded by one (batch, layer) block, and the row groups are the ones an unsharded
    run writes."""
    with TableWriter(out, schema, record) as writer:
        for index in range(n):
            path = shards.path(index)
            try:
                part = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise RgeomError(f"{path} is not a readable Parquet file") from exc
            with part:
                if part.schema_arrow.remove_metadata() != schema.remove_metadata():
                    raise RgeomError(f"{path}: schema differs from the output's")
                for group in range(part.num_row_groups):
                    writer.write(part.read_row_group(group))
    shards.finish()


def extract_activations(
    model,
    tokenizer,
    sets: Mapping[str, str | Path],
    out: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    refusal_scores: bool = False,
) -> None:
    """Stream ``resid_pre`` activations at the post-instruction positions to ``out``.

    ``sets`` maps a role key such as ``dir_harmful`` to a prompt Parquet file; a row's split
    is the key's prefix (``dir``) and its label the prompt's own ``label``. Rows are written
    one (batch, layer) block at a time, so memory stays bounded by one batch.

    ``refusal_scores`` also stores each prompt's baseline refusal score in the
    ``refusal_score`` column (null otherwise), for the direction stage's prompt filter.
    """
    n_layers = len(decoder_layers(model))
    d_model = int(model.config.hidden_size)
    settings = _extract_settings(params, n_layers)
    schema = activation_schema(d_model, settings.dtype)
    prompts, suffix_len = _encode_all(tokenizer, sets)
    # The refusal tokens and the score are the carrier search's, so the filter decided from
    # these scores and the search agree.
    refusal_ids = refusal_token_ids(tokenizer) if refusal_scores else None
    record = dict(meta)
    record.update(
        d_model=d_model,
        n_layers=n_layers,
        layers=settings.layers,
        suffix_len=suffix_len,
        hook_point=HOOK_POINT,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        reuse_prefix=settings.reuse_prefix,
        n_prompts=len(prompts),
        template_hash=template_hash(tokenizer),
        tokenizer_hash=tokenizer_hash(tokenizer),
        prompt_sets={key: {"path": str(p), "sha256": file_sha256(p)} for key, p in sets.items()},
        # In the record, and so in the shard fingerprint below: shards written with and
        # without scores are never mixed.
        refusal_scores=bool(refusal_scores),
        refusal_token_ids=refusal_ids,
    )
    batches, per_shard = _batches(prompts, settings.batch_size, settings.shard_size)
    groups = [batches[i : i + per_shard] for i in range(0, len(batches), per_shard)]
    log.info(
        "extracting %d prompts x %d layers x %d positions in %d shard(s)",
        len(prompts),
        len(settings.layers),
        suffix_len,
        len(groups),
    )
    # Built before the capture hooks exist: they must not fire on the shared opening, whose
    # positions are never captured (keep=suffix_len leaves every captured one in the tails).
    with torch.inference_mode():
        shared = SharedPrefix.build(
            model, [p.ids for p in prompts], keep=suffix_len, enabled=settings.reuse_prefix
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with ResidCapture(model, settings.layers, suffix_len) as capture, torch.inference_mode():
        np_dtype = STORAGE_DTYPES[settings.dtype][1]
        run = _BatchWriter(
            model, capture, shared, pad_id, settings.layers, np_dtype, schema, refusal_ids
        )
        if len(groups) <= 1:
            Shards.discard(out)
            with TableWriter(out, schema, record) as writer:
                run(batches, writer)
            return
        fingerprint = {
            "stage": "extract",
            "record": record,
            "model": files_fingerprint(meta["model"]) if meta.get("model") else None,
            "prompts_per_shard": per_shard * settings.batch_size,
        }
        shards = _write_shards(out, schema, record, fingerprint, groups, run)
    _merge_shards(out, schema, record, shards, len(groups))
