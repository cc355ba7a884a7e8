"""The per-step training metrics: one JSON line per logged step, then a Parquet table.

Rank 0 is the log's only writer. A resumed segment replaces the steps it logs again; the
table keeps the last record of every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import write_table
from rgeom.schemas import TRAIN_LOG_SCHEMA

KNOWN_LOG_KEYS = {"loss", "learning_rate", "grad_norm"}
#: Trainer log keys that become the table's list columns instead of ``extra`` JSON.
LIST_LOG_KEYS = {"r2d2_gcg_entries": "gcg_entries", "r2d2_gcg_losses": "gcg_losses"}


def log_row(step: int, logs: dict[str, Any], tokens_per_s: float, seconds: float) -> dict:
    """One step's record: the Trainer's known metrics, the R2D2 list columns, and every
    other logged value as ``extra`` JSON."""
    return {
        "step": step,
        "loss": float(logs.get("loss", float("nan"))),
        "learning_rate": float(logs.get("learning_rate", float("nan"))),
        "grad_norm": float(logs.get("grad_norm", float("nan"))),
        "tokens_per_s": tokens_per_s,
        "seconds": seconds,
        "extra": json.dumps(
            {k: v for k, v in logs.items() if k not in KNOWN_LOG_KEYS and k not in LIST_LOG_KEYS},
            sort_keys=True,
        ),
        **{col: logs.get(key) for key, col in LIST_LOG_KEYS.items()},
    }


def append_log_row(log_path: Path, row: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_log(log_path: Path, resume_step: int, end_step: int) -> None:
    """Drop the steps a run resumed at ``resume_step`` will log again, up to ``end_step``;
    those of later segments (an anchor inserted before existing ones) are kept."""
    if not log_path.exists():
        return
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    kept = [r for r in rows if r["step"] <= resume_step or r["step"] > end_step]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_train_log(state_dir: str | Path, out: str | Path, meta: dict[str, Any]) -> pa.Table:
    """The arm's per-step metrics (``state_dir/log.jsonl``) as a Parquet table at ``out``."""
    path = Path(state_dir) / "log.jsonl"
    rows = []
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RgeomError(f"{path}: line {n} is not JSON ({exc})") from exc
    # A resumed run may have logged a step twice; the last record wins. Logs written before
    # the list columns existed lack them: null, like an arm without a pool.
    by_step = {r["step"]: {"gcg_entries": None, "gcg_losses": None, **r} for r in rows}
    table = pa.Table.from_pylist([by_step[s] for s in sorted(by_step)], schema=TRAIN_LOG_SCHEMA)
    write_table(out, table, TRAIN_LOG_SCHEMA, dict(meta))
    return table
