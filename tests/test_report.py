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
from rgeom.report import REPORT_FIGURES, build_summary, format_summary, read_train_logs
from rgeom.summary_inputs import SummaryInputs
from rgeom.tables import PAPER_ANCHORS, PAPER_REFERENCE, paper_value, tex_escape

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
        SummaryInputs(metrics, directions, train_logs=logs),
        str(out),
        {"arms": ARMS, "summary": {"figure_formats": ["svg"]}},
        {"config_hash": "x"},
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
    assert "harmbench.asr" in text and "metrics_vs_step," in text and "(png/svg)" in text
    assert len(text.splitlines()) < 40


def test_png_and_svg_by_default_arms_inferred_and_missing_inputs_say_so(tmp_path):
    metrics, directions = _inputs(tmp_path)
    out = tmp_path / "s"
    build_summary(SummaryInputs(metrics, directions), str(out), {}, {})
    df = pl.from_arrow(read_table(out / "summary.parquet"))
    assert sorted(set(df.get_column("arm").to_list())) == sorted(ARMS)
    figs = out / "figures"
    for name in [*REPORT_FIGURES, *(f"frontier_{a}" for a in ARMS)]:
        for ext in ("png", "svg"):
            assert (figs / f"{name}.{ext}").stat().st_size > 1000, name
    assert not list(figs.glob("*.pdf"))
    # No training logs were given: the figure exists (the workflow declares it) and says why
    # it is empty.
    assert "no input" in (figs / "train_loss.svg").read_text()
    assert "no input" not in (figs / "metrics_vs_step.svg").read_text()


def test_duplicate_metric_across_files_is_an_error(tmp_path):
    a = _metrics_file(tmp_path / "a.parquet", "sft", 10, 0.4)
    b = _metrics_file(tmp_path / "b.parquet", "sft", 10, 0.3)
    with pytest.raises(RgeomError, match=r"a\.parquet.*b\.parquet|b\.parquet.*a\.parquet"):
        build_summary(SummaryInputs([a, b], []), str(tmp_path / "s"), {"arms": ["sft"]}, {})


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
        build_summary(SummaryInputs([str(path)], []), str(tmp_path / "s"), {}, {})


# --- paper tables and the geometry / intervention figures ------------------------------


def _fill(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    """Rows with only the columns a test cares about; the rest null or a neutral value."""
    neutral = {pa.string(): "", pa.bool_(): False}
    cols = {}
    for f in schema:
        default = None
        if not f.nullable:
            default = neutral.get(f.type, [] if pa.types.is_list(f.type) else 0)
        cols[f.name] = [r.get(f.name, default) for r in rows]
    return pa.table(cols, schema=schema)


def _geometry_inputs(tmp_path: Path, steps=(10, 20)):
    """carriers per cell, drift/angles/verdict, the interventions table: a carrier at layer 2
    for sft at every step, none for r2d2 (a fallback at layer 1)."""
    from rgeom.causal import INTERVENTION_SCHEMA
    from rgeom.drift import ANGLES_SCHEMA, DRIFT_SCHEMA, VERDICT_SCHEMA
    from rgeom.interventions import CARRIER_SCHEMA

    cells = [("base", 0)] + [(a, s) for a in ARMS for s in steps]
    carriers = []
    for arm, step in cells:
        rows = [
            {
                "layer": layer,
                "position": -1,
                "bypass": -1.0 - layer - step / 10,
                "induce": 0.5 * layer,
                "kl": 0.01 * (layer + 1),
                "admissible": arm == "sft" and layer == 2,
                "is_carrier": arm == "sft" and layer == 2,
            }
            for layer in range(LAYERS)
        ]
        path = tmp_path / f"carriers_{arm}_{step}.parquet"
        write_table(path, _fill(CARRIER_SCHEMA, rows), CARRIER_SCHEMA, {"arm": arm, "step": step})
        carriers.append(str(path))
    drift_dir = tmp_path / "drift"
    drift_rows, angle_rows = [], []
    for arm in ARMS:
        for i, step in enumerate((0, *steps)):
            drift_rows.append(
                {
                    "arm": arm,
                    "step": step,
                    "carrier_layer": 2 if arm == "sft" and step else None,
                    "carrier_position": -1 if arm == "sft" and step else None,
                    "n_admissible": 1 if arm == "sft" and step else 0,
                    "ref_layer": 2 if arm == "sft" else 1,
                    "ref_position": -1,
                    "window_layers": [1, 2, 3],
                    "erank_energy": 1.2 + 0.1 * i,
                    "erank_singular": 2.0,
                    "erank_participation": 1.1,
                    "erank_ci_low": 1.1 + 0.1 * i,
                    "erank_ci_high": 1.3 + 0.1 * i,
                    "erank_null_mean": 1.5,
                    "erank_null_sd": 0.05,
                    "null_kind": "shuffle",
                    "angle_prev_deg": None if i == 0 else 10.0 * i,
                    "angle_step0_deg": 0.0 if i == 0 else 12.5 * i,
                }
            )
            if step:
                angle_rows.append(
                    {
                        "arm_a": arm,
                        "step_a": step,
                        "arm_b": "base",
                        "step_b": 0,
                        "relation": "step0",
                        "basis": "carrier",
                        "k": 1,
                        "index": 1,
                        "angle_deg": 12.5 * i,
                    }
                )
    meta = {"n_layers": LAYERS, "drift": {"rank_kind": "energy"}}
    write_table(drift_dir / "drift.parquet", _fill(DRIFT_SCHEMA, drift_rows), DRIFT_SCHEMA, meta)
    write_table(drift_dir / "angles.parquet", _fill(ANGLES_SCHEMA, angle_rows), ANGLES_SCHEMA, meta)
    verdicts = [
        {"arm": "sft", "verdict": "stable", "statistic": 25.0, "detail": "d", "basis": "geometry"},
        {"arm": "r2d2", "verdict": "undetermined", "detail": "no carrier", "basis": "geometry"},
    ]
    write_table(
        drift_dir / "verdict.parquet", _fill(VERDICT_SCHEMA, verdicts), VERDICT_SCHEMA, meta
    )
    rows = []
    for arm, step in cells:
        layer = 2 if arm == "sft" and step else 1
        source = "carrier" if arm == "sft" and step else "fallback_min_bypass"
        for kind, coeff, k, rate, kl, util in (
            ("none", None, None, 0.9, 0.0, 0.5),
            ("ablation", None, None, 0.2, 0.3, 0.45),
            ("addition", 2.0, None, 1.0, 0.6, 0.4),
            ("subspace_ablation", None, 2, 0.1, 0.9, 0.3),
        ):
            rows.append(
                {
                    "arm": arm,
                    "step": step,
                    "intervention": kind,
                    "coeff": coeff,
                    "k": k,
                    "layer": layer,
                    "position": -1,
                    "admissible": source == "carrier",
                    "carrier_source": source,
                    "refusal_score_harmful": 2.0 * rate,
                    "kl_harmless": kl,
                    "refusal_rate": rate,
                    "utility_accuracy": util,
                    "judge": "refusal_matcher",
                }
            )
    interventions = tmp_path / "interventions.parquet"
    write_table(interventions, _fill(INTERVENTION_SCHEMA, rows), INTERVENTION_SCHEMA, {})
    return carriers, str(drift_dir), str(interventions)


def _summary_with_geometry(tmp_path: Path, anchors=(0, 10, 20)):
    metrics, directions = _inputs(tmp_path)
    carriers, drift_dir, interventions = _geometry_inputs(tmp_path)
    out = tmp_path / "summary"
    inputs = SummaryInputs(
        metrics,
        directions,
        carriers=carriers,
        drift_dir=Path(drift_dir),
        interventions=interventions,
    )
    build_summary(inputs, str(out), {"arms": ARMS, "anchors": list(anchors)}, {"config_hash": "x"})
    return out


def test_paper_tables_one_row_per_arm_and_anchor_in_every_format(tmp_path):
    out = _summary_with_geometry(tmp_path)
    tables = out / "tables"
    for name in ("behaviour", "geometry", "interventions"):
        df = pl.from_arrow(read_table(tables / f"{name}.parquet"))
        assert sorted(df.select(["arm", "step"]).rows()) == sorted(
            (a, s) for a in ARMS for s in (0, 10, 20)
        ), name
        assert pl.read_csv(tables / f"{name}.csv").height == df.height
        assert read_meta(tables / f"{name}.parquet")["config_hash"] == "x"
        md = (tables / f"{name}.md").read_text()
        assert md.count("\n| sft |") == 3 and md.count("\n| r2d2 |") == 3, name
        tex = (tables / f"{name}.tex").read_text()
        assert tex.count("\\begin{tabular}") == 1 and tex.count("\\end{table}") == 1
        assert "\\_" in tex or "_" not in tex.split("\\midrule")[1].split("\\bottomrule")[0]
        assert "<table>" in (tables / f"{name}.html").read_text()
    behaviour = pl.from_arrow(read_table(tables / "behaviour.parquet"))
    row = behaviour.filter((pl.col("arm") == "r2d2") & (pl.col("step") == 10)).row(0, named=True)
    assert row["harmbench.asr"] == pytest.approx(0.3)
    assert row["harmbench.asr_ci_low"] == pytest.approx(0.2)
    assert row["harmbench.asr_judge"] == "refusal_matcher"
    assert "judge refusal_matcher" in (tables / "behaviour.md").read_text()
    # Not the paper's anchors: no paper columns at all.
    assert not [c for c in behaviour.columns if c.startswith("paper:")]

    geo = pl.from_arrow(read_table(tables / "geometry.parquet"))
    sft = geo.filter((pl.col("arm") == "sft") & (pl.col("step") == 20)).row(0, named=True)
    assert (sft["carrier_layer"], sft["site_layer"], sft["site_source"]) == (2, 2, "carrier")
    assert sft["bypass"] == pytest.approx(-1.0 - 2 - 2.0)  # the carrier's own row, step 20
    assert sft["erank_null_mean"] == pytest.approx(1.5)
    r2d2 = geo.filter((pl.col("arm") == "r2d2") & (pl.col("step") == 10)).row(0, named=True)
    assert r2d2["carrier_layer"] is None and r2d2["site_source"] == "fallback_min_bypass"
    assert r2d2["bypass"] == pytest.approx(-1.0 - 1 - 1.0)
    base = geo.filter(pl.col("step") == 0)
    # Step 0 reads the base cell's carriers in both arms.
    assert base.get_column("bypass").to_list() == pytest.approx([-2.0, -2.0])

    inter = pl.from_arrow(read_table(tables / "interventions.parquet"))
    row = inter.filter((pl.col("arm") == "sft") & (pl.col("step") == 10)).row(0, named=True)
    assert row["ablation:refusal_delta"] == pytest.approx(0.2 - 0.9)
    assert row["addition x2:refusal_delta"] == pytest.approx(0.1)
    assert row["rank-2 ablation:kl"] == pytest.approx(0.9)
    assert row["ablation:utility_delta"] == pytest.approx(-0.05)
    assert not [c for c in inter.columns if c.startswith("rank-1")]

    verdict = pl.from_arrow(read_table(tables / "verdict.parquet"))
    assert dict(verdict.select(["arm", "verdict"]).rows()) == {
        "sft": "stable",
        "r2d2": "undetermined",
    }
    text = format_summary(str(out))
    assert "verdict: sft: stable, r2d2: undetermined" in text
    assert len(text.splitlines()) < 30


def test_the_verdict_line_carries_the_tables_qualification():
    from rgeom.report import verdict_line

    rows = [
        {
            "arm": "sft",
            "verdict": "stable",
            "admissible": False,
            "basis": "cross_anchor",
            "detail": "transfer 0.9; geometry: undetermined (carrier found at 0 of 3 anchors)",
        },
        {"arm": "r2d2", "verdict": "rotation", "admissible": True, "detail": "angle 50 deg"},
        {"arm": "dpo", "verdict": "undetermined", "admissible": None, "detail": "no carrier"},
    ]
    assert verdict_line(rows) == (
        "verdict: sft: stable (no admissible carrier; geometry undetermined), "
        "r2d2: rotation, dpo: undetermined"
    )


def test_paper_columns_beside_the_run_on_the_paper_anchors(tmp_path):
    metrics = []
    for arm, step, asr in (("base", 0, 0.9), ("sft", 250, 0.4), ("r2d2", 250, 0.05)):
        metrics.append(_metrics_file(tmp_path / f"m_{arm}_{step}.parquet", arm, step, asr))
    out = tmp_path / "s"
    params = {"arms": ARMS, "anchors": list(PAPER_ANCHORS)}
    build_summary(SummaryInputs(metrics, []), str(out), params, {})
    df = pl.from_arrow(read_table(out / "tables" / "behaviour.parquet"))
    paper = {(r["arm"], r["step"]): r for r in df.iter_rows(named=True)}
    assert paper[("r2d2", 250)]["paper:harmbench.asr"] == "0.035"
    assert paper[("r2d2", 250)]["paper:xstest.xstest_any_refusal"] == "0.664"
    assert paper[("sft", 250)]["paper:harmbench.asr"] == "0.505–0.588"
    assert paper[("sft", 0)]["paper:harmbench.asr"] is None
    assert paper[("r2d2", 250)]["harmbench.asr"] == pytest.approx(0.05)
    md = (out / "tables" / "behaviour.md").read_text()
    # Without attack methods the run's ASR is plain HarmBench ASR, and the paper column
    # names the column it sits beside.
    assert "| paper, beside HarmBench ASR |" in md and "0.505–0.588" in md
    tex = (out / "tables" / "behaviour.tex").read_text()
    assert "0.505--0.588" in tex


def test_asr_per_method_is_the_headline_and_pooled_a_labelled_extra(tmp_path):
    rows = {k: [] for k in METRIC_SCHEMA.names}
    for arm, step in (("base", 0), ("sft", 250)):
        for metric, value in (
            ("asr", 0.5),
            ("asr/DirectRequest", 0.2),
            ("asr/Templates", 0.7),
            ("asr_category/chem", 0.4),
        ):
            for k, v in zip(
                METRIC_SCHEMA.names,
                (arm, step, "harmbench", metric, value, value, value, 5, "refusal_matcher"),
                strict=True,
            ):
                rows[k].append(v)
    path = tmp_path / "m.parquet"
    write_table(path, pa.table(rows), METRIC_SCHEMA, {})
    out = tmp_path / "s"
    params = {"arms": ARMS, "anchors": list(PAPER_ANCHORS)}
    build_summary(SummaryInputs([str(path)], []), str(out), params, {})
    md = (out / "tables" / "behaviour.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| arm"))
    heads = [h.strip() for h in header.strip("|").split("|")]
    # Per-method ASR first (the headline), then the pooled number under its own label, and
    # the paper's one ASR per anchor beside the column its header names.
    assert heads[2:6] == [
        "HarmBench ASR, DirectRequest",
        "HarmBench ASR, Templates",
        "pooled ASR, all test cases (extra)",
        "paper, beside pooled ASR, all test cases (extra)",
    ]
    assert "weighs k times" in md
    text = format_summary(str(out))
    shown = text.splitlines()[1].split()
    assert shown[2:5] == ["harmbench.asr/DirectRequest", "harmbench.asr/Templates", "harmbench.asr"]


def test_the_paper_reference_is_the_briefs_numbers():
    assert [paper_value("harmbench.asr", "r2d2", s).low for s in (50, 100, 250, 500)] == [
        0.0,
        0.0,
        0.035,
        0.25,
    ]
    assert paper_value("adaptive_gcg.asr", "r2d2", 500).low == 0.613
    assert paper_value("adaptive_gcg.asr", "r2d2", 250).low == 0.415
    xs = [paper_value("xstest.xstest_any_refusal", "r2d2", s) for s in PAPER_ANCHORS]
    assert [x.low for x in xs if x] == [1.0, 0.664, 0.228]
    assert set(PAPER_REFERENCE["erank_energy"].values()) == {paper_value("erank_energy", "sft", 0)}
    assert paper_value("harmbench.asr", "sft", 999) is None


def test_tex_escape_handles_latex_specials():
    assert tex_escape("a_b & 50% #1 ≈ x–y") == "a\\_b \\& 50\\% \\#1 $\\approx$ x--y"


def test_geometry_and_intervention_figures_are_drawn(tmp_path):
    out = _summary_with_geometry(tmp_path)
    figs = out / "figures"
    for name in (
        "carrier_heatmaps",
        "carrier_layer_vs_step",
        "erank_vs_step",
        "principal_angles",
        "frontier_sft",
        "frontier_r2d2",
        "asr_vs_step",
        "xstest_vs_step",
    ):
        svg = (figs / f"{name}.svg").read_text()
        assert "no input" not in svg, name
        assert (figs / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # The heatmap marks the sft carrier (a star) and the arms' fixed colours are used.
    assert "#0072b2" in (figs / "asr_vs_step.svg").read_text().lower()
    assert "#d55e00" in (figs / "asr_vs_step.svg").read_text().lower()


def test_a_drift_table_without_its_columns_is_named(tmp_path):
    metrics, directions = _inputs(tmp_path)
    carriers, drift_dir, interventions = _geometry_inputs(tmp_path)
    bad = Path(drift_dir) / "drift.parquet"
    write_table(bad, pa.table({"arm": ["sft"]}), pa.schema([("arm", pa.string())]), {})
    with pytest.raises(RgeomError, match=r"drift\.parquet.*'step'"):
        build_summary(
            SummaryInputs(
                metrics,
                directions,
                carriers=carriers,
                drift_dir=Path(drift_dir),
                interventions=interventions,
            ),
            str(tmp_path / "s"),
            {"arms": ARMS},
            {},
        )


def test_drift_and_intervention_figures_are_copied_when_fresh_else_redrawn(tmp_path):
    import os

    metrics, directions = _inputs(tmp_path)
    carriers, drift_dir, interventions = _geometry_inputs(tmp_path)
    fresh = Path(drift_dir) / "figures" / "principal_angles"
    stale = Path(interventions).parent / "frontier_sft"
    for stem in (fresh, stale):
        stem.parent.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "svg"):
            stem.with_suffix(f".{ext}").write_bytes(b"drawn by the stage " + ext.encode())
    old = Path(interventions).stat().st_mtime - 60
    for ext in ("png", "svg"):
        os.utime(stale.with_suffix(f".{ext}"), (old, old))
    out = tmp_path / "summary"
    build_summary(
        SummaryInputs(
            metrics,
            directions,
            carriers=carriers,
            drift_dir=Path(drift_dir),
            interventions=interventions,
        ),
        str(out),
        {"arms": ARMS},
        {},
    )
    figs = out / "figures"
    assert (figs / "principal_angles.svg").read_bytes() == b"drawn by the stage svg"
    assert (figs / "principal_angles.png").read_bytes() == b"drawn by the stage png"
    # Older than its table: drawn again. No source at all (carrier layers): drawn.
    assert (figs / "frontier_sft.png").read_bytes()[:4] == b"\x89PNG"
    assert (figs / "carrier_layer_vs_step.png").read_bytes()[:4] == b"\x89PNG"


def _captured_figure(monkeypatch):
    """Patch the one figure writer every plotting module calls, to keep the figure."""
    import rgeom.plotstyle

    kept = []
    monkeypatch.setattr(
        rgeom.plotstyle, "save_figure", lambda fig, stem, formats: kept.append(fig) or []
    )
    return kept


def test_bypass_and_induce_share_one_scale_centred_on_zero(tmp_path, monkeypatch):
    from rgeom import figures, tables

    carriers, _, _ = _geometry_inputs(tmp_path)
    kept = _captured_figure(monkeypatch)
    figures.plot_carrier_heatmaps(tables.read_carriers(carriers), ARMS, tmp_path / "h", ["png"])
    images = {ax.get_title(): ax.get_images()[0] for ax in kept[0].axes if ax.get_images()}
    # bypass spans -1 .. -6, induce 0 .. 1.5: one shared span of 6 about 0.
    for title in ("sft: bypass", "sft: induce", "r2d2: bypass", "r2d2: induce"):
        norm = images[title].norm
        assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((-6.0, 0.0, 6.0)), title
    assert images["sft: kl"].norm.vmin == 0.0


def test_carrier_layer_figure_marks_no_admissible_carrier_not_the_max_norm_layer(
    tmp_path, monkeypatch
):
    from rgeom.drift import plot_carrier_layers

    _, drift_dir, _ = _geometry_inputs(tmp_path)
    kept = _captured_figure(monkeypatch)
    plot_carrier_layers(
        read_table(Path(drift_dir) / "drift.parquet"), ARMS, LAYERS, tmp_path / "c", []
    )
    (ax,) = kept[0].axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "none"
    none_y = ax.get_yticks()[0]
    points = np.concatenate(
        [line.get_xydata() for line in ax.get_lines()] + [c.get_offsets() for c in ax.collections]
    )
    points = points[np.isfinite(points).all(axis=1)]
    # sft: the carrier at layer 2 for steps 10 and 20; r2d2 (none admissible, max-norm
    # layer 1): every anchor on the "none" row and nothing at layer 1. Step 0 has none.
    drawn = {(int(x), float(y)) for x, y in points if y != 0 or x != 0}
    assert {(10, 2.0), (20, 2.0)} <= drawn
    assert {(0, none_y), (10, none_y), (20, none_y)} <= drawn
    assert not [p for p in drawn if p[1] == 1.0]


def test_principal_angles_within_the_bootstrap_noise_are_hatched(tmp_path, monkeypatch):
    from matplotlib.patches import Rectangle

    from rgeom.drift import ANGLES_SCHEMA
    from rgeom.figures import plot_angles

    rows = [
        {"arm_a": "sft", "step_a": s, "arm_b": "base", "step_b": 0, "relation": "step0",
         "basis": "carrier", "k": 1, "index": 1, "angle_deg": a, "noise_deg": e}
        for s, a, e in ((10, 30.0, 35.0), (20, 60.0, 10.0))
    ]  # fmt: skip
    path = tmp_path / "drift" / "angles.parquet"
    write_table(path, _fill(ANGLES_SCHEMA, rows), ANGLES_SCHEMA, {})
    kept = _captured_figure(monkeypatch)
    plot_angles(str(path), ["sft"], tmp_path / "angles", [])
    ax = kept[0].axes[0]
    hatched = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    # sft@10 vs base@0, both ways round: 30 deg inside a 35 deg noise band.
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in hatched) == [(0, 1), (1, 0)]
    texts = {t.get_text() for t in ax.texts}
    assert {"30\n±35", "60\n±10"} <= texts


def test_erank_figure_has_its_band_and_null_and_a_sane_y_axis(tmp_path, monkeypatch):
    from matplotlib.collections import PolyCollection

    from rgeom.figures import ERANK_MIN_SPAN, plot_erank

    _, drift_dir, _ = _geometry_inputs(tmp_path)
    kept = _captured_figure(monkeypatch)
    plot_erank(str(Path(drift_dir) / "drift.parquet"), ARMS, {}, tmp_path / "e", [])
    (ax,) = kept[0].axes  # one panel: the variant that has a band and a null
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 * len(ARMS)  # per arm: the 95% band and the null ± 2 sd
    assert sum(bool(c.get_hatch()) for c in bands) == len(ARMS)
    low, high = ax.get_ylim()
    assert high - low >= ERANK_MIN_SPAN  # values 1.1-1.5 do not fill the axis edge to edge
