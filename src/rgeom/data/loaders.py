"""Read prompt sets from upstream benchmark files, the built-in suite or the hub.

Every loader turns its source into rows of :data:`PROMPT_SCHEMA`; one validation pass then
checks them all the same way, so a bad file fails with a single :class:`RgeomError` that
names the file and the row, and nothing is written. The readers of each format live in
:mod:`rgeom.data.formats` and :mod:`rgeom.data.multiple_choice`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

# The noqa'd imports also re-export MESSAGES_FIELD, mc_prompt, CONTEXT_SEPARATOR and
# read_prompts (rgeom.prompts.read_prompt_set), which importers take from here.
from rgeom.chat import encode_chat_batch
from rgeom.data.formats import (  # noqa: F401
    FILE_READERS,
    MESSAGES_FIELD,
    Loaded,
    count_harmbench_copyright,
    file_split,
    read_hub,
    read_jsonl,
    resolve_path,
)
from rgeom.data.multiple_choice import mc_prompt, read_arc, read_mmlu  # noqa: F401
from rgeom.errors import RgeomError
from rgeom.io import file_sha256, write_table
from rgeom.prompts import CONTEXT_SEPARATOR, prompt_text  # noqa: F401
from rgeom.prompts import read_prompt_set as read_prompts  # noqa: F401
from rgeom.schemas import CHAT_PROMPT_SCHEMA, PROMPT_SCHEMA

# "utility" is accepted because the config schema allows it as a label override.
LABELS = ("harmful", "harmless", "safe", "contrast", "utility")
HARMBENCH_CATEGORIES = (
    "chemical_biological",
    "illegal",
    "misinformation_disinformation",
    "harmful",
    "harassment_bullying",
    "cybercrime_intrusion",
)
BUILTIN_PIECES = ("harmful", "harmless", "xstest", "utility")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
# Splits kept in a file of their own, ``{piece}_{split}.jsonl``, read only when a set asks
# for that split. A piece read without a split (the spec default, builtin_corpus) stays the
# suite that existing configs, R2D2 targets and their caches were built on; the direction
# prompts carry no targets and exist only to make difference-in-means estimates less noisy.
BUILTIN_OPT_IN_SPLITS = {"harmful": ("direction",), "harmless": ("direction",)}
FORMATS = (
    "builtin",
    "harmbench_csv",
    "strongreject_csv",
    "xstest_csv",
    "jbb_csv",
    "advbench_csv",
    "arditi_json",
    "jsonl",
    "hf",
    "mmlu_hf",
    "arc_hf",
)
# Multiple-choice utility benchmarks read through ``datasets`` (hub id or a local file in
# the hub's own format): cais/mmlu and allenai/ai2_arc.
MC_FORMATS = ("mmlu_hf", "arc_hf")
# Mirrors definitions.dataset in config.schema.yaml, for specs that bypassed validation.
SPEC_DEFAULTS: dict[str, Any] = {
    "format": "builtin",
    "path": "harmful",
    "split": None,
    "label": None,
    "limit": None,
    "offset": 0,
    "contextual": True,
    "copyright": False,
    "hf_split": "train",
    "text_field": "prompt",
    "hf_config": None,
}


def _fill_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    filled = dict(SPEC_DEFAULTS)
    filled.update(spec or {})
    for key, default in SPEC_DEFAULTS.items():
        if filled[key] is None:
            filled[key] = default
    if filled["format"] not in FORMATS:
        raise RgeomError(
            f"dataset format {filled['format']!r} is unknown; expected one of {', '.join(FORMATS)}"
        )
    limit = filled["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RgeomError(f"dataset limit must be a positive integer or null, got {limit!r}")
    offset = filled["offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise RgeomError(f"dataset offset must be an integer >= 0, got {offset!r}")
    if filled["label"] is not None and filled["label"] not in LABELS:
        raise RgeomError(
            f"dataset label {filled['label']!r} is unknown; expected one of {', '.join(LABELS)}"
        )
    return filled


def copyright_left_out(spec: Mapping[str, Any] | None, shared_dir: str | os.PathLike) -> int:
    """How many copyright behaviours (HarmBench's ``hash_check`` rows) a HarmBench CSV set
    with ``copyright: false`` leaves out, counted over the whole file; 0 for other sets.
    The judge stage reports them in ``n_copyright_excluded``: HarmBench scores them by
    hashing, not with its classifier, so rgeom leaves them out of the ASR and says so."""
    filled = _fill_spec(spec)
    if filled["format"] != "harmbench_csv" or filled["copyright"]:
        return 0
    return count_harmbench_copyright(resolve_path(filled["path"], shared_dir))


def _builtin(spec: dict[str, Any]) -> Loaded:
    piece = spec["path"]
    if piece not in BUILTIN_PIECES:
        raise RgeomError(
            f"unknown builtin piece {piece!r}; expected one of {', '.join(BUILTIN_PIECES)}"
        )
    split = spec.get("split")
    if split in BUILTIN_OPT_IN_SPLITS.get(piece, ()):
        path = BUILTIN_DIR / f"{piece}_{split}.jsonl"
    else:
        path = BUILTIN_DIR / f"{piece}.jsonl"
    rows = read_jsonl(path, {"text_field": "text"})
    return Loaded(rows=rows, origin=str(path), sha256=None)


def _subsample(
    rows: list[dict[str, Any]], limit: int | None, seed: int, offset: int = 0
) -> list[dict[str, Any]]:
    """Keep ``limit`` rows chosen by a seeded hash of each id, in their original order,
    after skipping the first ``offset`` of that seeded order: two sets of one file with
    offsets 0 / limit 128 and offset 128 / limit 32 are disjoint by construction.

    Hashing ids rather than drawing positions keeps a row's fate independent of the file's
    order and of Python's RNG implementation, so a seed picks the same prompts everywhere.
    """
    if offset == 0 and (limit is None or limit >= len(rows)):
        return rows

    def rank(row: dict[str, Any]) -> bytes:
        return hashlib.sha256(f"{seed}\0{row['prompt_id']}".encode()).digest()

    end = None if limit is None else offset + limit
    keep = {r["prompt_id"] for r in sorted(rows, key=rank)[offset:end]}
    return [r for r in rows if r["prompt_id"] in keep]


def _validate(loaded: Loaded) -> None:
    seen: dict[str, str] = {}
    for r in loaded.rows:
        where = r["_where"]
        if not isinstance(r["text"], str):
            raise RgeomError(f"{loaded.origin}: {where} has a prompt that is not text")
        if not r["text"].strip():
            raise RgeomError(f"{loaded.origin}: {where} ({r['prompt_id']!r}) has an empty prompt")
        if not r["prompt_id"]:
            raise RgeomError(f"{loaded.origin}: {where} has an empty prompt id")
        if r["prompt_id"] in seen:
            raise RgeomError(
                f"{loaded.origin}: duplicate prompt id {r['prompt_id']!r} "
                f"at {where} (first at {seen[r['prompt_id']]})"
            )
        seen[r["prompt_id"]] = where
        if r["label"] not in LABELS:
            raise RgeomError(
                f"{loaded.origin}: {where} ({r['prompt_id']!r}) has label {r['label']!r}; "
                f"expected one of {', '.join(LABELS)} (or set the set's label)"
            )


def _load(spec: Mapping[str, Any] | None, shared_dir: str | os.PathLike, seed: int) -> Loaded:
    spec = _fill_spec(spec)
    fmt = spec["format"]
    if fmt == "builtin":
        loaded = _builtin(spec)
        source = f"builtin:{spec['path']}"
    elif fmt == "hf":
        loaded = read_hub(spec)
        source = f"hf:{spec['path']}"
    elif fmt in MC_FORMATS:
        loaded = read_mmlu(spec, shared_dir) if fmt == "mmlu_hf" else read_arc(spec, shared_dir)
        source = f"{fmt}:{spec['path']}"
    else:
        path = resolve_path(spec["path"], shared_dir)
        rows = FILE_READERS[fmt](path, spec)
        # Hash after parsing: a missing or unreadable file has already been reported.
        loaded = Loaded(rows=rows, origin=str(path), sha256=file_sha256(path))
        source = f"{fmt}:{path.name}"
        default_split = spec["split"] or file_split(path) or "test"
        for r in loaded.rows:
            r["split"] = spec["split"] or r["split"] or default_split
    for r in loaded.rows:
        r["source"] = source
        if spec["label"] is not None:
            r["label"] = spec["label"]
    _validate(loaded)
    if fmt in ("builtin", "hf", *MC_FORMATS):
        for r in loaded.rows:
            r["split"] = r["split"] or "test"
        if spec["split"] is not None:
            loaded.rows = [r for r in loaded.rows if r["split"] == spec["split"]]
    loaded.source_rows = len(loaded.rows)
    if not loaded.rows:
        raise RgeomError(f"{loaded.origin}: no prompts left after filtering by {_describe(spec)}")
    loaded.rows = _subsample(loaded.rows, spec["limit"], seed, spec["offset"])
    if not loaded.rows:
        raise RgeomError(
            f"{loaded.origin}: offset {spec['offset']} skips all {loaded.source_rows} prompts"
        )
    return loaded


def _describe(spec: dict[str, Any]) -> str:
    keys = ("split", "contextual", "copyright")
    return ", ".join(f"{k}={spec[k]!r}" for k in keys)


def _schema(rows: list[dict[str, Any]]) -> pa.Schema:
    return CHAT_PROMPT_SCHEMA if any(r.get("messages") for r in rows) else PROMPT_SCHEMA


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = _schema(rows)
    return pa.Table.from_pylist(
        [{name: r[name] for name in schema.names} for r in rows], schema=schema
    )


def load_set(spec: Mapping[str, Any] | None, shared_dir: str | os.PathLike, seed: int) -> pa.Table:
    """Load, normalise, validate and subsample one prompt set (see :func:`prepare_set`)."""
    return _table(_load(spec, shared_dir, seed).rows)


def _check_lengths(loaded: Loaded, tokenizer, max_prompt_tokens: int) -> None:
    encoded = encode_chat_batch(
        tokenizer, [prompt_text(r["text"], r["context"]) for r in loaded.rows]
    )
    for r, enc in zip(loaded.rows, encoded, strict=True):
        n = len(enc.ids)
        if n > max_prompt_tokens:
            raise RgeomError(
                f"{loaded.origin}: {r['_where']} ({r['prompt_id']!r}) is {n} tokens in the "
                f"chat template, over data.max_prompt_tokens = {max_prompt_tokens}"
            )


def prepare_set(
    name: str,
    spec: Mapping[str, Any] | None,
    shared_dir: str | os.PathLike,
    seed: int,
    out: str | os.PathLike,
    meta: Mapping[str, Any],
    tokenizer=None,
    max_prompt_tokens: int = 2048,
) -> None:
    """Write prompt set ``name`` to ``out`` (Parquet, :data:`PROMPT_SCHEMA`) with provenance.

    With a tokenizer, a prompt whose chat-templated encoding exceeds ``max_prompt_tokens``
    is an error rather than a silent truncation, which would change what is being measured.
    """
    filled = _fill_spec(spec)
    loaded = _load(filled, shared_dir, seed)
    if tokenizer is not None:
        _check_lengths(loaded, tokenizer, max_prompt_tokens)
    record = dict(meta) | {
        "dataset": name,
        "dataset_sha256": loaded.sha256,
        "dataset_spec": filled,
        "dataset_source_rows": loaded.source_rows,
        "dataset_copyright_left_out": copyright_left_out(filled, shared_dir),
    }
    write_table(out, _table(loaded.rows), _schema(loaded.rows), record)


@lru_cache(maxsize=1)
def _builtin_texts() -> tuple[str, ...]:
    return tuple(r["text"] for piece in BUILTIN_PIECES for r in _builtin({"path": piece}).rows)


def builtin_corpus() -> list[str]:
    """Every prompt text of the built-in suite, piece by piece in file order (the opt-in
    splits of :data:`BUILTIN_OPT_IN_SPLITS` apart)."""
    return list(_builtin_texts())
