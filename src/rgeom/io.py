"""Atomic writers and validating readers for every artefact rgeom produces.

Every file is written to a temporary name in its destination directory and then
``os.replace``d, so a killed job never leaves a finished-looking half file. Parquet tables
carry provenance (config hash, model, checkpoint, package versions, ...) and their own row
count in the schema metadata; readers check both.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rgeom import __version__
from rgeom.errors import RgeomError

log = logging.getLogger(__name__)

PROVENANCE_KEY = b"rgeom"
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "deepspeed",
    "pyarrow",
    "polars",
    "numpy",
    "scipy",
    "tokenizers",
)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(params: Mapping[str, Any]) -> str:
    """Hash of the parameters a stage consumed (not the whole config), so a hash changes
    exactly when the stage's output could."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def provenance(**fields: Any) -> dict[str, Any]:
    """The provenance record stored with every table: caller fields plus versions."""
    record = {
        "rgeom_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
    }
    record.update({k: v for k, v in fields.items() if v is not None})
    return record


# -- fault injection ------------------------------------------------------------------------
FAULT_ENV = "RGEOM_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str, label: str | os.PathLike = "") -> None:
    """Test hook: SIGKILL this process at a named point, as a preemption would.

    ``RGEOM_FAULT=name[@N][:text]`` kills on the N-th time (default the first) ``name`` is
    reached with a ``label`` (usually the path being written) ending in ``text``. Counting
    hits instead of sampling a clock keeps fault tests reproducible. Points: ``replace``
    (a finished temporary file or folder, just before its rename), ``parquet_write`` (a
    streamed Parquet file after a batch, mid-file) and ``shard`` (a resumable stage right
    after a shard is recorded). Unset, a point costs one environment lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    head, _, text = spec.partition(":")
    point, _, count = head.partition("@")
    if point != name or not str(label).endswith(text):
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _raise_os_error(exc: OSError, path: Path) -> None:
    if exc.errno == errno.ENOSPC:
        raise RgeomError(f"disk full while writing {path}") from exc
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise RgeomError(f"permission denied writing {path}") from exc
    raise RgeomError(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        _raise_os_error(exc, path)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; finished files get the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        fault_point("replace", path)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        _raise_os_error(exc, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        _raise_os_error(exc, path)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        fault_point("replace", path)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_os_error(exc, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _with_metadata(schema: pa.Schema, meta: Mapping[str, Any], num_rows: int | None) -> pa.Schema:
    # Versions and commit are always recorded, whatever the caller passed.
    record = {**provenance(), **meta}
    if num_rows is not None:
        record["num_rows"] = num_rows
    existing = dict(schema.metadata or {})
    existing[PROVENANCE_KEY] = canonical_json(record).encode()
    return schema.with_metadata(existing)


def write_table(
    path: str | os.PathLike,
    table: pa.Table,
    schema: pa.Schema,
    meta: Mapping[str, Any],
    row_group_size: int | None = None,
) -> None:
    """Write ``table`` cast to ``schema`` with provenance ``meta``, atomically."""
    try:
        table = table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise RgeomError(f"table for {path} does not match its schema: {exc}") from exc
    table = table.replace_schema_metadata(_with_metadata(schema, meta, table.num_rows).metadata)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


class TableWriter:
    """Streams record batches into one Parquet file, atomically.

    The row count is only known at the end, so it is stored in a sidecar field of the
    footer metadata written on close; a file that was never closed never gets renamed.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, meta: Mapping[str, Any]):
        self.path = Path(path)
        self.schema = schema
        self.meta = dict(meta)
        self.rows = 0
        self._ctx = atomic_path(self.path, suffix=".parquet")
        self._tmp = self._ctx.__enter__()
        try:
            # The row count is not known yet; readers check the count stored at close.
            self._writer = pq.ParquetWriter(self._tmp, _with_metadata(schema, self.meta, None))
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        """A write error (disk full, permissions) becomes one message naming the output."""
        self.abort(exc)
        _raise_os_error(exc, self.path)

    def write(self, batch: pa.Table | pa.RecordBatch) -> None:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = batch.select(self.schema.names).cast(self.schema)
        try:
            self._writer.write_table(batch)
        except OSError as exc:
            self._fail(exc)
        self.rows += batch.num_rows
        fault_point("parquet_write", self.path)

    def close(self) -> None:
        try:
            self._writer.add_key_value_metadata({"rgeom_num_rows": str(self.rows)})
            self._writer.close()
        except OSError as exc:
            self._fail(exc)
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        if self._ctx is None:
            return
        ctx, self._ctx = self._ctx, None
        with contextlib.suppress(BaseException):
            ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of a table written by rgeom."""
    path = Path(path)
    if not path.exists():
        raise RgeomError(f"missing file: {path}")
    try:
        md = pq.read_metadata(path).metadata or {}
        schema_md = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{path} is not a readable Parquet file (truncated or corrupt?)") from exc
    raw = schema_md.get(PROVENANCE_KEY) or md.get(PROVENANCE_KEY)
    meta = json.loads(raw) if raw else {}
    if "num_rows" not in meta and b"rgeom_num_rows" in md:
        meta["num_rows"] = int(md[b"rgeom_num_rows"])
    return meta


def read_table(
    path: str | os.PathLike, schema: pa.Schema | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read a table written by :func:`write_table`, checking schema and row count."""
    path = Path(path)
    meta = read_meta(path)
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{path} is not a readable Parquet file (truncated or corrupt?)") from exc
    expected = meta.get("num_rows")
    if expected is not None and int(expected) != table.num_rows:
        raise RgeomError(f"{path}: holds {table.num_rows} rows but was written with {expected}")
    if schema is not None:
        check_columns(path, table, schema if columns is None else map(schema.field, columns))
    return table


def check_columns(path: str | os.PathLike, table: pa.Table, fields: Iterable[pa.Field]) -> None:
    """Fail naming the first of ``fields`` that ``table`` (read from ``path``) lacks or holds
    with another type."""
    for field in fields:
        if field.name not in table.schema.names:
            raise RgeomError(f"{path}: missing column {field.name!r}")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise RgeomError(f"{path}: column {field.name!r} has type {got}, expected {field.type}")


# -- resumable stages -----------------------------------------------------------------------
def files_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """A folder's (or file's) files by name, size and modification time.

    Cheap enough to run per job (hashing multi-GB weights would cost minutes); a rewritten
    checkpoint gets new times, so its partial results are discarded as they should be.
    """
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return {"path": str(path), "files": [[path.name, st.st_size, st.st_mtime_ns]]}
    files = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append([f.name, st.st_size, st.st_mtime_ns])
    return {"path": str(path), "files": files}


def parts_dir(out: str | os.PathLike) -> Path:
    """Where the finished shards of ``out`` wait: ``<out>.parts/`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


class Shards:
    """Partial progress of one output, so a killed job resumes instead of restarting.

    ``<out>.parts/`` holds one atomically written Parquet file per finished shard and
    ``manifest.json``, which records the fingerprint of everything the output depends on
    (input hashes, model files, parameters, shard layout) and which shards are complete. A
    rerun reuses listed shards whose file is readable and whose fingerprint matches, and
    discards the folder otherwise. :meth:`finish` removes it once the output is written.
    The folder is not a declared Snakemake output, so Snakemake leaves it in place when it
    deletes a failed job's outputs.
    """

    MANIFEST = "manifest.json"

    def __init__(self, out: str | os.PathLike, fingerprint: Mapping[str, Any], n_shards: int):
        self.out = Path(out)
        self.dir = parts_dir(out)
        self.n_shards = int(n_shards)
        self.fingerprint = hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()
        self._inputs = fingerprint
        self.complete: set[int] = set()
        self._load()
        self._save()

    def _load(self) -> None:
        if not self.dir.exists():
            return
        # Temporary files of writers killed mid-shard or mid-output: never renamed, never to
        # be read. Only this job writes this output, so no live writer owns them.
        stale = [*self.dir.glob(".*.tmp"), *self.out.parent.glob(f".{self.out.name}.*.tmp")]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        try:
            manifest = json.loads((self.dir / self.MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        if (
            manifest.get("fingerprint") != self.fingerprint
            or manifest.get("n_shards") != self.n_shards
        ):
            log.warning("discarding %s: written for other inputs or parameters", self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for i in manifest.get("complete", []):
            try:
                read_meta(self.path(i))
            except RgeomError:
                log.warning("shard %d of %s is unreadable; redoing it", i, self.out)
                continue
            self.complete.add(int(i))
        if self.complete:
            log.info(
                "resuming %s: %d of %d shards already done",
                self.out,
                len(self.complete),
                self.n_shards,
            )

    def _save(self) -> None:
        write_json(
            self.dir / self.MANIFEST,
            {
                "output": str(self.out),
                "fingerprint": self.fingerprint,
                "inputs": self._inputs,
                "n_shards": self.n_shards,
                "complete": sorted(self.complete),
            },
        )

    def path(self, index: int) -> Path:
        return self.dir / f"shard-{int(index):05d}.parquet"

    def done(self, index: int) -> bool:
        return index in self.complete

    def mark_done(self, index: int) -> None:
        """Record shard ``index`` (already written atomically to :meth:`path`) as complete."""
        self.complete.add(int(index))
        self._save()
        fault_point("shard", self.out)

    def finish(self) -> None:
        """Drop the partial results; call only after ``out`` was written atomically."""
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def discard(out: str | os.PathLike) -> None:
        """Remove a parts folder an earlier, differently sharded run left beside ``out``."""
        folder = parts_dir(out)
        if folder.exists():
            log.warning("discarding %s: this run writes %s in one piece", folder, out)
            shutil.rmtree(folder, ignore_errors=True)


# A shard's own provenance (e.g. one behaviour's loss history), kept in its metadata.
SHARD_RECORD = "shard_record"


def keyed_shards(
    out: str | os.PathLike,
    fingerprint: Mapping[str, Any],
    keys: Sequence[str],
    schema: pa.Schema,
    compute: Callable[[int], tuple[pa.Table, Any]],
    meta: Mapping[str, Any],
    desc: str = "shards",
) -> tuple[list[pa.Table], list[Any], Shards]:
    """One resumable shard per key (e.g. per behaviour), computed in order or reused.

    ``compute(index)`` returns the shard's rows and a JSON-able record of its provenance;
    both are written atomically to the shard's file, and the keys join the fingerprint, so
    a rerun reuses a shard only for the same key at the same position. Every shard, fresh
    or reused, is read back from its file: the caller assembles the output from exactly
    what a resumed run would see, so both give the same bytes. Returns the tables, the
    records and the :class:`Shards`, whose :meth:`Shards.finish` the caller calls once
    ``out`` is written.
    """
    keys = [str(k) for k in keys]
    shards = Shards(out, {**fingerprint, "keys": keys}, len(keys))
    tables: list[pa.Table] = []
    records: list[Any] = []
    for index, key in enumerate(tqdm(keys, desc=desc, unit="shard")):
        path = shards.path(index)
        if not shards.done(index):
            table, record = compute(index)
            shard_meta = {**meta, "shard": index, "shard_key": key, SHARD_RECORD: record}
            write_table(path, table, schema, shard_meta)
            shards.mark_done(index)
        stored = read_meta(path)
        if stored.get("shard_key") != key:
            raise RgeomError(f"{path}: holds shard {stored.get('shard_key')!r}, expected {key!r}")
        tables.append(read_table(path, schema))
        records.append(stored.get(SHARD_RECORD))
    return tables, records, shards
