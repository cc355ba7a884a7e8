"""The run summary: wide table, base-row duplication, figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.judges import METRIC_SCHEMA
from rgeom.report import build_summary, format_summary, read_train_logs

ARMS = ["sft", "r2d2"]
LAYERS = 4
D_MODEL = 3


def direction_schema() -> pa.Schema:
    vec = pa.list_(pa.float64(), D_MODEL)
    return pa.schema(
        [
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("position", pa.int16(), nullable=False),
            pa.field("n_harmful", pa.int32(), nullable=False),
            pa.field("n_harmless", pa.int32(), nullable=False),
            pa.field("norm", pa.float64(), nullable=False),
            pa.field("direction", vec, nullable=False),
            pa.field("unit", vec, nullable=False),
            pa.field("cos_prev_layer", pa.float64(), nullable=True),
        ]
    )


def _metrics_file(path: Path, arm: str, step: int, asr: float) -> str:
    rows = {
        "arm": [arm] * 2,
        "step": [step] * 2,
        "benchmark": ["harmbench", "xstest"],
        "metric": ["asr", "xstest_any_refusal"],
        "value": [asr, 1 - asr],
        "ci_low": [asr - 0.1, 0.9 - asr],
        "ci_high": [asr + 0.1, 1.1 - asr],
        "n": [10, 20],
        "judge": ["refusal_matcher"] * 2,
    }
    write_table(path, pa.table(rows), METRIC_SCHEMA, {"arm": arm, "step": step})
    return str(path)


def _directions_file(path: Path, arm: str, step: int, peak: int) -> str:
    rng = np.random.default_rng(step)
    rows = {k: [] for k in direction_schema().names}
    for layer in range(LAYERS):
        for pos in (-2, -1):
            vec = rng.normal(size=D_MODEL)
            # The last position peaks at layer ``peak``; position -2 is always larger, so
            # reading the wrong position would pick layer 0.
            norm = (10.0 if layer == peak else 1.0 + layer * 0.1) if pos == -1 else 100.0 - layer
            rows["layer"].append(layer)
            rows["position"].append(pos)
            rows["n_harmful"].append(8)
            rows["n_harmless"].append(8)
            rows["norm"].append(norm)
            rows["direction"].append(vec.tolist())
            rows["unit"].append((vec / np.linalg.norm(vec)).tolist())
            rows["cos_prev_layer"].append(None if layer == 0 else 0.5)
    write_table(path, pa.table(rows), direction_schema(), {"arm": arm, "step": step})
    return str(path)


def _inputs(tmp_path: Path):
    metrics = [_metrics_file(tmp_path / "m_base.parquet", "base", 0, 0.5)]
    directions = [_directions_file(tmp_path / "d_base.parquet", "base", 0, peak=1)]
    for k, arm in enumerate(ARMS):
        for step in (10, 20):
            metrics.append(
                _metrics_file(tmp_path / f"m_{arm}_{step}.parquet", arm, step, 0.4 - 0.1 * k)
            )
            directions.append(
                _directions_file(tmp_path / f"d_{arm}_{step}.parquet", arm, step, peak=2 + k)
            )
    return metrics, directions


def _train_log(path: Path, arm: str) -> str:
    # The runner's layout: arm-specific loss terms live in the JSON "extra" column.
    steps = list(range(0, 30, 5))
    table = pa.table(
        {
            "step": steps,
            "loss": [1.0 / (1 + s) for s in steps],
            "grad_norm": [1.0] * len(steps),
            "extra": [json.dumps({"loss_away": 0.5 / (1 + s), "epoch": s / 30}) for s in steps],
        }
    )
    schema = pa.schema(
        [
            ("step", pa.int32()),
            ("loss", pa.float64()),
            ("grad_norm", pa.float64()),
            ("extra", pa.string()),
        ]
    )
    write_table(path, table, schema, {"arm": arm})
    return str(path)


def test_build_summary_writes_table_and_figures(tmp_path):
    metrics, directions = _inputs(tmp_path)
    logs = [_train_log(tmp_path / f"log_{a}.parquet", a) for a in ARMS]
    out = tmp_path / "summary"
    build_summary(
        metrics,
        directions,
        str(out),
        {"arms": ARMS, "summary": {"figure_formats": ["svg"]}},
        {"config_hash": "x"},
        train_logs=logs,
    )
    table = read_table(out / "summary.parquet")
    df = pl.from_arrow(table)
    # base row duplicated into each arm, one row per (arm, step)
    assert sorted(df.select(["arm", "step"]).rows()) == sorted(
        (a, s) for a in ARMS for s in (0, 10, 20)
    )
    assert "base" not in df.get_column("arm").to_list()
    base_rows = df.filter(pl.col("step") == 0)
    assert base_rows.get_column("harmbench.asr").to_list() == [0.5, 0.5]
    for col in (
        "harmbench.asr",
        "harmbench.asr_ci_low",
        "harmbench.asr_ci_high",
        "xstest.xstest_any_refusal",
        "dir.max_norm_layer",
        "dir.max_norm",
    ):
        assert col in df.columns
    assert table.schema.field("step").type == pa.int32()
    assert table.schema.field("dir.max_norm_layer").type == pa.int16()
    r2d2 = df.filter((pl.col("arm") == "r2d2") & (pl.col("step") == 10)).row(0, named=True)
    assert r2d2["harmbench.asr"] == pytest.approx(0.3)
    assert r2d2["dir.max_norm_layer"] == 3  # peak at the last position, not position -2
    assert r2d2["dir.max_norm"] == pytest.approx(10.0)
    assert df.filter(pl.col("step") == 0).get_column("dir.max_norm_layer").to_list() == [1, 1]
    assert read_meta(out / "summary.parquet")["arms"] == ARMS

    csv = pl.read_csv(out / "summary.csv")
    assert csv.height == df.height and csv.columns == df.columns
    md = (out / "summary.md").read_text()
    assert md.startswith("| arm | step |") and "[0.400, 0.600]" in md

    for name in ("metrics_vs_step", "direction_norm_heatmap", "train_loss"):
        for ext in ("png", "svg"):
            path = out / "figures" / f"{name}.{ext}"
            assert path.stat().st_size > 1000, path
    assert (out / "figures" / "metrics_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.rglob("*.tmp"))
    logs_df = read_train_logs(logs)
    assert {"loss", "loss_away", "arm", "step"} <= set(logs_df.columns)
    assert "grad_norm" not in logs_df.columns and "epoch" not in logs_df.columns

    text = format_summary(str(out))
    assert "harmbench.asr" in text and "metrics_vs_step.png" in text
    assert len(text.splitlines()) < 40


def test_png_only_by_default_and_arms_inferred(tmp_path):
    metrics, directions = _inputs(tmp_path)
    out = tmp_path / "s"
    build_summary(metrics, directions, str(out), {}, {})
    df = pl.from_arrow(read_table(out / "summary.parquet"))
    assert sorted(set(df.get_column("arm").to_list())) == sorted(ARMS)
    assert (out / "figures" / "metrics_vs_step.png").exists()
    assert not list((out / "figures").glob("*.svg"))
    assert not (out / "figures" / "train_loss.png").exists()


def test_duplicate_metric_across_files_is_an_error(tmp_path):
    a = _metrics_file(tmp_path / "a.parquet", "sft", 10, 0.4)
    b = _metrics_file(tmp_path / "b.parquet", "sft", 10, 0.3)
    with pytest.raises(RgeomError, match=r"a\.parquet.*b\.parquet|b\.parquet.*a\.parquet"):
        build_summary([a, b], [], str(tmp_path / "s"), {"arms": ["sft"]}, {})


def test_metrics_missing_column_names_file(tmp_path):
    path = tmp_path / "bad.parquet"
    schema = pa.schema([f for f in METRIC_SCHEMA if f.name != "judge"])
    table = pa.table(
        {
            "arm": ["sft"],
            "step": [1],
            "benchmark": ["b"],
            "metric": ["asr"],
            "value": [0.1],
            "ci_low": [None],
            "ci_high": [None],
            "n": [3],
        }
    )
    write_table(path, table, schema, {})
    with pytest.raises(RgeomError, match=r"bad\.parquet.*'judge'"):
        build_summary([str(path)], [], str(tmp_path / "s"), {}, {})
