"""benchmarks/compare_results.py: what counts as the same result before and after a change."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from compare_results import compare  # noqa: E402


def _write(root: Path, rel: str, table: pa.Table | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, bytes):
        path.write_bytes(table)
    else:
        pq.write_table(table, path)


def _runs(tmp_path, before, after):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, files in ((a, before), (b, after)):
        for rel, content in files.items():
            _write(root, rel, content)
    return a, b


def test_tables_compare_by_content_not_provenance(tmp_path):
    t = pa.table({"x": [1.0, float("nan")], "y": ["a", "b"]})
    a, b = _runs(
        tmp_path,
        {"sft/t.parquet": t.replace_schema_metadata({"rgeom": "run 1"})},
        {"sft/t.parquet": t.replace_schema_metadata({"rgeom": "run 2"})},
    )
    assert compare(a, b)["same"] == ["sft/t.parquet"]


def test_a_changed_value_a_missing_file_and_an_extra_file_are_reported(tmp_path):
    a, b = _runs(
        tmp_path,
        {"t.parquet": pa.table({"x": [1.0, 2.0]}), "gone.md": b"x"},
        {"t.parquet": pa.table({"x": [1.0, 2.5]}), "new.md": b"x"},
    )
    verdict = compare(a, b)
    assert verdict["different"] == ["t.parquet"]
    assert verdict["only before"] == ["gone.md"] and verdict["only after"] == ["new.md"]


def test_run_records_skips_and_dropped_columns_are_left_out(tmp_path):
    a, b = _runs(
        tmp_path,
        {"logs/x.log": b"1", "sft/train_state/r.json": b"1", "l.parquet": pa.table({"s": [1.0]})},
        {"logs/x.log": b"2", "sft/train_state/r.json": b"2", "l.parquet": pa.table({"s": [2.0]})},
    )
    assert compare(a, b, skip=("sft/train_state",))["different"] == ["l.parquet"]
    assert compare(a, b, skip=("sft/train_state",), drop=("s",))["different"] == []


def test_svgs_compare_up_to_matplotlibs_generated_ids(tmp_path):
    svg = '<path id="{}"/><use xlink:href="#{}"/><image id="image{}"/>'
    one = svg.format("p0123456789", "m0123456789", "0123456789").encode()
    two = svg.format("pabcdefabcd", "mabcdefabcd", "abcdefabcd").encode()
    other = svg.format("pabcdefabcd", "mabcdefabcd", "abcdefabcd").replace("use", "usE").encode()
    a, b = _runs(tmp_path, {"f.svg": one, "g.svg": one}, {"f.svg": two, "g.svg": other})
    verdict = compare(a, b)
    assert verdict["same"] == ["f.svg"] and verdict["different"] == ["g.svg"]
