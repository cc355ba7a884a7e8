"""The real Snakemake DAG end to end on the .test/ config (a 2-layer random Llama)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rgeom.config import load
from rgeom.io import read_meta, read_table

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(repo, workdir, *args, timeout=1800):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        *SNAKEMAKE,
        "--snakefile",
        str(repo / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(repo / ".test" / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


# finished_run (tests/conftest.py): the whole .test/ workflow, run once per session.


@pytest.mark.slow
def test_the_whole_dag_runs(finished_run, repo_root):
    cfg = load(repo_root / ".test" / "config.yaml")
    results = finished_run / "results"
    summary = read_table(results / "summary" / "summary.parquet")
    assert summary.num_rows == len(cfg["arms"]) * len(cfg["anchors"])
    for name in ("summary.csv", "summary.md"):
        assert (results / "summary" / name).stat().st_size > 0
    for fig in ("metrics_vs_step.png", "direction_norm_heatmap.png"):
        assert (results / "summary" / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    cells = [("base", 0)] + [(a, s) for a in cfg["arms"] for s in cfg["anchors"] if s > 0]
    for arm, step in cells:
        cell = results / arm / f"step-{step:06d}"
        for bench in cfg["benchmarks"]:
            gen = read_table(cell / "generations" / f"{bench}.parquet")
            assert gen.num_rows > 0
            meta = read_meta(cell / "generations" / f"{bench}.parquet")
            assert meta["arm"] == arm and meta["step"] == step and meta["config_hash"]
            assert read_table(cell / "metrics" / f"{bench}.parquet").num_rows > 0
        directions = read_table(cell / "directions.parquet")
        assert directions.num_rows > 0
    for arm in cfg["arms"]:
        log = read_table(results / arm / "train_log.parquet")
        assert log.num_rows == cfg["train"]["max_steps"]


@pytest.mark.slow
def test_a_finished_run_is_a_no_op(finished_run, repo_root):
    res = snakemake(repo_root, finished_run, "-n")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
def test_checkpoints_load_without_rgeom(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = finished_run / "results" / "sft" / "checkpoints" / "step-000004"
    AutoModelForCausalLM.from_pretrained(ckpt)
    assert AutoTokenizer.from_pretrained(ckpt).chat_template


# Editing the judge, a carrier parameter or the anchors: tests/test_caching.py.


@pytest.mark.slow
def test_attack_test_cases_are_replayed_with_their_method(finished_run, repo_root):
    from rgeom.attacks.testcases import TEST_CASE_SCHEMA

    cfg = load(repo_root / ".test" / "config.yaml")
    results = finished_run / "results"
    cases = read_table(results / "attacks" / "test_cases.parquet", TEST_CASE_SCHEMA)
    methods = set(cases.column("method").to_pylist())
    assert methods == set(cfg["attacks"]["methods"])
    cells = [("base", 0)] + [(a, s) for a in cfg["arms"] for s in cfg["anchors"] if s > 0]
    for arm, step in cells:
        cell = results / arm / f"step-{step:06d}"
        gen = read_table(cell / "generations" / "harmbench.parquet")
        assert gen.column("method").to_pylist() == cases.column("method").to_pylist()
        assert gen.column("prompt").to_pylist() == cases.column("test_case").to_pylist()
        names = set(read_table(cell / "metrics" / "harmbench.parquet").column("metric").to_pylist())
        assert {f"asr/{m}" for m in methods} <= names
        adaptive = read_table(cell / "adaptive_gcg.parquet")
        assert adaptive.num_rows == cfg["attacks"]["adaptive"]["n_behaviors"]
        assert set(adaptive.column("arm").to_pylist()) == {arm}
    summary = read_table(results / "summary" / "summary.parquet")
    assert "adaptive_gcg.asr" in summary.column_names
    assert "harmbench.asr/GCG-transfer" in summary.column_names


@pytest.mark.slow
def test_editing_gcg_transfer_reruns_only_the_attack_and_its_replay(finished_run, tmp_path):
    import yaml
    from dagrun import REPO, job_counts
    from dagrun import snakemake as run_dag

    raw = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    raw["attacks"]["gcg"]["steps"] += 1
    cfg = tmp_path / "edited.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = run_dag(finished_run, "-n", configfile=cfg, cores="1", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    n_cells = 1 + len(raw["arms"]) * (len(raw["anchors"]) - 1)
    # Only the harmbench cells replay the new test cases: no other benchmark, no adaptive
    # GCG, no training or geometry reruns.
    assert counts == {
        "attack_gcg": 1,
        "attack_gcg_merge": 1,
        "test_cases": 1,
        "generate": n_cells,
        "judge": n_cells,
        "metrics": n_cells,
        "record_config": 1,
        "summary": 1,
        "publish_summary": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_judge_validation_and_utility_shift_run_in_the_dag(finished_run, repo_root):
    import math

    from rgeom.judges.validation import AGREEMENT_SCHEMA
    from rgeom.utility_shift import SHIFT_SCHEMA

    cfg = load(repo_root / ".test" / "config.yaml")
    results = finished_run / "results"
    agree = read_table(results / "validation" / "judge_agreement.parquet", AGREEMENT_SCHEMA)
    rows = {r["task"]: r for r in agree.to_pylist()}
    row = rows["xstest"]
    assert row["judge"] == "refusal_matcher" and row["n"] >= 40
    assert 0 < row["accuracy"] <= 1
    # builtin:rgeom also scores the configured ASR judge.
    assert rows["harmbench"]["judge"] == cfg["judge"]["harmbench"] == "harmfulness_judge"
    judges = read_table(results / "summary" / "tables" / "judges.parquet").to_pylist()
    # (adaptive GCG's own judge step keeps the matcher's rule, and says so)
    asr = {(r["benchmark"], r["judge"]) for r in judges if r["metric"] == "asr"}
    assert {j for b, j in asr if b != "adaptive_gcg"} == {"harmfulness_judge"}
    assert "Cohen's kappa" in (results / "validation" / "judge_validation.md").read_text()
    by_step = {
        r["step"]: r for r in read_table(results / "summary" / "summary.parquet").to_pylist()
    }
    # The reference: the base's harmless answers holding a token to score (a random tiny
    # model may answer only whitespace, which leaves nothing: then the values are NaN).
    ref = results / "base" / "step-000000" / "generations" / "utility.parquet"
    cap = read_meta(ref)["max_new_tokens"]
    expected_n = sum(
        r["label"] in ("harmless", "safe") and bool(r["completion"] or r["n_new_tokens"] < cap)
        for r in read_table(ref).to_pylist()
    )
    for step in cfg["anchors"]:
        arm = "base" if step == 0 else cfg["arms"][0]
        path = results / arm / f"step-{step:06d}" / "utility_shift.parquet"
        rows = read_table(path, SHIFT_SCHEMA).to_pylist()
        values = {r["metric"]: r["value"] for r in rows}
        assert {r["n"] for r in rows} == {expected_n}
        if not expected_n:
            assert math.isnan(values["utility_kl"]) and math.isnan(by_step[step]["utility_kl"])
            continue
        assert by_step[step]["utility_kl"] == values["utility_kl"]
        if step == 0:
            assert values["utility_kl"] == 0.0
            assert values["utility_ce"] == values["utility_ce_base"]
        else:
            assert values["utility_kl"] > 0


def test_bad_config_fails_before_any_job(repo_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("anchors: [0, 5, 3]\n")
    env = dict(os.environ)
    res = subprocess.run(
        [
            *SNAKEMAKE,
            "-n",
            "--snakefile",
            str(repo_root / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(bad),
            "--cores",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode != 0
    output = res.stdout + res.stderr
    assert "anchors" in output and "strictly increasing" in output
    assert not (tmp_path / "results").exists()
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
