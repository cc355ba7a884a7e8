"""Atomic writers and validating readers."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgeom.errors import RgeomError
from rgeom.io import TableWriter, atomic_path, config_hash, read_meta, read_table, write_table

SCHEMA = pa.schema([("a", pa.int32()), ("b", pa.string())])


def test_write_table_round_trip_with_provenance(tmp_path):
    out = tmp_path / "t.parquet"
    write_table(out, pa.table({"b": ["x", "y"], "a": [1, 2]}), SCHEMA, {"model": "m"})
    table = read_table(out, SCHEMA)
    assert table.column_names == ["a", "b"]
    meta = read_meta(out)
    assert meta["model"] == "m"
    assert meta["num_rows"] == 2
    assert "torch" in meta["packages"]
    assert meta["rgeom_version"]


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_schema_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(RgeomError, match="does not match its schema"):
        write_table(tmp_path / "t.parquet", pa.table({"a": [1]}), SCHEMA, {})
    assert not (tmp_path / "t.parquet").exists()


def test_reader_rejects_truncated_and_wrong_files(tmp_path):
    out = tmp_path / "t.parquet"
    write_table(out, pa.table({"a": [1, 2], "b": ["x", "y"]}), SCHEMA, {})
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(RgeomError, match="truncated or corrupt"):
        read_table(out)
    other = tmp_path / "o.parquet"
    write_table(other, pa.table({"a": [1], "b": ["x"]}), SCHEMA, {})
    with pytest.raises(RgeomError, match="missing column 'c'"):
        read_table(other, pa.schema([("c", pa.int32())]))
    with pytest.raises(RgeomError, match="missing file"):
        read_table(tmp_path / "nope.parquet")


def test_table_writer_streams_and_counts(tmp_path):
    out = tmp_path / "s.parquet"
    with TableWriter(out, SCHEMA, {"k": 1}) as writer:
        for i in range(3):
            assert not out.exists()
            writer.write(pa.table({"a": [i, i], "b": ["u", "v"]}))
    assert pq.ParquetFile(out).num_row_groups == 3
    assert read_meta(out)["num_rows"] == 6
    assert read_table(out, SCHEMA).num_rows == 6


def test_table_writer_aborts_cleanly(tmp_path):
    out = tmp_path / "s.parquet"
    with pytest.raises(ValueError), TableWriter(out, SCHEMA, {}) as writer:
        writer.write(pa.table({"a": [1], "b": ["u"]}))
        raise ValueError("preempted")
    assert os.listdir(tmp_path) == []


def test_unwritable_destination_names_the_path(tmp_path):
    # A regular file where a folder should be fails even for root, unlike chmod.
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    with pytest.raises(RgeomError, match="results"):
        write_table(blocker / "t.parquet", pa.table({"a": [1], "b": ["x"]}), SCHEMA, {})


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
