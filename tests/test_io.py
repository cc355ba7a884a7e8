"""Atomic writers and validating readers."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgeom.errors import RgeomError
from rgeom.io import (
    TableWriter,
    atomic_path,
    config_hash,
    read_meta,
    read_table,
    write_json,
    write_table,
)

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


def _fail_with(errno_code):
    def fail(*args, **kwargs):
        raise OSError(errno_code, os.strerror(errno_code))

    return fail


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.ENOSPC, "disk full while writing"), (errno.EACCES, "permission denied writing")],
)
def test_write_errors_name_the_path_and_leave_nothing(tmp_path, monkeypatch, code, message):
    """Disk full or no permission at write time: one RgeomError naming the destination."""
    table = pa.table({"a": [1], "b": ["x"]})
    out = tmp_path / "t.parquet"
    with monkeypatch.context() as m:
        m.setattr(pq, "write_table", _fail_with(code))
        with pytest.raises(RgeomError, match=f"{message} .*t\\.parquet"):
            write_table(out, table, SCHEMA, {})
    with monkeypatch.context() as m:
        m.setattr(pq.ParquetWriter, "write_table", _fail_with(code))
        with (
            pytest.raises(RgeomError, match=f"{message} .*t\\.parquet"),
            TableWriter(out, SCHEMA, {}) as writer,
        ):
            writer.write(table)
    with monkeypatch.context() as m:
        m.setattr(pq.ParquetWriter, "close", _fail_with(code))
        with (
            pytest.raises(RgeomError, match=f"{message} .*t\\.parquet"),
            TableWriter(out, SCHEMA, {}) as writer,
        ):
            writer.write(table)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _fail_with(code))
        with pytest.raises(RgeomError, match=f"{message} .*j\\.json"):
            write_json(tmp_path / "j.json", {"k": 1})
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", _fail_with(code))
        with pytest.raises(RgeomError, match=f"{message} .*t\\.parquet"):
            write_table(out, table, SCHEMA, {})
    assert os.listdir(tmp_path) == []


def test_a_real_full_disk_is_one_clear_error(tmp_path):
    """A 64 KiB tmpfs filled by a real write (needs mount rights; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        big = pa.table({"a": list(range(200_000)), "b": [str(i) for i in range(200_000)]})
        with pytest.raises(RgeomError, match=r"disk full while writing .*big\.parquet"):
            write_table(mnt / "big.parquet", big, SCHEMA, {})
        with (
            pytest.raises(RgeomError, match=r"disk full while writing .*big\.parquet"),
            TableWriter(mnt / "big.parquet", SCHEMA, {}) as writer,
        ):
            writer.write(big)
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_folder_is_one_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(RgeomError, match=r"permission denied writing .*ro/t\.parquet"):
            write_table(folder / "t.parquet", pa.table({"a": [1], "b": ["x"]}), SCHEMA, {})
    finally:
        folder.chmod(0o700)
