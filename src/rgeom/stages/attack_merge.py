"""``rgeom attack-merge``: one method's chunk files merged into the table one job writes."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import stage_meta
from rgeom.stages.attack import parse_chunk

COMMAND = StageCommand(
    help="Merge one method's chunk files (rgeom attack with chunk [k, n] in --params, one "
    "job each) into the table a single job writes.",
    example="rgeom attack-merge --method GCG-transfer"
    " --parts results/attacks/GCG-transfer/*.parquet \\\n"
    "    --behaviors results/data/harmbench.parquet"
    " --out results/attacks/GCG-transfer.parquet",
    args=(
        arg("--method", required=True, help="the method the chunks ran"),
        arg("--parts", nargs="+", required=True, help="chunk Parquet files"),
        arg("--behaviors", required=True, help="behaviour set (prompt Parquet)"),
        arg("--out", required=True),
    ),
)


def _read_chunks(method: str, parts: list[str], order: dict[str, int], behaviors: str):
    """The chunk tables, checked: each a chunk of ``method``, every chunk 0..n-1 exactly
    once, and every behaviour in the behaviour file and in one chunk only."""
    seen: dict[int, str] = {}
    sizes = set()
    tables, owner = [], {}
    for part in parts:
        meta = read_meta(part)
        if meta.get("method") != method or "chunk" not in meta:
            raise RgeomError(f"{part}: not a {method} chunk (no chunk in its provenance)")
        k, n = parse_chunk(meta["chunk"])
        if k in seen:
            raise RgeomError(f"{part}: chunk {k} of {n} is also {seen[k]}")
        seen[k] = part
        sizes.add(n)
        table = read_table(part)
        for i, bid in enumerate(table.column("behavior_id").to_pylist()):
            if bid not in order:
                raise RgeomError(f"{part}: row {i}: behaviour {bid!r} is not in {behaviors}")
            if bid in owner:
                raise RgeomError(f"{part}: row {i}: behaviour {bid!r} is also in {owner[bid]}")
            owner[bid] = part
        tables.append(table)
    if len(sizes) != 1 or set(seen) != set(range(next(iter(sizes)))):
        raise RgeomError(
            f"{method} chunks {sorted(seen)} of {sorted(sizes)} are not one complete set 0..n-1"
        )
    return tables


def run(method: str, parts: list[str], behaviors: str, out: str, params: dict[str, Any]) -> None:
    """Merge the chunk files of one method (``rgeom attack`` with ``chunk`` [k, n] in
    ``--params``, one SLURM job each) into the table one unchunked job writes: rows in the
    behaviour file's order, provenance of the unchunked parameters. Every chunk 0..n-1 must
    be there exactly once, and no behaviour twice."""
    from rgeom.attacks.testcases import TEST_CASE_SCHEMA, read_behaviours

    order = {b["prompt_id"]: i for i, b in enumerate(read_behaviours(behaviors))}
    tables = _read_chunks(method, parts, order, behaviors)
    merged = pa.concat_tables(tables) if tables else TEST_CASE_SCHEMA.empty_table()
    rank = [order[b] for b in merged.column("behavior_id").to_pylist()]
    merged = merged.take(sorted(range(len(rank)), key=rank.__getitem__))
    first = read_meta(parts[0])
    record = {
        **{k: v for k, v in first.items() if k not in ("chunk", "config_hash", "num_rows")},
        **stage_meta(params, model=first.get("model")),
        "method": method,
        "parts": list(parts),
    }
    write_table(out, merged, TEST_CASE_SCHEMA, record)
