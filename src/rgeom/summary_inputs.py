"""What the run summary reads: metrics, direction, carrier and training-log tables, each
checked for the columns the summary needs, and the arms it shows.

Step 0 is the base model, written once with arm "base" but shared by every arm:
:func:`expand_base` copies its rows into each arm so every arm's curve starts at the same
point.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table
from rgeom.layout import BASE

UTILITY_SHIFT = "utility_shift"  # benchmark name of rgeom.utility_shift's rows
METRIC_COLUMNS = ("arm", "step", "benchmark", "metric", "value", "ci_low", "ci_high", "n", "judge")
DIRECTION_COLUMNS = ("layer", "position", "norm")
CARRIER_COLUMNS = ("layer", "position", "bypass", "induce", "kl", "admissible", "is_carrier")


@dataclass(frozen=True)
class SummaryInputs:
    """The files one summary reads (rgeom.report.build_summary's arguments)."""

    metrics: Sequence[str]
    directions: Sequence[str]
    train_logs: Sequence[str] | None = None
    utility_shift: Sequence[str] | None = None
    carriers: Sequence[str] | None = None
    drift_dir: Path | None = None
    interventions: str | None = None
    validation: str | None = None

    def record(self) -> dict[str, Any]:
        """The inputs as the summary's provenance lists them."""
        return {
            "metrics": [str(p) for p in self.metrics],
            "directions": [str(p) for p in self.directions],
            "train_logs": [str(p) for p in self.train_logs or []],
            "utility_shift": [str(p) for p in self.utility_shift or []],
            "carriers": [str(p) for p in self.carriers or []],
            "drift_dir": str(self.drift_dir) if self.drift_dir else None,
            "interventions": str(self.interventions) if self.interventions else None,
            "validation": str(self.validation) if self.validation else None,
        }


def summary_arms(params: Mapping[str, Any], seen: Sequence[str]) -> list[str]:
    """The configured arms; else every arm in the tables, or just the base."""
    arms = list(params.get("arms") or [])
    if not arms:
        arms = sorted({a for a in seen if a != BASE})
    return arms or [BASE]


def expand_base(df: pl.DataFrame, arms: list[str]) -> pl.DataFrame:
    """Copy the base rows (arm "base") into every arm; other rows stay as they are."""
    base = df.filter(pl.col("arm") == BASE)
    rest = df.filter(pl.col("arm") != BASE)
    if base.is_empty() or arms == [BASE]:
        return df
    copies = [base.with_columns(pl.lit(a).alias("arm")) for a in arms]
    return pl.concat([rest, *copies], how="vertical")


# --- metrics ------------------------------------------------------------------------


def read_metrics(paths: Sequence[str]) -> pl.DataFrame:
    frames = []
    for path in paths:
        table = read_table(path)
        for col in METRIC_COLUMNS:
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (metrics table)")
        df = pl.from_arrow(table.select(list(METRIC_COLUMNS)))
        frames.append(
            df.with_columns(
                pl.col("step").cast(pl.Int32),
                pl.col("n").cast(pl.Int32),
                *(pl.col(c).cast(pl.Float64) for c in ("value", "ci_low", "ci_high")),
                pl.lit(str(path)).alias("source"),
            )
        )
    if not frames:
        return pl.DataFrame(
            schema={
                "arm": pl.String,
                "step": pl.Int32,
                "benchmark": pl.String,
                "metric": pl.String,
                "value": pl.Float64,
                "ci_low": pl.Float64,
                "ci_high": pl.Float64,
                "n": pl.Int32,
                "judge": pl.String,
                "source": pl.String,
            }
        )
    df = pl.concat(frames, how="vertical")
    dup = df.group_by(["arm", "step", "benchmark", "metric", "judge"]).agg(
        pl.len().alias("k"), pl.col("source").first().alias("first"), pl.col("source")
    )
    dup = dup.filter(pl.col("k") > 1)
    if not dup.is_empty():
        r = dup.row(0, named=True)
        raise RgeomError(
            f"metric {r['benchmark']}.{r['metric']} (judge {r['judge']}) for arm {r['arm']} "
            f"step {r['step']} appears in more than one file: {', '.join(r['source'])}"
        )
    return df


def metric_names(metrics: pl.DataFrame) -> pl.DataFrame:
    """Column stem per row: ``benchmark.metric``, plus ``@judge`` where judges collide."""
    judges = metrics.group_by(["benchmark", "metric"]).agg(pl.col("judge").n_unique().alias("j"))
    m = metrics.join(judges, on=["benchmark", "metric"])
    stem = pl.col("benchmark") + "." + pl.col("metric")
    # The utility audit's rows (rgeom.utility_shift) are named by metric alone: utility_kl.
    stem = pl.when(pl.col("benchmark") == UTILITY_SHIFT).then(pl.col("metric")).otherwise(stem)
    return m.with_columns(
        pl.when(pl.col("j") > 1).then(stem + "@" + pl.col("judge")).otherwise(stem).alias("column")
    ).drop("j")


# --- directions and carriers --------------------------------------------------------


def _require_cell(path: str, meta: Mapping[str, Any], kind: str) -> None:
    """A per-cell table's provenance must name its (arm, step)."""
    for key in ("arm", "step"):
        if meta.get(key) is None:
            raise RgeomError(f"{path}: provenance lacks {key!r} ({kind} table)")


def read_directions(paths: Sequence[str]) -> pl.DataFrame:
    """(arm, step, layer, position, norm, cos_prev_layer) from every direction table."""
    frames = []
    for path in paths:
        meta = read_meta(path)
        _require_cell(path, meta, "direction")
        table = read_table(path, columns=None)
        for col in DIRECTION_COLUMNS:
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (direction table)")
        cols = [*DIRECTION_COLUMNS] + (
            ["cos_prev_layer"] if "cos_prev_layer" in table.column_names else []
        )
        df = pl.from_arrow(table.select(cols))
        if "cos_prev_layer" not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("cos_prev_layer"))
        frames.append(
            df.with_columns(
                pl.lit(str(meta["arm"])).alias("arm"),
                pl.lit(int(meta["step"]), dtype=pl.Int32).alias("step"),
                pl.col("layer").cast(pl.Int32),
                pl.col("position").cast(pl.Int32),
                pl.col("norm").cast(pl.Float64),
                pl.col("cos_prev_layer").cast(pl.Float64),
            ).select(["arm", "step", "layer", "position", "norm", "cos_prev_layer"])
        )
    if not frames:
        return pl.DataFrame(
            schema={
                "arm": pl.String,
                "step": pl.Int32,
                "layer": pl.Int32,
                "position": pl.Int32,
                "norm": pl.Float64,
                "cos_prev_layer": pl.Float64,
            }
        )
    return pl.concat(frames, how="vertical")


def last_position(directions: pl.DataFrame) -> pl.DataFrame:
    """Rows at each file's last position: the largest index (-1 when positions count back
    from the end of the prompt, the final index when they count forward)."""
    return directions.filter(pl.col("position") == pl.col("position").max().over(["arm", "step"]))


def read_carriers(paths: Sequence[str]) -> dict[tuple[str, int], list[dict]]:
    """(arm, step) -> that cell's carrier-search candidates, one dict per row."""
    out: dict[tuple[str, int], list[dict]] = {}
    for path in paths:
        meta = read_meta(path)
        _require_cell(path, meta, "carrier")
        table = read_table(path)
        for col in CARRIER_COLUMNS:
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (carrier table)")
        out[(str(meta["arm"]), int(meta["step"]))] = table.to_pylist()
    return out


# --- training logs ------------------------------------------------------------------


def _is_loss(name: str) -> bool:
    return name == "loss" or "loss" in name.split("_") or name.endswith("loss")


def _loss_row(path: str, i: int, rec: Mapping[str, Any]) -> dict[str, Any]:
    """One log row's step and loss terms, those in its JSON ``extra`` column included."""
    row = {"step": int(rec["step"])}
    for key, value in rec.items():
        if key != "step" and _is_loss(key) and isinstance(value, int | float):
            row[key] = float(value)
    if rec.get("extra"):
        try:
            extra = json.loads(rec["extra"])
        except json.JSONDecodeError as exc:
            raise RgeomError(f"{path}: row {i}: column 'extra' is not JSON") from exc
        for key, value in extra.items():
            if _is_loss(key) and isinstance(value, int | float) and key not in row:
                row[key] = float(value)
    return row


def read_train_logs(paths: Sequence[str]) -> pl.DataFrame:
    """(arm, step, loss, other loss terms) from training logs; loss terms logged in the
    JSON ``extra`` column (R2D2's away/toward/utility losses) become columns of their own."""
    frames = []
    for path in paths:
        meta = read_meta(path)
        table = read_table(path)
        for col in ("step", "loss"):
            if col not in table.column_names:
                raise RgeomError(f"{path}: missing column {col!r} (training log)")
        arm = meta.get("arm")
        if arm is None:
            raise RgeomError(f"{path}: provenance lacks 'arm' (training log)")
        rows = [_loss_row(path, i, rec) for i, rec in enumerate(table.to_pylist())]
        df = pl.DataFrame(rows, infer_schema_length=None)
        frames.append(df.with_columns(pl.lit(str(arm)).alias("arm")))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
