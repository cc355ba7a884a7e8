"""The multi-node training route of docs/cluster.md on a real SLURM: rule `train` under
the executor plugin's `mpi` route, one job of 2 tasks whose shell command starts
`srun -n 2 ... python -m rgeom.slurm_rank train`, and a 2-rank gloo rendezvous of a ZeRO-2
run of the tiny model on CPU.

test_profiles_multinode.py runs the same ranks with srun's variables set by hand; here
SLURM itself allocates the 2 tasks and srun starts them (on .ci/slurm/start.sh's single
node, so both tasks share one host). Skipped without SLURM unless RGEOM_REQUIRE_SLURM=1
(the fixture of test_slurm.py). To run it locally:

    .ci/slurm/start.sh && RGEOM_REQUIRE_SLURM=1 pytest tests/test_slurm_multitask.py
    .ci/slurm/stop.sh
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timedelta

import pytest
import yaml
from dagrun import REPO, failure_report, snakemake
from test_slurm import PROFILE, by_rule, sacct_jobs, slurm  # noqa: F401 (slurm: autouse)

pytestmark = pytest.mark.slow

ARM, STEP = "sft", 2
CHECKPOINT = f"results/{ARM}/checkpoints/step-{STEP:06d}"
TRAIN_LOG = f"results/logs/train/{ARM}-{STEP:06d}.log"
#: The docs' profile entry, at CI size: 2 ranks on the CI node's CPUs instead of 8 GPUs.
MPI_TRAIN = {"mpi": "srun", "tasks": 2, "cpus_per_task": 1, "mem_mb": 4000, "runtime": 20}
#: Its own job-name prefix: test_slurm.py counts the `rgeomci_` jobs of a time window, and a
#: train job of this file finishing inside it would be miscounted there (and vice versa).
PREFIX = "rgeomsrun"


def sacct_steps(job_id: str) -> list[dict]:
    res = subprocess.run(
        ["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,NTasks,State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    keys = ("id", "name", "ntasks", "state", "exit")
    return [dict(zip(keys, line.split("|"), strict=True)) for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def srun_train(tmp_path_factory):
    """The first training segment of the .test/ config (ZeRO-2, so 2 ranks really
    communicate), submitted through a copy of profiles/slurm-ci with the mpi route."""
    work = tmp_path_factory.mktemp("srun")
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["train"]["zero_stage"] = 2
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile["set-resources"]["train"] = MPI_TRAIN
    profile["slurm-jobname-prefix"] = PREFIX
    (work / "profile").mkdir()
    (work / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))

    with pytest.MonkeyPatch.context() as mp:
        # sbatch exports this environment to the job: one thread per rank on a small
        # node, and DeepSpeed on its CPU accelerator even where a CUDA build of torch is
        # installed (as test_deepspeed does).
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        # The segment's inputs locally, so the SLURM run is the train job alone.
        res = snakemake(
            work,
            "results/model/base",
            "results/data/sft_train.parquet",
            configfile=configfile,
            timeout=900,
        )
        if res.returncode != 0:
            pytest.fail(failure_report(res, work))
        since = (datetime.now() - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S")
        res = snakemake(
            work,
            "--profile",
            work / "profile",
            CHECKPOINT,
            configfile=configfile,
            cores=None,
            timeout=1200,
        )
    if res.returncode != 0:
        log = work / TRAIN_LOG
        extra = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        pytest.fail(failure_report(res, work) + f"\n== {TRAIN_LOG}\n{extra}")
    jobs = [j for j in sacct_jobs(since) if j["name"].startswith(f"{PREFIX}_")]
    return work, jobs, res


def test_the_train_job_is_one_slurm_job_with_a_two_task_srun_step(srun_train):
    work, jobs, res = srun_train
    assert len(jobs) == 1, f"want only the train job on SLURM: {jobs}"
    (train,) = by_rule(jobs, "train")
    assert train["state"] == "COMPLETED", train
    # The plugin's mpi route: the rule's command runs in the batch step itself (no
    # `srun -n1` wrapper), so its srun is a step of the job's own 2 tasks.
    steps = sacct_steps(train["id"])
    srun = [s for s in steps if re.fullmatch(rf"{train['id']}\.\d+", s["id"])]
    assert [(s["name"], s["ntasks"], s["state"]) for s in srun] == [("python", "2", "COMPLETED")], (
        steps
    )
    assert f"srun -n 2 --kill-on-bad-exit=1 python -m rgeom.slurm_rank train --arm {ARM}" in (
        res.stdout + res.stderr
    )


def test_both_ranks_joined_one_gloo_rendezvous(srun_train):
    work, _, _ = srun_train
    text = (work / TRAIN_LOG).read_text(errors="replace")
    started = re.findall(
        r"rgeom\.slurm_rank: task (\d+) on (\S+): rank (\d+) of (\d+), rendezvous (\S+)", text
    )
    assert sorted((t, r, w) for t, _, r, w, _ in started) == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ], text[-4000:]
    assert len({addr for *_, addr in started}) == 1, "both ranks wait at one address"
    # Printed after training from torch's process group: both ranks were in one world of 2.
    joined = re.findall(
        r"rgeom\.slurm_rank: rank (\d+) of (\d+) \((\w+)\) joined; exit (\d+)", text
    )
    assert sorted(joined) == [("0", "2", "gloo", "0"), ("1", "2", "gloo", "0")], text[-4000:]


def test_the_two_rank_segment_trained_to_its_anchor(srun_train):
    work, _, _ = srun_train
    assert (work / CHECKPOINT / "model.safetensors").exists()
    rows = (work / "results" / ARM / "train_state" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, STEP + 1))
