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


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run as {rule: count}."""
    lines = dry_run_output[dry_run_output.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def finished_run(repo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    res = snakemake(repo_root, workdir)
    if res.returncode != 0:
        logs = workdir / "results" / "logs"
        tails = []
        for log in sorted(logs.rglob("*.log")) if logs.exists() else []:
            tails.append(f"== {log}\n{log.read_text()[-2000:]}")
        pytest.fail(f"snakemake failed:\n{res.stderr[-4000:]}\n" + "\n".join(tails))
    return workdir


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


@pytest.mark.slow
def test_editing_the_judge_reruns_only_judging(finished_run, repo_root, tmp_path):
    cfg_text = (repo_root / ".test" / "config.yaml").read_text()
    edited = tmp_path / "edited.yaml"
    edited.write_text(cfg_text.replace("bootstrap: 100", "bootstrap: 50"))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(
        [
            *SNAKEMAKE,
            "-n",
            "--snakefile",
            str(repo_root / "Snakefile"),
            "--directory",
            str(finished_run),
            "--configfile",
            str(edited),
            "--cores",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert job_counts(res.stdout) == {"judge": 9, "record_config": 1, "summary": 1, "all": 1}


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
