"""The .test/ workflow through `snakemake --profile profiles/slurm-ci` on a real SLURM.

.ci/run starts a single-node SLURM (.ci/slurm/start.sh: munged, MariaDB + slurmdbd,
slurmctld, slurmd) and exports RGEOM_REQUIRE_SLURM=1, so in CI these tests fail when
`sinfo` does not answer; elsewhere they are skipped with the reason. To run them locally:

    .ci/slurm/start.sh && RGEOM_REQUIRE_SLURM=1 pytest tests/test_slurm.py; .ci/slurm/stop.sh
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from dagrun import REPO, env, failure_report, snakemake

from rgeom.config import load
from rgeom.io import read_table

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles" / "slurm-ci"
RETRY_SNAKEFILE = REPO / "tests" / "workflows" / "retry" / "Snakefile"
CFG = load(REPO / ".test" / "config.yaml")
CELLS = [("base", 0)] + [(a, s) for a in CFG["arms"] for s in CFG["anchors"] if s > 0]
#: Every measured cell's metrics and directions, plus the retry probe: the per-cell jobs
#: (prepare, train, generate, judge, extract, directions; about 37 SLURM jobs). The
#: attacks, carriers, interventions and drift rules run in test_workflow's local run; set
#: RGEOM_SLURM_TARGETS=all to submit the whole DAG (about 65 jobs).
TARGETS = [
    f"results/{arm}/step-{step:06d}/{name}"
    for arm, step in CELLS
    for name in [f"metrics/{b}.parquet" for b in CFG["benchmarks"]] + ["directions.parquet"]
] + ["results/ci/flaky_once.txt"]
if os.environ.get("RGEOM_SLURM_TARGETS") == "all":
    TARGETS = ["all", "results/ci/flaky_once.txt"]


def _slurm_answers() -> str | None:
    """None when sinfo answers, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not installed (start a CI SLURM with .ci/slurm/start.sh)"
    try:
        res = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 15 s"
    if res.returncode != 0:
        return f"sinfo failed: {res.stderr.strip()} (start one with .ci/slurm/start.sh)"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    why = _slurm_answers()
    if why is None:
        return
    if os.environ.get("RGEOM_REQUIRE_SLURM") == "1":
        pytest.fail(f"RGEOM_REQUIRE_SLURM=1 but no SLURM: {why}")
    pytest.skip(f"no SLURM here: {why}; set RGEOM_REQUIRE_SLURM=1 to make this an error")


def sacct_jobs(since: str) -> list[dict]:
    res = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", since, "-o", "JobID,JobName,State,ExitCode,Comment%400"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    keys = ("id", "name", "state", "exit", "comment")
    return [dict(zip(keys, line.split("|", 4), strict=True)) for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    since = (datetime.now() - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.monotonic()
    res = snakemake(
        workdir,
        "--profile",
        PROFILE,
        *TARGETS,
        snakefile=RETRY_SNAKEFILE,
        cores=None,
        timeout=1500,
    )
    elapsed = time.monotonic() - t0
    if res.returncode != 0:
        pytest.fail(failure_report(res, workdir))
    jobs = [j for j in sacct_jobs(since) if j["name"].startswith("rgeomci_")]
    print(f"SLURM run: {len(jobs)} SLURM jobs in {elapsed:.0f} s")
    return workdir, jobs, res


def by_rule(jobs, rule):
    prefix = f"rule_{rule}_wildcards_"
    return [j for j in jobs if j["comment"].startswith(prefix) or j["comment"] == f"rule_{rule}"]


def test_each_cell_is_its_own_slurm_job(slurm_run):
    workdir, jobs, _ = slurm_run
    n_bench = len(CFG["benchmarks"])
    expected = {
        "generate": len(CELLS) * n_bench,
        "judge": len(CELLS) * n_bench,
        "extract_activations": len(CELLS),
        "directions": len(CELLS),
        # One training segment per (arm, trained anchor).
        "train": len(CFG["arms"]) * len([s for s in CFG["anchors"] if s > 0]),
    }
    for rule, n in expected.items():
        ran = by_rule(jobs, rule)
        assert len(ran) == n, f"{rule}: {len(ran)} SLURM jobs, want {n}: {ran}"
        assert {j["state"] for j in ran} == {"COMPLETED"}, ran
        assert len({j["comment"] for j in ran}) == n, "one job per wildcard combination"
        for j in ran:  # the plugin's per-job log, kept by slurm-keep-successful-logs
            logs = list(
                (workdir / ".snakemake" / "slurm_logs").glob(f"rule_{rule}/*/{j['id']}.log")
            )
            logs += list((workdir / ".snakemake" / "slurm_logs").glob(f"rule_{rule}/{j['id']}.log"))
            assert logs, f"no slurm log for {rule} job {j['id']}"
    for arm, step in CELLS:
        for bench in CFG["benchmarks"]:
            wc = f"rule_generate_wildcards_{arm}_{step:06d}_{bench}"
            assert any(j["comment"] == wc for j in jobs), wc
    assert len(by_rule(jobs, "prepare_data")) == len(CFG["data"]["sets"])


def test_a_failed_job_is_retried_and_the_workflow_completes(slurm_run):
    workdir, jobs, _ = slurm_run
    retries = yaml.safe_load((PROFILE / "config.yaml").read_text())["retries"]
    flaky = sorted(by_rule(jobs, "flaky_once"), key=lambda j: int(j["id"]))
    assert [j["state"] for j in flaky] == ["FAILED", "COMPLETED"], flaky
    # The jobstep's inner snakemake reports the shell's exit 3 as its own exit 1.
    assert flaky[0]["exit"] != "0:0" and len(flaky) == retries + 1
    assert (workdir / "results" / "ci" / "flaky_once.failed").read_text().strip() == flaky[0]["id"]
    assert flaky[1]["id"] in (workdir / "results" / "ci" / "flaky_once.txt").read_text()
    for target in TARGETS[:-1]:
        assert target == "all" or (workdir / target).exists(), target


def test_slurm_outputs_match_a_local_run(slurm_run, finished_run):
    workdir, _, _ = slurm_run
    ran = sorted(p.relative_to(workdir) for p in (workdir / "results").rglob("*.parquet"))
    assert len(ran) >= len(TARGETS) - 1
    differ = []
    for rel in ran:
        a, b = read_table(finished_run / rel), read_table(workdir / rel)
        assert a.schema.equals(b.schema), rel
        assert a.num_rows == b.num_rows, rel
        if "generations" in rel.parts or "metrics" in rel.parts or "judgements" in rel.parts:
            cols = [c for c in a.column_names if c not in ("seconds", "tokens_per_s")]
            if a.select(cols).to_pylist() != b.select(cols).to_pylist():
                differ.append(str(rel))
    # Greedy generation on CPU is deterministic: the same text, labels and metrics.
    assert not differ, f"differ from the local run: {differ}"


def test_check_profile_accepts_the_ci_profile():
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "check-profile", str(PROFILE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "ok against SLURM partitions ci" in res.stdout


def _bad_profile(tmp_path, edit) -> Path:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    edit(profile)
    out = tmp_path / "bad-profile"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(profile))
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p["set-resources"]["generate"].update(slurm_partition="gpu-a100"),
            "partition 'gpu-a100' (rules generate) is not known to SLURM (sinfo lists: ci)",
        ),
        (
            lambda p: p["set-resources"]["train"].update(runtime=600),
            "rule train: runtime=600 min exceeds the time limit of partition 'ci' (60 min)",
        ),
        (
            lambda p: p["set-resources"]["train"].update(mem_mb=10_000_000),
            "rule train: mem_mb=10000000 exceeds the",
        ),
        (
            lambda p: p["set-resources"]["generate"].update(gpu=1),
            "rule generate: gpu=1 exceeds the 0 GPUs",
        ),
    ],
    ids=["unknown-partition", "runtime", "memory", "gpu"],
)
def test_bad_profiles_fail_before_anything_is_submitted(tmp_path, edit, message):
    bad = _bad_profile(tmp_path, edit)
    check = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "check-profile", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=120,
    )
    assert check.returncode == 1 and message in check.stderr, check.stderr
    # The same check runs in the Snakefile's onstart: snakemake stops before any sbatch.
    since = (datetime.now() - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S")
    work = tmp_path / "work"
    res = snakemake(work, "--profile", bad, cores=None, timeout=600)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert not [j for j in sacct_jobs(since) if j["name"].startswith("rgeomci_")]
    assert not (work / "results").exists() or not any((work / "results").rglob("*.parquet"))
