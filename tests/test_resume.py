"""A training run killed mid-way resumes to the same weights as an uninterrupted one.

SLURM ends a job at its time limit with SIGTERM (then SIGKILL after a grace period), and
``sbatch --signal`` can send SIGUSR1 earlier; a node failure is a SIGKILL with no warning.
Each case runs ``rgeom train`` as a subprocess, kills it once a resume checkpoint exists,
reruns the same command and compares the final anchor with an uninterrupted run's, tensor
by tensor. Both arms: for R2D2 the pool (entries,
suffixes, RNG) must come back too, or the resumed run would attack different test cases.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from train_cmd import train_args

from rgeom.io import read_table, write_table
from rgeom.train.data import SFT_SCHEMA
from rgeom.train.r2d2 import pool_file
from rgeom.train.runner import TRAIN_LOG_SCHEMA, anchor_name

# Many more steps than the first save: the kill must land before the run can finish. R2D2
# runs GCG every step, so it gets fewer (still past two pool resets).
STEPS = {"sft": 30, "r2d2": 12}


def _params(arm: str) -> dict:
    steps = STEPS[arm]
    params = {
        "seed": 0,
        "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 3e-3, "save_every": 3},
        "anchors": [0, steps // 2, steps],
    }
    return {**params, "r2d2": R2D2} if arm == "r2d2" else params


# R2D2 at toy size: GCG refreshes 2 of 6 entries per step and a pool reset every 4 steps,
# so the kill lands between resets and the resumed run must restore both.
R2D2 = {
    "pool_size": 6,
    "updates_per_step": 2,
    "gcg_steps": 1,
    "search_width": 8,
    "topk": 8,
    "suffix_min": 3,
    "suffix_max": 5,
    "reset_every": 4,
    "reset_fraction": 0.5,
}
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    n = 8
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(2 * n)],
            "kind": ["refusal"] * n + ["helpful"] * n,
            "prompt": [f"Tell me how to do bad thing {i}" for i in range(n)]
            + [f"Write a poem about the sea {i}" for i in range(n)],
            "response": ["I'm sorry, but I can't help with that."] * n
            + [f"The sea is wide and blue, verse {i}." for i in range(n)],
        }
    )
    path = tmp_path_factory.mktemp("resume_data") / "sft.parquet"
    write_table(path, table, SFT_SCHEMA, {})
    return path


@pytest.fixture(scope="module")
def r2d2_extra(shared_data) -> list[str]:
    hb = shared_data / "harmbench"
    return [
        "--extra",
        f"r2d2_behaviours={hb / 'adv_training_behaviors.csv'}",
        "--extra",
        f"r2d2_targets={hb / 'adv_training_targets.json'}",
    ]


def _command(
    root: Path, model: Path, data: Path, arm: str = "sft", extra: list[str] | None = None
) -> list[str]:
    args = train_args(root, model, data, _params(arm), arm=arm, extra=extra or [])
    return [sys.executable, "-m", "rgeom.cli", *args]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model_dir, sft_data, r2d2_extra):
    """One uninterrupted run per arm, made on first use."""
    made: dict[str, Path] = {}

    def get(arm: str) -> Path:
        if arm not in made:
            root = tmp_path_factory.mktemp(f"uninterrupted-{arm}")
            _run(_command(root, tiny_model_dir, sft_data, arm, r2d2_extra))
            made[arm] = root
        return made[arm]

    return get


def _final_pool(root: Path, step: int) -> dict:
    """The R2D2 pool state saved with the resume checkpoint at ``step``."""
    (path,) = root.glob(f"train_state/resume/checkpoint-{step}/{pool_file()}")
    return json.loads(path.read_text())


def _load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _kill_after_first_save(cmd: list[str], root: Path, sig: int) -> tuple[int, str]:
    stderr_path = root / "killed.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            pattern = "train_state/resume/checkpoint-*/trainer_state.json"
            while not list(root.glob(pattern)):
                assert proc.poll() is None, stderr_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no resume checkpoint within 300 s"
                time.sleep(0.01)
            proc.send_signal(sig)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, stderr_path.read_text()


@pytest.mark.slow  # ten tiny training runs in subprocesses: a few minutes on 2 cores
@pytest.mark.parametrize("arm", ["sft", "r2d2"])
# SIGUSR1 is the early warning (sbatch --signal), SIGTERM the time limit's 30 s notice.
@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL],
    ids=["sigterm", "sigusr1", "sigkill"],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(
    tmp_path, tiny_model_dir, sft_data, r2d2_extra, references, arm, sig
):
    reference = references(arm)
    max_steps = STEPS[arm]
    cmd = _command(tmp_path, tiny_model_dir, sft_data, arm, r2d2_extra)
    code, stderr = _kill_after_first_save(cmd, tmp_path, sig)
    if sig != signal.SIGKILL:
        # The runner finishes its step, saves resume state and reports the signal.
        assert code == 128 + sig, stderr[-3000:]
        assert "stopped by signal" in stderr
    else:
        assert code == -signal.SIGKILL
    final = anchor_name(max_steps)
    assert not (tmp_path / "train_state" / "anchors" / final).exists(), "killed too late"
    saved = sorted(
        int(p.parent.name.split("-")[1])
        for p in tmp_path.glob("train_state/resume/checkpoint-*/trainer_state.json")
    )
    assert saved and saved[-1] < max_steps

    stderr = _run(cmd)
    assert f"checkpoint-{saved[-1]}" in stderr and f"resuming arm {arm}" in stderr
    assert "without an R2D2 pool state" not in stderr

    for step in _params(arm)["anchors"][1:]:
        got = _load_weights(tmp_path / "checkpoints" / anchor_name(step))
        want = _load_weights(reference / "checkpoints" / anchor_name(step))
        diff = _max_abs_diff(got, want)
        print(f"{arm} {sig.name} resumed from {saved[-1]}: anchor {step} max |diff| {diff:.3g}")
        assert diff <= TOLERANCE, f"anchor {step} differs"

    # Steps replayed after the kill are dropped from the log before training goes on, so
    # the raw log (not only the deduplicated table) holds every step exactly once.
    raw = (tmp_path / "train_state" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in raw] == list(range(1, max_steps + 1))
    got_log = read_table(tmp_path / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    want_log = read_table(reference / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert got_log["step"] == list(range(1, max_steps + 1))
    # Equal per-step losses mean the resumed run saw the same batches in the same order.
    assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-5, abs=1e-6)
    if arm == "r2d2":
        # The same entries refreshed at every step, to the same GCG losses, and the same
        # pool at the end: the pool state came back with the weights.
        assert got_log["gcg_entries"] == want_log["gcg_entries"]
        assert all(len(e) == R2D2["updates_per_step"] for e in got_log["gcg_entries"])
        flat = [x for step in got_log["gcg_losses"] for x in step]
        want_flat = [x for step in want_log["gcg_losses"] for x in step]
        assert flat == pytest.approx(want_flat, rel=1e-5, abs=1e-6)
        got_pool, want_pool = _final_pool(tmp_path, max_steps), _final_pool(reference, max_steps)
        assert got_pool["step"] == want_pool["step"] == max_steps
        assert got_pool["rng"] == want_pool["rng"]
        for key in ("behaviour_id", "target", "suffix_ids", "refreshes"):
            assert got_pool["entries"][key] == want_pool["entries"][key], key
    else:
        assert got_log["gcg_entries"] == [None] * max_steps
