"""`rgeom status`, `rgeom compare` and the config record they rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from base64 import urlsafe_b64encode
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgeom.config import load
from rgeom.errors import RgeomError
from rgeom.io import canonical_json, write_table
from rgeom.report import summary_schema
from rgeom.stages.record_config import run as record_config
from rgeom.status import (
    compare_runs,
    config_diff,
    format_compare,
    format_status,
    status_rows,
)

RGEOM = [sys.executable, "-m", "rgeom.cli"]
SCHEMA = pa.schema([pa.field("x", pa.int64())])


def run(*args, cwd=None):
    return subprocess.run([*RGEOM, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def cfg(repo_root):
    return load(repo_root / ".test" / "config.yaml")


def _table(path: Path, rows: int = 3) -> None:
    write_table(path, pa.table({"x": list(range(rows))}), SCHEMA, {"arm": "base"})


def _by_key(rows):
    return {(r.arm, r.step, r.artefact, r.benchmark): r for r in rows}


# --- status -------------------------------------------------------------------------


def test_an_empty_results_folder_is_all_missing(cfg, tmp_path):
    rows = status_rows(cfg, tmp_path / "results")
    # base + sft at 2 trained anchors; per cell a model, 3 x 3 benchmark tables,
    # activations, directions, carriers, interventions, cross-anchor transfer, adaptive GCG
    # and the utility audit (both on in .test/config.yaml).
    assert cfg["attacks"]["adaptive"]["enabled"] and cfg["utility_shift"]["enabled"]
    cells = 1 + len(cfg["arms"]) * 2
    per_cell = 1 + 3 * 3 + 5 + 2
    # Run level: the config record, every data set, the attack test cases, drift's three
    # tables, the interventions summary and the summary.
    run_level = 1 + len(cfg["data"]["sets"]) + 1 + 3 + 1 + 1
    assert len(rows) == cells * per_cell + len(cfg["arms"]) + run_level
    kinds = {r.artefact for r in rows}
    assert {"carriers", "interventions", "cross_anchor", "adaptive_gcg", "utility_shift"} <= kinds
    assert {"drift verdict", "attacks test_cases", "interventions summary"} <= kinds
    assert {r.state for r in rows} == {"missing"}
    assert {(r.arm, r.step) for r in rows if r.step is not None} == {
        ("base", 0),
        ("sft", 2),
        ("sft", 4),
    }


def test_status_tells_done_running_invalid_and_missing(cfg, tmp_path):
    results = tmp_path / "results"
    cell = results / "base" / "step-000000"
    for bench in cfg["benchmarks"]:
        _table(cell / "metrics" / f"{bench}.parquet")
    _table(cell / "directions.parquet")
    (results / "model" / "base").mkdir(parents=True)
    (results / "model" / "base" / "config.json").write_text("{}")
    # What rgeom.io.atomic_path leaves beside the target while a stage writes it.
    (cell / "generations").mkdir(parents=True)
    (cell / "generations" / ".xstest.parquet.k2j3.parquet.tmp").write_bytes(b"")
    (cell / "activations.parquet").write_bytes(b"not parquet")
    # A table whose stored row count disagrees with its contents: truncated or foreign.
    lying = pa.table({"x": [1, 2, 3]}).replace_schema_metadata(
        {b"rgeom": canonical_json({"num_rows": 5}).encode()}
    )
    (results / "sft").mkdir(parents=True)
    pq.write_table(lying, results / "sft" / "train_log.parquet")

    rows = _by_key(status_rows(cfg, results))
    assert rows[("base", 0, "metrics", "xstest")].state == "done"
    assert rows[("base", 0, "directions", None)].state == "done"
    assert rows[("base", 0, "model", None)].state == "done"
    running = rows[("base", 0, "generations", "xstest")]
    assert running.state == "running" and ".xstest.parquet.k2j3.parquet.tmp" in running.detail
    assert rows[("base", 0, "generations", "harmbench")].state == "missing"
    bad = rows[("base", 0, "activations", None)]
    assert bad.state == "invalid" and "activations.parquet" in bad.detail
    log = rows[("sft", None, "train_log", None)]
    assert log.state == "invalid" and "3 rows" in log.detail and "5" in log.detail
    assert rows[("sft", 2, "model", None)].state == "missing"

    text = format_status(list(rows.values()), results)
    base_line = next(line for line in text.splitlines() if line.startswith("base"))
    assert base_line.split()[:3] == ["base", "0", "done"]
    assert "0/3 (1 running)" in text
    assert "running:" in text and str(cell / "generations" / "xstest.parquet") in text
    assert "invalid:" in text and "train_log.parquet" in text


def test_snakemake_markers_mean_running_or_incomplete(cfg, tmp_path):
    results = tmp_path / "results"
    target = "results/sft/train_log.parquet"
    incomplete = tmp_path / ".snakemake" / "incomplete"
    incomplete.mkdir(parents=True)
    (incomplete / urlsafe_b64encode(target.encode()).decode()).write_text("{}")

    rows = _by_key(status_rows(cfg, results))
    assert rows[("sft", None, "train_log", None)].state == "incomplete"
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir()
    (locks / "0.output.lock").write_text("")
    rows = _by_key(status_rows(cfg, results))
    assert rows[("sft", None, "train_log", None)].state == "running"


def test_status_command_prints_the_table_and_exits_0(repo_root, tmp_path):
    res = run("status", "--config", str(repo_root / ".test" / "config.yaml"), "--results", "r")
    assert res.returncode == 0, res.stderr
    assert "generations" in res.stdout and "total:" in res.stdout and "missing" in res.stdout


def test_status_names_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("anchors: [0, 5, 3]\n")
    res = run("status", "--config", str(bad))
    assert res.returncode == 1
    assert "bad.yaml" in res.stderr and "anchors" in res.stderr


# --- compare ------------------------------------------------------------------------


def _summary(results: Path, asr=(0.5, 0.25), norm=(3.0, 4.0)) -> None:
    frame = pl.DataFrame(
        {
            "arm": ["sft", "sft"],
            "step": pl.Series([0, 10], dtype=pl.Int32),
            "harmbench.asr": list(asr),
            "harmbench.asr_ci_low": [0.1, 0.1],
            "harmbench.asr_ci_high": [0.9, 0.9],
            "harmbench.asr_n": pl.Series([8, 8], dtype=pl.Int32),
            "dir.max_norm_layer": pl.Series([1, 1], dtype=pl.Int16),
            "dir.max_norm": list(norm),
        }
    )
    write_table(
        results / "summary" / "summary.parquet", frame.to_arrow(), summary_schema(frame), {}
    )


def _record(results: Path, cfg: dict) -> None:
    record_config(str(results / "config.json"), cfg)


def test_identical_runs_give_all_zero_deltas(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        _summary(run_dir)
        _record(run_dir, cfg)
    rows, notes = compare_runs(a, b)
    assert notes == []
    # Value columns only: CIs and counts qualify a value, they are not compared.
    assert {r["metric"] for r in rows} == {"harmbench.asr", "dir.max_norm_layer", "dir.max_norm"}
    assert len(rows) == 2 * 3
    assert all(r["delta"] == 0 for r in rows)


def test_compare_reports_b_minus_a(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _summary(a, asr=(0.5, 0.25))
    _summary(b, asr=(0.5, 0.75))
    for run_dir in (a, b):
        _record(run_dir, cfg)
    rows, _ = compare_runs(a, b)
    row = next(r for r in rows if r["metric"] == "harmbench.asr" and r["step"] == 10)
    assert (row["a"], row["b"], row["delta"]) == (0.25, 0.75, 0.5)
    text = format_compare(rows)
    assert text.splitlines()[0].split() == [
        "arm", "step", "metric", "A", "[95%", "CI]", "B", "[95%", "CI]", "B-A"
    ]  # fmt: skip
    assert "+0.5000" in text
    # Each value with its bootstrap interval, as the summary stores it.
    assert "0.2500 [0.1000, 0.9000]" in text and "0.7500 [0.1000, 0.9000]" in text


def test_compare_changed_only_drops_the_values_that_agree(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _summary(a, asr=(0.5, 0.25))
    _summary(b, asr=(0.5, 0.75))
    for run_dir in (a, b):
        _record(run_dir, cfg)
    rows, _ = compare_runs(a, b)
    body = format_compare(rows, changed_only=True).splitlines()[1:]
    assert len(body) == 2, body  # the one changed value, then the count of the rest
    assert body[0].split()[:3] == ["sft", "10", "harmbench.asr"]
    assert body[1] == f"({len(rows) - 1} unchanged value(s) not shown)"
    res = run("compare", str(a), str(b), "--changed-only")
    assert res.returncode == 0, res.stderr
    assert "harmbench.asr" in res.stdout and "dir.max_norm" not in res.stdout


def test_compare_two_config_files_names_the_keys_with_defaults_filled(repo_root, tmp_path):
    spelled = tmp_path / "spelled.yaml"
    # The embedded config with a default spelled out and one real change.
    text = (repo_root / "config" / "config.yaml").read_text()
    spelled.write_text(text.replace("anchors: [0, 6, 12]", "anchors: [0, 6, 9]") + "\nseed: 0\n")
    res = run("compare", str(repo_root / "config" / "config.yaml"), str(spelled))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(
        line.split() == ["anchors", "[0,", "6,", "12]", "->", "[0,", "6,", "9]"] for line in lines
    )
    assert lines[-1] == "1 key(s) differ"


def test_status_warns_when_results_came_from_another_model(cfg, tmp_path, repo_root):
    results = tmp_path / "results"
    other = json.loads(json.dumps(cfg))
    other["model"]["source"] = "hf"
    other["model"]["path"] = "someone/else"
    _record(results, other)
    res = run(
        "status", "--config", str(repo_root / ".test" / "config.yaml"), "--results", str(results)
    )
    assert res.returncode == 0, res.stderr
    warning = res.stdout.strip().splitlines()[-1]
    assert warning.startswith(f"warning: {results / 'config.json'} was made with another config")
    assert "another model" in warning and "model.path" in warning
    _record(results, cfg)
    res = run(
        "status", "--config", str(repo_root / ".test" / "config.yaml"), "--results", str(results)
    )
    assert "warning" not in res.stdout


def test_different_configs_are_refused_naming_the_keys(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _summary(a)
    _summary(b)
    _record(a, cfg)
    other = json.loads(json.dumps(cfg))
    other["train"]["max_steps"] = 8
    other["judge"]["bootstrap"] = 50
    _record(b, other)
    with pytest.raises(RgeomError, match=r"train\.max_steps: 4 vs 8") as err:
        compare_runs(a, b)
    assert "judge.bootstrap" in str(err.value) and "config.json" in str(err.value)
    # Differences the user declares intended are let through.
    rows, _ = compare_runs(a, b, ignore=["train.max_steps", "judge"])
    assert all(r["delta"] == 0 for r in rows)


def test_a_run_without_config_json_is_compared_with_a_warning(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _summary(a)
    _summary(b)
    _record(a, cfg)
    rows, notes = compare_runs(a, b)
    assert rows and len(notes) == 1
    assert "config.json" in notes[0] and "B" in notes[0] and "comparing anyway" in notes[0]


def test_compare_accepts_workflow_dirs_and_names_a_missing_summary(cfg, tmp_path):
    _summary(tmp_path / "a" / "results")
    _summary(tmp_path / "b")
    rows, _ = compare_runs(tmp_path / "a", tmp_path / "b")
    assert rows
    with pytest.raises(RgeomError, match="summary.parquet"):
        compare_runs(tmp_path / "a", tmp_path / "nowhere")


def test_compare_command_refuses_in_one_line(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _summary(a)
    _summary(b)
    _record(a, cfg)
    other = json.loads(json.dumps(cfg))
    other["train"]["max_steps"] = 8
    _record(b, other)
    res = run("compare", str(a), str(b))
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "train.max_steps" in errors[0]
    res = run("compare", str(a), str(b), "--ignore", "train.max_steps")
    assert res.returncode == 0, res.stderr
    assert "harmbench.asr" in res.stdout


def test_config_diff_walks_mappings_and_compares_lists_whole():
    a = {"train": {"max_steps": 4, "lr": 1}, "anchors": [0, 2], "only_a": 1}
    b = {"train": {"max_steps": 8, "lr": 1}, "anchors": [0, 4]}
    keys = [k for k, _, _ in config_diff(a, b)]
    assert keys == ["anchors", "only_a", "train.max_steps"]
    assert config_diff(a, a) == []


def test_record_config_fills_defaults_so_spelled_out_defaults_compare_equal(
    repo_root, tmp_path, cfg
):
    from rgeom.config import load_yaml

    raw = load_yaml(repo_root / ".test" / "config.yaml")
    record_config(str(tmp_path / "raw.json"), raw)
    record_config(str(tmp_path / "full.json"), cfg)
    stored = json.loads((tmp_path / "raw.json").read_text())
    assert stored == json.loads((tmp_path / "full.json").read_text())
    assert stored["judge"]["name"] == "refusal_matcher"  # a default, absent from the file


def test_record_config_names_an_invalid_key(tmp_path):
    with pytest.raises(RgeomError, match="anchors"):
        record_config(str(tmp_path / "c.json"), {"anchors": [3, 1]})
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("command", ["status", "compare", "record-config"])
def test_help_shows_an_example(command):
    res = run(command, "--help")
    assert res.returncode == 0
    assert "example:" in res.stdout and f"rgeom {command}" in res.stdout


# --- the real workflow --------------------------------------------------------------


def _snakemake(repo, workdir, *args, config=None, timeout=1800):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(repo / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config or repo / ".test" / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(repo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    res = _snakemake(repo_root, workdir)
    if res.returncode != 0:
        pytest.fail(f"snakemake failed:\n{res.stderr[-4000:]}")
    return workdir


@pytest.mark.slow
def test_a_finished_run_is_all_done_and_compares_equal_to_itself(finished_run, repo_root, cfg):
    results = finished_run / "results"
    rows = status_rows(cfg, results)
    assert {r.state for r in rows} == {"done"}, [r for r in rows if r.state != "done"]
    recorded = json.loads((results / "config.json").read_text())
    assert config_diff(recorded, cfg) == []
    rows, notes = compare_runs(results, finished_run)
    assert rows and notes == []
    assert all(r["delta"] in (0, None) for r in rows)


@pytest.mark.slow
def test_the_report_embeds_the_figures(finished_run, repo_root, tmp_path):
    html = tmp_path / "report.html"
    res = _snakemake(repo_root, finished_run, "--report", str(html), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    text = html.read_text()
    for name in ("metrics_vs_step.png", "direction_norm_heatmap.png", "train_loss.png"):
        assert f"filename={name};base64,iVBORw0KGgo" in text
    assert "unweighted" in text  # the summary caption's metric definitions


@pytest.mark.slow
def test_editing_the_judge_rewrites_the_config_record(finished_run, repo_root, tmp_path):
    edited = tmp_path / "edited.yaml"
    edited.write_text(
        (repo_root / ".test" / "config.yaml").read_text().replace("bootstrap: 100", "bootstrap: 50")
    )
    res = _snakemake(repo_root, finished_run, "-n", config=edited)
    assert res.returncode == 0, res.stderr
    assert "record_config" in res.stdout and "judge" in res.stdout
