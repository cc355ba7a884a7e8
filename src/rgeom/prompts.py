"""The prompt-set file: the Parquet table ``rgeom prepare-data`` writes, and how it is read.

Every stage that takes a prompt set reads it with :func:`read_prompt_set`, so a missing,
truncated or foreign file fails the same way everywhere, naming the set and the file.
Torch-free: the analysis environment's stages read prompt sets too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import check_columns, read_table
from rgeom.schemas import PROMPT_SCHEMA

CONTEXT_SEPARATOR = "\n\n---\n\n"


def prompt_text(text: str, context: str | None) -> str:
    """The user message for a prompt; HarmBench puts the context before the behaviour."""
    if context:
        return f"{context}{CONTEXT_SEPARATOR}{text}"
    return text


def user_messages(columns: Mapping[str, list[Any]]) -> list[str]:
    """The user message of every row of a prompt set's columns (``table.to_pydict()``);
    a table without a ``context`` column has none."""
    contexts = columns.get("context") or [None] * len(columns["text"])
    return [prompt_text(t, c) for t, c in zip(columns["text"], contexts, strict=True)]


def read_prompt_set(
    path: str | os.PathLike,
    key: str | None = None,
    required: Sequence[str] = tuple(PROMPT_SCHEMA.names),
) -> pa.Table:
    """A prompt set's whole table, checked before anyone reads a row.

    The file must exist, be readable Parquet, hold the row count it was written with, and
    have the ``required`` columns with their :data:`~rgeom.schemas.PROMPT_SCHEMA` types (by
    default all of them: a file ``prepare-data`` wrote). ``key``, the set's name in the
    config (``dir_harmful``), starts every error message when given.
    """
    try:
        table = read_table(path)
        check_columns(path, table, map(PROMPT_SCHEMA.field, required))
    except RgeomError as exc:
        if key is None:
            raise
        raise RgeomError(f"prompt set {key!r}: {exc}") from exc
    return table
