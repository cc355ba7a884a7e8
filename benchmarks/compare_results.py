"""Are two runs' results the same? Tables by content, every other file by bytes.

    python benchmarks/compare_results.py BEFORE/results AFTER/results

For a refactor that must not change a number (issue 19): run the same config at two
commits, then compare. A Parquet table is compared by its columns, types and rows; its
metadata (provenance: package versions, times, config hash) is left out. Other files
(JSON, Markdown, CSV, figures) must be byte-identical, SVGs up to matplotlib's generated
ids, except the ones that record when or where a job ran: the job logs and benchmark
timings, and the files named in ``--skip`` (training's own timing records, for example).
Exit status 0 when everything compared is the same, 1 if not.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: Folders whose files record when and how long jobs ran, never a result.
RUN_RECORDS = ("logs", "benchmarks", "staging")


def files(root: Path, skip: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.split("/")[0] in RUN_RECORDS or rel.startswith(skip):
            continue
        out[rel] = path
    return out


def table_bytes(path: Path, drop: tuple[str, ...] = ()) -> bytes:
    """The table as an Arrow IPC stream without its metadata: equal bytes mean equal
    columns, types and values bit for bit (NaN included, which ``Table.equals`` would call
    unequal to itself)."""
    table = pq.read_table(path)
    table = table.replace_schema_metadata(None)
    table = table.drop_columns([c for c in drop if c in table.column_names])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def same_table(a: Path, b: Path, drop: tuple[str, ...] = ()) -> bool:
    return table_bytes(a, drop) == table_bytes(b, drop)


#: The ids matplotlib gives an SVG's clip paths, markers, hatches and images: random per save unless
#: ``svg.hashsalt`` is set (rgeom.plotstyle sets it since issue 19; older runs differ there).
SVG_IDS = re.compile(rb"\b(?:[hmp]|image)[0-9a-f]{10}\b")


def same_file(a: Path, b: Path, drop: tuple[str, ...] = ()) -> bool:
    if a.suffix == ".parquet":
        return same_table(a, b, drop)
    if a.suffix == ".svg":
        return SVG_IDS.sub(b"ID", a.read_bytes()) == SVG_IDS.sub(b"ID", b.read_bytes())
    return a.read_bytes() == b.read_bytes()


def compare(
    before: Path, after: Path, skip: tuple[str, ...] = (), drop: tuple[str, ...] = ()
) -> dict[str, list[str]]:
    a, b = files(before, skip), files(after, skip)
    verdict: dict[str, list[str]] = {
        "same": [],
        "different": [],
        "only before": [],
        "only after": [],
    }
    verdict["only before"] = sorted(set(a) - set(b))
    verdict["only after"] = sorted(set(b) - set(a))
    for rel in sorted(set(a) & set(b)):
        verdict["same" if same_file(a[rel], b[rel], drop) else "different"].append(rel)
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--skip", action="append", default=[], help="path prefix to leave out")
    parser.add_argument(
        "--drop-column",
        action="append",
        default=[],
        help="column left out of every table (a timing: train_log's seconds), repeatable",
    )
    args = parser.parse_args(argv)
    verdict = compare(args.before, args.after, tuple(args.skip), tuple(args.drop_column))
    tables = sum(r.endswith(".parquet") for r in verdict["same"])
    print(f"same: {len(verdict['same'])} files ({tables} tables by content)")
    for kind in ("different", "only before", "only after"):
        print(f"{kind}: {len(verdict[kind])}")
        for rel in verdict[kind]:
            print(f"  {rel}")
    return 0 if not any(verdict[k] for k in ("different", "only before", "only after")) else 1


if __name__ == "__main__":
    sys.exit(main())
