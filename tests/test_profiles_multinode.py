"""The multi-node training route (docs/cluster.md): one rank per SLURM task under srun.

The plugin's convention for multi-task jobs: ``mpi`` in a rule's resources makes the job
step run the rule's shell command directly, and the command starts its tasks with
``{resources.mpi}``. These tests pin the sbatch line and the launcher, map SLURM's task
variables the way srun sets them, and run a 2-rank gloo rendezvous of a tiny training job
started exactly as srun starts each task (one process per task, SLURM_* variables set).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from dagrun import REPO
from test_deepspeed import sft_data  # noqa: F401 (the fixture: 16 SFT rows)
from train_cmd import train_args

from rgeom.errors import RgeomError
from rgeom.profiles import check_conventions, sbatch_line
from rgeom.slurm_rank import first_host, launcher, rank_env

#: The profile entry docs/cluster.md gives for two 4-GPU nodes (train.num_gpus: 8).
MULTI_NODE = {
    "slurm_partition": "gpu",
    "gpu": 8,
    "nodes": 2,
    "tasks": 8,
    "tasks_per_gpu": 1,
    "mpi": "srun",
    "cpus_per_gpu": 8,
    "mem_mb": 480000,
    "runtime": 720,
}


def test_the_plugin_builds_one_task_per_gpu_over_two_nodes():
    line = sbatch_line("train", MULTI_NODE).split()
    assert "--nodes=2" in line and "--gpus=8" in line and "--ntasks=8" in line
    assert "--ntasks-per-gpu=1" in line and "--cpus-per-gpu=8" in line
    assert not [a for a in line if a.startswith("--cpus-per-task")]
    cfg = {"model": {"device": "cuda"}, "train": {"num_gpus": 8}}
    assert check_conventions({"train": MULTI_NODE}, cfg) == []
    wrong = check_conventions({"train": {**MULTI_NODE, "tasks": 4}}, cfg)
    assert wrong == ["rule train: tasks=4 but train.num_gpus=8: srun starts one rank per task"]


def test_launchers():
    assert launcher(MULTI_NODE, 8) == ("srun -n 8 --kill-on-bad-exit=1 python -m rgeom.slurm_rank")
    assert launcher({"gpu": 4, "nodes": 1}, 4).startswith("torchrun --standalone")
    assert launcher({}, 1) == "rgeom"
    with pytest.raises(RgeomError, match="needs tasks"):
        launcher({"mpi": "srun"}, 8)


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu[003-004,007]", "gpu003"), ("node7", "node7"), ("a100-[12-13],b1", "a100-12")],
)
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_rank_env_from_srun_variables():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_ID": "4242",
    }
    got = rank_env(env)
    assert got["RANK"] == "5" and got["WORLD_SIZE"] == "8" and got["LOCAL_RANK"] == "1"
    assert got["LOCAL_WORLD_SIZE"] == "4" and got["MASTER_ADDR"] == "gpu003"
    assert got["MASTER_PORT"] == rank_env(env)["MASTER_PORT"]  # every rank agrees
    # --ntasks-per-gpu=1 binds one GPU per task: it is that task's device 0.
    assert rank_env({**env, "CUDA_VISIBLE_DEVICES": "1"})["LOCAL_RANK"] == "0"
    with pytest.raises(RgeomError, match="start this with srun"):
        rank_env({"SLURM_PROCID": "0"})


@pytest.mark.slow  # two processes, DeepSpeed init: about a minute
def test_two_srun_tasks_join_one_gloo_rendezvous_and_train(
    tmp_path,
    tiny_model_dir,
    sft_data,  # noqa: F811
):
    from test_deepspeed import _params

    from rgeom.io import read_table
    from rgeom.train.runner import TRAIN_LOG_SCHEMA, anchor_name, deepspeed_config_path

    params = _params(2)
    extra = ["--extra", f"deepspeed={deepspeed_config_path(2, False)}"]
    args = train_args(tmp_path, tiny_model_dir, sft_data, params, extra=extra)
    cmd = [sys.executable, "-m", "rgeom.slurm_rank", *args]
    procs = []
    for rank in range(2):  # what `srun -n 2` sets in each task
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_TASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": str(os.getpid()),
        }
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=900) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-5000:]
        # Read from torch's group, which training has left by then: the world really joined.
        assert f"rank {rank} of 2 (gloo) joined; exit 0" in err, err[-5000:]
    # Each rank blocks in init_process_group until the world of WORLD_SIZE=2 is complete, so
    # two clean exits mean both joined; the anchors are the run's, trained in that world.
    log = read_table(tmp_path / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert log["step"] == list(range(1, params["anchors"][-1] + 1))
    for step in params["anchors"][1:]:
        assert (tmp_path / "checkpoints" / anchor_name(step) / "model.safetensors").exists()


def test_the_train_rule_launches_srun_under_the_mpi_route(tmp_path):
    """A dry run of paper.yaml (8 GPUs) with the multi-node profile entry: train's shell
    command starts its ranks with srun, and check_conventions accepts it."""
    import yaml
    from test_profiles import PAPER, PROFILE, fake_fetched_data

    data = tmp_path / "data"
    fake_fetched_data(data)
    raw = yaml.safe_load(PAPER.read_text())
    raw["data"]["shared_dir"] = str(data)
    raw["train"]["num_gpus"] = 8
    cfg = tmp_path / "paper8.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile["executor"] = "local"  # no plugin needed to print the shell commands
    profile["set-resources"]["train"].update(MULTI_NODE)
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--profile", str(tmp_path / "profile")]
        + ["--configfile", str(cfg), "--snakefile", str(REPO / "Snakefile")]
        + ["--directory", str(tmp_path), "--cores", "1", "results/sft/checkpoints/step-000050"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "srun -n 8 --kill-on-bad-exit=1 python -m rgeom.slurm_rank train --arm sft" in (
        res.stdout
    ), res.stdout[-3000:]
