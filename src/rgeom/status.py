"""Where a run stands (``rgeom status``) and how two finished runs differ (``rgeom compare``).

Status walks the grid the config defines (the base cell at step 0, each arm at each trained
anchor) and classifies every artefact the workflow would write:

``done``
    the file exists and its provenance reads back; for tables, the row count stored at
    write time matches the file (the same check :func:`rgeom.io.read_table` makes, without
    reading the data). A checkpoint directory is done once its ``config.json`` exists.
``running``
    a temporary file ``.<name>.*.tmp`` sits beside the target (rgeom's atomic writers
    create it when they start writing and rename it on success), or Snakemake has an
    ``.snakemake/incomplete`` marker for the target while a Snakemake lock is held. A job
    killed with SIGKILL leaves its temporary file behind; the age shown in the detail
    tells such a leftover from live work.
``incomplete``
    an ``.snakemake/incomplete`` marker with no Snakemake holding a lock: an interrupted
    run that ``snakemake --rerun-incomplete`` will redo.
``invalid``
    the file exists but cannot be read or its row count is wrong (truncated, foreign).
``missing``
    none of the above.

Compare reads ``summary/summary.parquet`` of two results folders and, when both hold the
``config.json`` the ``record_config`` rule writes, refuses to compare runs made by
different configs unless the differing keys are ignored explicitly.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import time
from base64 import urlsafe_b64encode
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table
from rgeom.layout import cell_dir, cells, model_dir

log = logging.getLogger(__name__)

STATES = ("done", "running", "incomplete", "invalid", "missing")
# Column order of the status table; per-benchmark artefacts collapse into one column each.
CELL_ARTEFACTS = (
    "model",
    "generations",
    "judgements",
    "metrics",
    "activations",
    "directions",
    "carriers",
    "interventions",
    "cross_anchor",
    "adaptive_gcg",
    "utility_shift",
)
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class StatusRow:
    """One expected artefact. ``step`` is None for per-arm and run-level artefacts."""

    arm: str
    step: int | None
    artefact: str
    benchmark: str | None
    path: Path
    state: str
    detail: str = ""


def expected_paths(cfg: Mapping[str, Any], results: Path) -> list[tuple]:
    """(arm, step, artefact, benchmark, path, kind) for everything the config asks for;
    kind is "table", "dir" (a model directory) or "file"."""
    out: list[tuple] = []
    attacks = cfg.get("attacks") or {}
    for arm, step in cells(cfg["arms"], cfg["anchors"]):
        cell = cell_dir(arm, step, results)
        # The base cell's "checkpoint" is the prepared source model.
        out.append((arm, step, "model", None, model_dir(arm, step, results), "dir"))
        for bench in cfg["benchmarks"]:
            for artefact in ("generations", "judgements", "metrics"):
                out.append(
                    (arm, step, artefact, bench, cell / artefact / f"{bench}.parquet", "table")
                )
        for artefact in ("activations", "directions", "carriers", "interventions", "cross_anchor"):
            out.append((arm, step, artefact, None, cell / f"{artefact}.parquet", "table"))
        if (attacks.get("adaptive") or {}).get("enabled"):
            path = cell / "adaptive_gcg_metrics.parquet"
            out.append((arm, step, "adaptive_gcg", None, path, "table"))
        if (cfg.get("utility_shift") or {}).get("enabled"):
            out.append((arm, step, "utility_shift", None, cell / "utility_shift.parquet", "table"))
    for arm in cfg["arms"]:
        out.append((arm, None, "train_log", None, results / arm / "train_log.parquet", "table"))
    out.append(("*", None, "config", None, results / CONFIG_NAME, "file"))
    for name in sorted(cfg["data"]["sets"]):
        out.append(("*", None, f"data {name}", None, results / "data" / f"{name}.parquet", "table"))
    if attacks.get("enabled") and attacks.get("benchmark") in cfg["benchmarks"]:
        path = results / "attacks" / "test_cases.parquet"
        out.append(("*", None, "attacks test_cases", None, path, "table"))
    for name in ("drift", "angles", "verdict"):
        path = results / "drift" / f"{name}.parquet"
        out.append(("*", None, f"drift {name}", None, path, "table"))
    path = results / "interventions" / "interventions.parquet"
    out.append(("*", None, "interventions summary", None, path, "table"))
    out.append(("*", None, "summary", None, results / "summary" / "summary.parquet", "table"))
    return out


def _marker(path: Path, workdir: Path) -> Path | None:
    """Snakemake's incomplete marker for ``path`` (see snakemake.persistence: the output
    path relative to the working directory, url-safe base64, split at the name limit)."""
    try:
        rel = path.relative_to(workdir)
    except ValueError:
        return None
    b64 = urlsafe_b64encode(str(rel).encode()).decode()
    chunks = [b64[i : i + 254] for i in range(0, len(b64), 254)]
    chunks = ["@" + c for c in chunks[:-1]] + chunks[-1:]
    return workdir.joinpath(".snakemake", "incomplete", *chunks)


def _snakemake_running(workdir: Path) -> bool:
    locks = workdir / ".snakemake" / "locks"
    return locks.is_dir() and any(locks.iterdir())


def _age(path: Path, now: float) -> str:
    try:
        seconds = max(0, int(now - path.stat().st_mtime))
    except OSError:
        return "?"
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def check_path(path: Path, kind: str, workdir: Path, now: float | None = None) -> tuple[str, str]:
    """(state, detail) of one expected artefact; see the module docstring for the states."""
    now = time.time() if now is None else now
    if path.parent.is_dir():
        temps = sorted(path.parent.glob(f".{glob.escape(path.name)}.*tmp"))
        if temps:
            return "running", f"temp file {temps[0].name} ({_age(temps[0], now)} old)"
    marker = _marker(path, workdir)
    if marker is not None and marker.exists():
        if _snakemake_running(workdir):
            return "running", "snakemake job in progress"
        return "incomplete", "interrupted snakemake job (rerun with --rerun-incomplete)"
    if not path.exists():
        return "missing", ""
    if kind == "dir":
        if (path / "config.json").exists():
            return "done", ""
        return "invalid", "model directory without config.json"
    if kind == "file":
        return ("done", "") if path.stat().st_size > 0 else ("invalid", "empty file")
    try:
        meta = read_meta(path)
        stored = meta.get("num_rows")
        actual = pq.read_metadata(path).num_rows
    except (RgeomError, OSError, ValueError) as exc:
        return "invalid", str(exc)
    if stored is not None and int(stored) != actual:
        return "invalid", f"holds {actual} rows but was written with {stored}"
    return "done", ""


def status_rows(
    cfg: Mapping[str, Any], results: str | Path, now: float | None = None
) -> list[StatusRow]:
    """Every artefact ``cfg`` asks for under ``results`` with its state; pure apart from
    reading the file system. The Snakemake working directory is ``results``' parent."""
    results = Path(results)
    workdir = results.parent
    rows = []
    for arm, step, artefact, bench, path, kind in expected_paths(cfg, results):
        state, detail = check_path(path, kind, workdir, now)
        rows.append(StatusRow(arm, step, artefact, bench, path, state, detail))
    return rows


def _cell(states: Sequence[str]) -> str:
    """One table cell: the state when all agree, else "k/n" done plus what the rest is."""
    if not states:
        return ""
    if len(set(states)) == 1:
        return states[0]
    extra = [f"{states.count(s)} {s}" for s in STATES[1:] if s in states and s != "missing"]
    return f"{states.count('done')}/{len(states)}" + (f" ({', '.join(extra)})" if extra else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


def format_status(rows: Sequence[StatusRow], results: str | Path = "results") -> str:
    """The compact table: one line per cell, one per arm, run-level artefacts, totals, and
    the path of everything that is neither done nor missing."""
    lines = [f"results: {results}"]
    cells: dict[tuple[str, int], dict[str, list[str]]] = {}
    for r in rows:
        if r.step is not None:
            cells.setdefault((r.arm, r.step), {}).setdefault(r.artefact, []).append(r.state)
    if cells:
        body = [
            [arm, str(step), *(_cell(arts.get(a, [])) for a in CELL_ARTEFACTS)]
            for (arm, step), arts in cells.items()
        ]
        lines += _table(["arm", "step", *CELL_ARTEFACTS], body)
    per_arm = [r for r in rows if r.step is None and r.arm != "*"]
    if per_arm:
        lines.append("")
        lines += _table(["arm", "train_log"], [[r.arm, r.state] for r in per_arm])
    run_level: dict[str, list[str]] = {}
    for r in rows:
        if r.arm == "*":
            # "data harmbench", "data xstest", ... share one line: "data: 9/9 done".
            run_level.setdefault(r.artefact.split(" ")[0], []).append(r.state)
    if run_level:
        lines.append("")
        lines += [f"{name}: {_cell(states)}" for name, states in run_level.items()]
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines += ["", "total: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "done")]
    for state in STATES[1:-1]:
        flagged = [r for r in rows if r.state == state]
        if flagged:
            lines.append(f"{state}:")
            lines += [f"  {r.path}" + (f"  ({r.detail})" if r.detail else "") for r in flagged]
    return "\n".join(lines)


def config_warning(cfg: Mapping[str, Any], results: str | Path) -> str | None:
    """A warning when ``results`` was made with another config (its ``config.json``, the
    record_config rule's copy) than ``cfg``; model keys are named first."""
    recorded = _read_config(Path(results))
    if recorded is None:
        return None
    # Both sides validated: a default spelled out in one file is no difference.
    from rgeom.config import validate

    # A record from an older schema is compared as written.
    with contextlib.suppress(RgeomError):
        recorded = validate(recorded, source="recorded", check_files=False)
    current = validate(dict(cfg), check_files=False)
    diffs = config_diff(recorded, current)
    if not diffs:
        return None
    diffs.sort(key=lambda d: (not d[0].startswith("model."), d[0]))
    shown = "; ".join(f"{k}: {_show(x)} then, {_show(y)} now" for k, x, y in diffs[:5])
    more = f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else ""
    model = " and another model" if diffs[0][0].startswith("model.") else ""
    return (
        f"warning: {Path(results) / CONFIG_NAME} was made with another config{model} "
        f"({len(diffs)} key(s) differ: {shown}{more}); 'done' below means done for that "
        "config, and the next run redoes what the change touches"
    )


def status_cmd(config: str, results: str, params: dict[str, Any] | None = None) -> None:
    from rgeom.config import load

    cfg = load(config)
    rows = status_rows(cfg, results)
    print(format_status(rows, results))
    warning = config_warning(cfg, results)
    if warning:
        print(warning)


# --- compare ------------------------------------------------------------------------

_ABSENT = object()


def config_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) wherever two configs differ; mappings are
    walked, lists compared whole (anchors [0, 10] vs [0, 20] is one difference)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            out += config_diff(a.get(key, _ABSENT), b.get(key, _ABSENT), dotted)
        return out
    return [] if a == b else [(prefix or "<top level>", a, b)]


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == i or key.startswith(f"{i}.") for i in ignore)


def _show(value: Any, limit: int = 40) -> str:
    text = "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _results_dir(run: str | Path) -> Path:
    """The results folder itself, or a workflow directory that holds ``results/``."""
    run = Path(run)
    if (run / "summary" / "summary.parquet").exists():
        return run
    if (run / "results" / "summary" / "summary.parquet").exists():
        return run / "results"
    raise RgeomError(f"no summary/summary.parquet in {run} (is it a finished results folder?)")


def _read_config(results: Path) -> dict[str, Any] | None:
    path = results / CONFIG_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RgeomError(f"{path}: not valid JSON: {exc}") from exc


def check_same_config(a: Path, b: Path, ignore: Sequence[str] = ()) -> list[str]:
    """Raise naming the differing keys when both runs recorded their config; return the
    warnings to show when one of them did not."""
    cfg_a, cfg_b = _read_config(a), _read_config(b)
    if cfg_a is None or cfg_b is None:
        lacking = [
            f"{n} ({r / CONFIG_NAME})"
            for n, r, c in (("A", a, cfg_a), ("B", b, cfg_b))
            if c is None
        ]
        return [
            f"no {CONFIG_NAME} in {' and '.join(lacking)}, so the configs cannot be checked "
            "(a run from before the record_config rule?); comparing anyway"
        ]
    diffs = [d for d in config_diff(cfg_a, cfg_b) if not _ignored(d[0], ignore)]
    if diffs:
        shown = "; ".join(f"{k}: {_show(x)} vs {_show(y)}" for k, x, y in diffs[:10])
        more = f" (+{len(diffs) - 10} more)" if len(diffs) > 10 else ""
        raise RgeomError(
            f"{a / CONFIG_NAME} and {b / CONFIG_NAME} differ in {len(diffs)} key(s): "
            f"{shown}{more}; pass --ignore KEY for differences that are intended"
        )
    return []


def _value_columns(columns: Sequence[str]) -> list[str]:
    # The same split as the Markdown summary: CIs and counts qualify a value, they are not one.
    return [c for c in columns[2:] if not c.endswith(("_ci_low", "_ci_high", "_n"))]


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def compare_rows(path_a: Path, path_b: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Per shared (arm, step) and value column: a, b and b - a (None where either side has
    no value). Also notes on cells or columns only one run has."""
    tables = [read_table(p).to_pylist() for p in (path_a, path_b)]
    cols = [_value_columns(pq.read_schema(p).names) for p in (path_a, path_b)]
    by_cell = [{(r["arm"], int(r["step"])): r for r in t} for t in tables]
    shared = [k for k in by_cell[0] if k in by_cell[1]]
    columns = cols[0] + [c for c in cols[1] if c not in cols[0]]
    rows = []
    for arm, step in sorted(shared):
        ra, rb = by_cell[0][(arm, step)], by_cell[1][(arm, step)]
        for col in columns:
            a, b = _number(ra.get(col)), _number(rb.get(col))
            delta = b - a if a is not None and b is not None else None
            ci = {
                f"{side}_ci": (_number(r.get(f"{col}_ci_low")), _number(r.get(f"{col}_ci_high")))
                for side, r in (("a", ra), ("b", rb))
            }
            rows.append(
                {"arm": arm, "step": step, "metric": col, "a": a, "b": b, "delta": delta, **ci}
            )
    notes = []
    for name, mine, other in (("A", 0, 1), ("B", 1, 0)):
        only = sorted(k for k in by_cell[mine] if k not in by_cell[other])
        if only:
            notes.append(f"cells only in {name}: " + ", ".join(f"{a}@{s}" for a, s in only))
        only_cols = [c for c in cols[mine] if c not in cols[other]]
        if only_cols:
            notes.append(f"columns only in {name}: " + ", ".join(only_cols))
    return rows, notes


def compare_runs(
    run_a: str | Path, run_b: str | Path, ignore: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[str]]:
    """Check the configs, then compare the summaries; returns (rows, warnings and notes)."""
    a, b = _results_dir(run_a), _results_dir(run_b)
    warnings = check_same_config(a, b, ignore)
    rows, notes = compare_rows(a / "summary" / "summary.parquet", b / "summary" / "summary.parquet")
    return rows, warnings + notes


def changed(row: Mapping[str, Any]) -> bool:
    """A value that moved, or that only one run has."""
    if row["a"] is None or row["b"] is None:
        return (row["a"] is None) != (row["b"] is None)
    return row["delta"] != 0


def format_compare(rows: Sequence[Mapping[str, Any]], changed_only: bool = False) -> str:
    def num(v: float | None, signed: bool = False) -> str:
        if v is None:
            return "-"
        return f"{v:+.4f}" if signed else f"{v:.4f}"

    def with_ci(v: float | None, ci: tuple | None) -> str:
        lo, hi = ci or (None, None)
        if v is None or lo is None or hi is None:
            return num(v)
        return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"

    shown = [r for r in rows if changed(r)] if changed_only else list(rows)
    body = [
        [
            r["arm"],
            str(r["step"]),
            r["metric"],
            with_ci(r["a"], r.get("a_ci")),
            with_ci(r["b"], r.get("b_ci")),
            num(r["delta"], True),
        ]
        for r in shown
    ]
    if not body:
        if rows and changed_only:
            return f"no value differs ({len(rows)} compared)"
        return "no (arm, step) cell is in both runs"
    header = ["arm", "step", "metric", "A [95% CI]", "B [95% CI]", "B-A"]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    align = [str.ljust, str.rjust, str.ljust, str.rjust, str.rjust, str.rjust]

    def line(r):
        return "  ".join(f(c, w) for f, c, w in zip(align, r, widths, strict=True)).rstrip()

    lines = [line(header), *(line(r) for r in body)]
    if changed_only:
        lines.append(f"({len(rows) - len(shown)} unchanged value(s) not shown)")
    return "\n".join(lines)


def _is_config_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix in (".yaml", ".yml", ".json")


def compare_configs(path_a: str | Path, path_b: str | Path, ignore: Sequence[str] = ()) -> str:
    """Two config files (YAML, or a run's config.json), validated with defaults filled, as
    one line per differing key."""
    from rgeom.config import load_yaml, validate

    cfgs = [validate(load_yaml(p), source=str(p), check_files=False) for p in (path_a, path_b)]
    diffs = [d for d in config_diff(*cfgs) if not _ignored(d[0], ignore)]
    if not diffs:
        return "the configs agree (defaults filled in)"
    width = max(len(k) for k, _, _ in diffs)
    lines = [f"{'key'.ljust(width)}  A -> B"]
    lines += [f"{k.ljust(width)}  {_show(x, 60)} -> {_show(y, 60)}" for k, x, y in diffs]
    lines.append(f"{len(diffs)} key(s) differ")
    return "\n".join(lines)


def compare_cmd(
    run_a: str,
    run_b: str,
    ignore: list[str],
    changed_only: bool = False,
    params: dict[str, Any] | None = None,
) -> None:
    print(f"A: {run_a}\nB: {run_b}")
    if _is_config_file(run_a) and _is_config_file(run_b):
        print(compare_configs(run_a, run_b, ignore))
        return
    rows, notes = compare_runs(run_a, run_b, ignore)
    for note in notes:
        log.warning(note)
    print(format_compare(rows, changed_only))
