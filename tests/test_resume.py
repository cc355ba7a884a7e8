"""A training run killed mid-way resumes to the same weights as an uninterrupted one.

SLURM ends a job at its time limit with SIGTERM (then SIGKILL after a grace period); a node
failure is a SIGKILL with no warning. Each case runs ``rgeom train`` as a subprocess, kills
it once a resume checkpoint exists, reruns the same command and compares the final anchor
with an uninterrupted run's, tensor by tensor.
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

from rgeom.io import read_table, write_table
from rgeom.train.data import SFT_SCHEMA
from rgeom.train.runner import TRAIN_LOG_SCHEMA, anchor_name

MAX_STEPS = 30
# Many more steps than the first save: the kill must land before the run can finish.
PARAMS = {
    "seed": 0,
    "train": {"max_steps": MAX_STEPS, "batch_size": 4, "learning_rate": 3e-3, "save_every": 3},
    "anchors": [0, 15, MAX_STEPS],
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


def _command(root: Path, model: Path, data: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rgeom.cli",
        "train",
        "--arm",
        "sft",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out-dir",
        str(root / "checkpoints"),
        "--state-dir",
        str(root / "train_state"),
        "--log-table",
        str(root / "train_log.parquet"),
        "--params",
        json.dumps(PARAMS),
    ]


def _run(root: Path, model: Path, data: Path) -> str:
    proc = subprocess.run(_command(root, model, data), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, sft_data) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    _run(root, tiny_model_dir, sft_data)
    return root


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


@pytest.mark.slow  # five tiny training runs in subprocesses: about 75 s on 2 cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_to_the_uninterrupted_weights(
    tmp_path, tiny_model_dir, sft_data, reference, sig
):
    cmd = _command(tmp_path, tiny_model_dir, sft_data)
    code, stderr = _kill_after_first_save(cmd, tmp_path, sig)
    if sig == signal.SIGTERM:
        # The runner finishes its step, saves resume state and reports the signal.
        assert code == 128 + signal.SIGTERM, stderr[-3000:]
        assert "stopped by signal" in stderr
    else:
        assert code == -signal.SIGKILL
    final = anchor_name(MAX_STEPS)
    assert not (tmp_path / "train_state" / "anchors" / final).exists(), "killed too late"
    saved = sorted(
        int(p.parent.name.split("-")[1])
        for p in tmp_path.glob("train_state/resume/checkpoint-*/trainer_state.json")
    )
    assert saved and saved[-1] < MAX_STEPS

    stderr = _run(tmp_path, tiny_model_dir, sft_data)
    assert f"checkpoint-{saved[-1]}" in stderr and "resuming arm sft" in stderr

    for step in PARAMS["anchors"][1:]:
        got = _load_weights(tmp_path / "checkpoints" / anchor_name(step))
        want = _load_weights(reference / "checkpoints" / anchor_name(step))
        assert _max_abs_diff(got, want) <= TOLERANCE, f"anchor {step} differs"

    # Steps replayed after the kill are dropped from the log before training goes on, so
    # the raw log (not only the deduplicated table) holds every step exactly once.
    raw = (tmp_path / "train_state" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in raw] == list(range(1, MAX_STEPS + 1))
    got_log = read_table(tmp_path / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    want_log = read_table(reference / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert got_log["step"] == list(range(1, MAX_STEPS + 1))
    # Equal per-step losses mean the resumed run saw the same batches in the same order.
    assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-5, abs=1e-6)
