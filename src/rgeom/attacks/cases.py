"""Rows of the attack test-case table (TEST_CASE_SCHEMA), whichever method made them.

The lowest layer of :mod:`rgeom.attacks`: torch-free and importing no other attack module,
so that :mod:`rgeom.generation` can tell a test-case file from a prompt set without pulling
the attack methods (and through AutoDAN, generation itself) back in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from rgeom.schemas import TEST_CASE_SCHEMA

# The columns a user-supplied test-case file must have; the rest are filled in.
REQUIRED_COLUMNS = ("behavior_id", "method", "test_case", "source_model")


def case_row(
    behaviour: Mapping[str, Any], method: str, k: int, text: str, source: str, **extra: Any
) -> dict[str, Any]:
    """The ``k``-th test case of ``method`` for ``behaviour``: user message ``text``, built
    on ``source``; ``extra`` fills method-specific columns (template id, suffix, losses)."""
    return {
        "test_case_id": f"{method}/{behaviour['prompt_id']}/{k}",
        "behavior_id": behaviour["prompt_id"],
        "method": method,
        "test_case": text,
        "source_model": source,
        "behavior": behaviour["text"],
        "context": behaviour["context"],
        "category": behaviour["category"],
        "label": behaviour["label"],
        "target": behaviour.get("target"),
        **extra,
    }


def cases_table(cases: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Test-case rows as a TEST_CASE_SCHEMA table; a column a row lacks is null."""
    rows = [{name: c.get(name) for name in TEST_CASE_SCHEMA.names} for c in cases]
    return pa.Table.from_pylist(rows, schema=TEST_CASE_SCHEMA)


def is_test_case_table(table: pa.Table) -> bool:
    return "test_case" in table.column_names and "method" in table.column_names
