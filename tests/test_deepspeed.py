"""DeepSpeed ZeRO: the shipped configs, and real two-process runs on CPU (gloo).

The multi-process runs launch ``torchrun --nproc_per_node 2 -m rgeom.cli train`` exactly as
the workflow does for ``train.num_gpus > 1``, on the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from train_cmd import train_args

from rgeom.errors import RgeomError
from rgeom.io import read_table, write_table
from rgeom.train import train_arm
from rgeom.train.data import SFT_SCHEMA
from rgeom.train.runner import (
    TRAIN_LOG_SCHEMA,
    ArmFiles,
    anchor_name,
    deepspeed_config_path,
)

REPO = Path(__file__).resolve().parents[1]
# Values HF Trainer fills from TrainingArguments; a number here could silently disagree.
AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


@pytest.mark.parametrize(
    ("stage", "offload", "name"),
    [
        (2, False, "zero2.json"),
        (2, True, "zero2_offload.json"),
        (3, False, "zero3.json"),
        (3, True, "zero3_offload.json"),
    ],
)
def test_config_paths_map_to_matching_files(stage, offload, name):
    rel = deepspeed_config_path(stage, offload)
    assert rel == f"workflow/deepspeed/{name}"
    ds = json.loads((REPO / rel).read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    for key in AUTO_KEYS:
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert ("offload_optimizer" in zero) == offload
    assert ("offload_param" in zero) == (offload and stage == 3)
    if offload:
        # ZeRO-Offload refuses a client (torch) optimizer; DeepSpeed's CPU Adam is built
        # from this section, its values filled from TrainingArguments.
        assert all(v == "auto" for v in ds["optimizer"]["params"].values())
    if stage == 3:
        # Otherwise save_model writes an empty state dict: anchors would hold no weights.
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_no_zero_needs_no_config():
    assert deepspeed_config_path(0, False) is None
    assert deepspeed_config_path(0, True) is None
    with pytest.raises(RgeomError, match="zero_stage must be 0, 2 or 3"):
        deepspeed_config_path(1, False)


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
            + ["The sea is wide and blue."] * n,
        }
    )
    path = tmp_path_factory.mktemp("ds_data") / "sft.parquet"
    write_table(path, table, SFT_SCHEMA, {})
    return path


def _files(model_dir, data, out, write_log: bool = True) -> ArmFiles:
    """The arm's files in the results layout around ``out``, as the CLI's strings."""
    return ArmFiles.beside(str(model_dir), str(data), str(out), write_log)


def _params(stage: int, max_steps: int = 8) -> dict:
    return {
        "seed": 0,
        "train": {
            "max_steps": max_steps,
            "batch_size": 2,
            "learning_rate": 3e-3,
            "zero_stage": stage,
        },
        "anchors": [0, max_steps // 2, max_steps],
    }


def test_zero_without_config_names_the_expected_file(tmp_path, tiny_model_dir, sft_data):
    with pytest.raises(RgeomError, match="--extra deepspeed=workflow/deepspeed/zero3.json"):
        train_arm("sft", _files(tiny_model_dir, sft_data, tmp_path / "c"), _params(3), {}, {})


def test_config_of_another_stage_is_rejected(tmp_path, tiny_model_dir, sft_data):
    extra = {"deepspeed": str(REPO / "workflow/deepspeed/zero2.json")}
    with pytest.raises(RgeomError, match="sets ZeRO stage 2 but train.zero_stage is 3"):
        train_arm("sft", _files(tiny_model_dir, sft_data, tmp_path / "c"), _params(3), extra, {})


def test_zero3_config_must_gather_weights_on_save(tmp_path, tiny_model_dir, sft_data):
    ds = json.loads((REPO / "workflow/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    cfg = tmp_path / "zero3_nogather.json"
    cfg.write_text(json.dumps(ds))
    with pytest.raises(RgeomError, match="stage3_gather_16bit_weights_on_model_save"):
        train_arm(
            "sft",
            _files(tiny_model_dir, sft_data, tmp_path / "c"),
            _params(3),
            {"deepspeed": str(cfg)},
            {},
        )


def _torchrun_train(
    root: Path,
    model: Path,
    data: Path,
    stage: int,
    arm: str = "sft",
    params: dict | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rgeom.cli",
        *train_args(
            root,
            model,
            data,
            params or _params(stage),
            arm=arm,
            extra=[
                "--extra",
                f"deepspeed={deepspeed_config_path(stage, False)}",
                *[arg for item in extra for arg in ("--extra", item)],
            ],
        ),
    ]
    # One thread per rank: two ranks on a small machine would otherwise oversubscribe it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # two processes, DeepSpeed init and a one-off op build: about a minute
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_trains_and_exports_plain_checkpoints(
    tmp_path, tiny_model_dir, sft_data, stage
):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    proc = _torchrun_train(tmp_path, tiny_model_dir, sft_data, stage)
    noise = ("FutureWarning", "return func(")
    tail = "\n".join(ln for ln in proc.stderr.splitlines() if not any(n in ln for n in noise))
    assert proc.returncode == 0, tail[-5000:]

    log = read_table(tmp_path / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert log["step"] == list(range(1, 9))
    assert sum(log["loss"][-3:]) / 3 < sum(log["loss"][:3]) / 3

    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    for step in (4, 8):
        folder = tmp_path / "checkpoints" / anchor_name(step)
        # Full weights in one plain HF file, not DeepSpeed shards (ZeRO-3 partitions every
        # parameter, so a save without gathering would write empty tensors).
        assert not list(folder.glob("global_step*")), sorted(p.name for p in folder.iterdir())
        with safe_open(folder / "model.safetensors", "pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        # ZeRO-2 also writes the tied lm_head (a copy of the embeddings; from_pretrained
        # re-ties it): any key beyond the base model's must be such a copy.
        assert base.keys() <= saved.keys()
        for extra in saved.keys() - base.keys():
            assert extra == "lm_head.weight", extra
            assert torch.equal(saved[extra], saved["model.embed_tokens.weight"])
        for name, tensor in base.items():
            assert saved[name].shape == tensor.shape, name
        moved = max(float((saved[k].float() - base[k].float()).abs().max()) for k in base)
        assert moved > 0, "the anchor holds the untrained weights"
        # No rgeom code: the checkpoint is an ordinary Hugging Face model folder.
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in base.values())


@pytest.mark.slow  # two processes, each running GCG on the partitioned model: about a minute
def test_two_process_zero3_r2d2_runs_gcg_on_partitioned_weights(
    tmp_path, tiny_model_dir, sft_data, shared_data
):
    """R2D2 under ZeRO-3, as config/paper.yaml runs it.

    GCG multiplies a one-hot matrix by the embedding weight outside any module forward, which
    ZeRO-3 leaves partitioned (an empty placeholder) unless GCG gathers it: without that the
    pool refresh finds no vocabulary and the run dies on its first step.

    Under ZeRO-3 every forward pass is a collective, and the number of passes that scoring a
    GCG candidate batch takes depends on where its swaps fall (``plan_buckets``). At width 8
    with a 4-token suffix one pass always sufficed; here (width 64, 12-16 tokens, two entries
    per rank) the ranks' plans differ, and without the padding the run aborts with a
    collective mismatch at step 0 (test_r2d2.py's two-process pool test counts the passes).
    """
    hb = shared_data / "harmbench"
    params = _params(3, max_steps=4)
    params["r2d2"] = {
        "pool_size": 4,
        "updates_per_step": 4,
        "gcg_steps": 2,
        "search_width": 64,
        "topk": 32,
        "suffix_min": 12,
        "suffix_max": 16,
    }
    proc = _torchrun_train(
        tmp_path,
        tiny_model_dir,
        sft_data,
        3,
        arm="r2d2",
        params=params,
        extra=(
            f"r2d2_behaviours={hb / 'adv_training_behaviors.csv'}",
            f"r2d2_targets={hb / 'adv_training_targets.json'}",
        ),
    )
    noise = ("FutureWarning", "return func(")
    tail = "\n".join(ln for ln in proc.stderr.splitlines() if not any(n in ln for n in noise))
    assert proc.returncode == 0, tail[-5000:]
    log = read_table(tmp_path / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert log["step"] == list(range(1, 5))
    assert all(v == v and v > 0 for v in log["loss"]), log["loss"]
    for step in (2, 4):
        assert (tmp_path / "checkpoints" / anchor_name(step) / "model.safetensors").is_file()
