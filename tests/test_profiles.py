"""profiles/slurm against config/paper.yaml on a fake GPU cluster, without SLURM.

A fake ``sinfo`` (and the ``sacct``/``squeue`` the SLURM plugin looks for at import) on
PATH stands in for a typical GPU cluster's login node; the paper config's data folder is
faked by copies of the upstream files at the paths it names.
``rgeom check-profile --configfile`` resolves every job's resources through Snakemake
itself, and the sbatch lines come from snakemake-executor-plugin-slurm's own builders.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagrun import REPO, env

from rgeom.config import dataset_file, load
from rgeom.errors import RgeomError
from rgeom.profiles import (
    by_rule_max,
    check_conventions,
    parse_dry_run,
    resolved_resources,
    sbatch_line,
)

PROFILE = REPO / "profiles" / "slurm"
PAPER = REPO / "config" / "paper.yaml"
#: `sinfo -h -e -o '%R|%c|%m|%l|%G|%D'` of a typical GPU cluster: a CPU partition, and a
#: GPU partition of 4 x A100-80GB and 8 x H100 nodes with a 24 h limit.
SINFO = """\
cpu*|64|256000|3-00:00:00|(null)|120
gpu|64|512000|1-00:00:00|gpu:a100:4(S:0-1)|24
gpu|96|1024000|1-00:00:00|gpu:h100:8(S:0-1)|8
"""


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """PATH with a fake login node's sinfo, sacct and squeue first."""
    bin_dir = tmp_path_factory.mktemp("fake-slurm")
    _script(bin_dir / "sinfo", f"cat <<'EOF'\n{SINFO}EOF\n")
    for name in ("sacct", "squeue"):  # no jobs yet
        _script(bin_dir / name, "exit 0\n")
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**env(), "PATH": path}


def _data_paths(cfg: dict) -> list[str]:
    """Every file under data.shared_dir the config reads."""
    paths = [s["path"] for s in cfg["data"]["sets"].values() if dataset_file(s, ".") is not None]
    paths += list(cfg["r2d2"]["behaviours"] or []) + list(cfg["r2d2"]["targets"] or [])
    paths += [cfg["attacks"]["gcg"]["targets"], cfg["validate"]["prompts"]]
    return [p for p in paths if p]


def fake_fetched_data(data: Path) -> None:
    """The files paper.yaml reads, copied into a fresh data folder as a fetch would lay them
    out. Copies, not empty files: config validation reads the prompt sets (the contamination
    check compares direction/validation prompts with the training behaviours)."""
    from conftest import SHARED_DATA

    for rel in _data_paths(load(PAPER)):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / rel, data / rel)


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """config/paper.yaml with data.shared_dir at a fake fetched-data folder."""
    root = tmp_path_factory.mktemp("paper")
    data = root / "data"
    fake_fetched_data(data)
    raw = yaml.safe_load(PAPER.read_text())
    raw["data"]["shared_dir"] = str(data)
    cfg = root / "paper.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    work = root / "work"
    work.mkdir()
    return cfg, work


@pytest.fixture(scope="module")
def jobs(cluster, paper, monkeypatch_module):
    cfg, work = paper
    monkeypatch_module.setenv("PATH", cluster["PATH"])
    return resolved_resources(PROFILE, cfg, REPO / "Snakefile", work)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def check_profile(profile, cfg, work, cluster):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rgeom.cli",
            "check-profile",
            str(profile),
            "--configfile",
            str(cfg),
            "--snakefile",
            str(REPO / "Snakefile"),
            "--rules",
            str(REPO / "workflow" / "rules"),
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=cluster,
        timeout=300,
    )


def test_paper_dry_run_with_the_slurm_profile(paper, cluster):
    cfg, work = paper
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", str(PROFILE)]
        + ["--configfile", str(cfg), "--snakefile", str(REPO / "Snakefile")],
        capture_output=True,
        text=True,
        cwd=work,
        env=cluster,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "This was a dry-run" in res.stdout


def test_check_profile_passes_the_shipped_profile_with_paper_yaml(paper, cluster):
    cfg, work = paper
    res = check_profile(PROFILE, cfg, work, cluster)
    assert res.returncode == 0, res.stderr
    assert "ok against SLURM partitions cpu, gpu" in res.stdout
    assert "resources as Snakemake resolves them" in res.stdout


def _mismatched(tmp_path, edit) -> Path:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    edit(profile)
    out = tmp_path / "mismatched"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(profile))
    return out


def _old_profile(p):
    # The profile before issue 16: judges on the CPU partition, cpus_per_task for every job,
    # no nodes, a 48 h training request, and a gpu that is not train.num_gpus.
    p["default-resources"]["cpus_per_task"] = 2
    del p["default-resources"]["nodes"]
    for rule in ("judge", "validate_judges", "adaptive_judge"):
        p["set-resources"][rule] = {"mem_mb": 2000, "runtime": 20}
    p["set-resources"]["train"].update(runtime=2880, gpu=2)


def test_check_profile_fails_on_a_mismatched_profile(tmp_path, paper, cluster):
    cfg, work = paper
    res = check_profile(_mismatched(tmp_path, _old_profile), cfg, work, cluster)
    assert res.returncode == 1, res.stdout
    err = res.stderr
    # The judges' gpu=1 comes from a callable on paper.yaml's judge devices.
    assert "rule judge: gpu=1 exceeds the 0 GPUs of the largest node in partition 'cpu'" in err
    assert "rule validate_judges: gpu=1 exceeds the 0 GPUs" in err
    assert "rule train: runtime=2880 min exceeds the time limit of partition 'gpu'" in err
    assert "rule generate: cpus_per_task=2 overrides cpus_per_gpu=8" in err
    assert "rule train: gpu=2 without nodes" in err
    assert "rule train: gpu=2 but train.num_gpus=8" in err


def test_resolved_resources_follow_paper_yaml(jobs):
    rules = by_rule_max(jobs)
    cfg = load(PAPER)
    assert rules["train"]["gpu"] == cfg["train"]["num_gpus"] == 8
    for rule in ("judge", "validate_judges", "adaptive_judge"):
        assert rules[rule]["gpu"] == 1 and rules[rule]["slurm_partition"] == "gpu", rule
    # No job in the paper DAG asks for more than 24 h.
    longest = max(res["runtime"] for _, res in jobs)
    assert longest <= 24 * 60, longest
    assert check_conventions(rules, cfg) == []


def test_sbatch_lines_the_plugin_builds(jobs):
    rules = by_rule_max(jobs)
    train = sbatch_line("train", rules["train"]).split()
    assert "--gpus=8" in train and "--nodes=1" in train and "--cpus-per-gpu=8" in train
    assert not [a for a in train if a.startswith("--cpus-per-task")], train
    assert train[train.index("-t") + 1] == "720" and train[train.index("-p") + 1] == "gpu"
    judge = sbatch_line("judge", rules["judge"]).split()
    assert "--gpus=1" in judge and "--cpus-per-gpu=8" in judge and "--nodes=1" in judge
    # A CPU job gets its rule's threads as --cpus-per-task.
    summary = sbatch_line("summary", rules["summary"], threads=1).split()
    assert "--cpus-per-task=1" in summary and not [a for a in summary if "gpus" in a]


def test_old_default_cpus_per_task_wins_in_the_plugin():
    """Why check_conventions flags it: the plugin's own line for the old profile."""
    res = {"gpu": 4, "cpus_per_gpu": 8, "cpus_per_task": 2, "mem_mb": 1, "runtime": 1}
    line = sbatch_line("train", res).split()
    assert "--cpus-per-task=2" in line and "--cpus-per-gpu=8" not in line
    assert "--nodes=1" not in " ".join(line)
    problems = check_conventions({"train": res})
    assert len(problems) == 2


def test_parse_dry_run_reads_each_job():
    text = """
[Thu Dec  3 07:36:05 2026]
rule train:
    input: x
    resources: tmpdir=/tmp, disk_mb=<TBD>, mem_mb=480000, mem=480 GB, slurm_partition=gpu, slurm_account=, runtime=720, gpu=4, nodes=1

[Thu Dec  3 07:36:05 2026]
localrule all:
    resources: tmpdir=/tmp, mem_mb=4000
"""  # noqa: E501
    (rule, res), *rest = parse_dry_run(text)
    assert rest == [] and rule == "train"
    assert res["mem_mb"] == 480000 and res["gpu"] == 4 and res["slurm_account"] == ""
    assert res["mem"] == "480 GB" and "disk_mb" not in res


def test_dry_run_failure_is_one_error(tmp_path, cluster, monkeypatch):
    monkeypatch.setenv("PATH", cluster["PATH"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [not, an, int]\n")
    with pytest.raises(RgeomError, match="failed"):
        resolved_resources(PROFILE, bad, REPO / "Snakefile", tmp_path)
