"""The training runner on a tiny model: anchors, loss, plain-HF checkpoints, resume."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rgeom.errors import RgeomError
from rgeom.io import read_table, write_table
from rgeom.train import train_arm
from rgeom.train.data import SFT_SCHEMA
from rgeom.train.runner import TRAIN_LOG_SCHEMA, ArmFiles


@pytest.fixture
def sft_file(tmp_path):
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
    path = tmp_path / "sft.parquet"
    write_table(path, table, SFT_SCHEMA, {})
    return path


def _files(model_dir, data, out, write_log: bool = True) -> ArmFiles:
    """The arm's files in the results layout around ``out``, as the CLI's strings."""
    return ArmFiles.beside(str(model_dir), str(data), str(out), write_log)


def _params(max_steps, anchors):
    return {
        "seed": 0,
        "train": {"max_steps": max_steps, "batch_size": 4, "learning_rate": 3e-3},
        "anchors": anchors,
    }


def test_anchors_are_exported_and_loss_falls(tmp_path, tiny_model_dir, sft_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft" / "checkpoints"
    train_arm("sft", _files(tiny_model_dir, sft_file, out), _params(8, [0, 4, 8]), {}, {})
    assert sorted(p.name for p in out.iterdir()) == ["step-000004", "step-000008"]
    # A checkpoint is a plain Hugging Face folder: no rgeom code needed to load it.
    model = AutoModelForCausalLM.from_pretrained(out / "step-000008")
    assert model.config.num_hidden_layers == 2
    info = json.loads((out / "step-000004" / "rgeom_checkpoint.json").read_text())
    assert info == {"arm": "sft", "step": 4, "base_model": str(tiny_model_dir)}
    log = read_table(tmp_path / "sft" / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert log["step"] == list(range(1, 9))
    assert sum(log["loss"][-3:]) / 3 < sum(log["loss"][:3]) / 3
    assert all(t > 0 for t in log["tokens_per_s"][1:])
    # No pool, no per-entry GCG losses.
    assert log["gcg_entries"] == log["gcg_losses"] == [None] * 8


def test_r2d2_log_has_every_refreshed_entrys_gcg_loss(
    tmp_path, tiny_model_dir, sft_file, shared_data
):
    # Two micro-steps per optimizer step, two entries refreshed in each: every step's row
    # lists all four (pool index, GCG loss) pairs, and their mean is the logged mean.
    hb = shared_data / "harmbench"
    params = _params(3, [0, 3])
    params["train"]["grad_accum"] = 2
    params["r2d2"] = {
        "pool_size": 5,
        "updates_per_step": 2,
        "gcg_steps": 1,
        "search_width": 8,
        "topk": 8,
        "suffix_min": 3,
        "suffix_max": 4,
    }
    extra = {
        "r2d2_behaviours": str(hb / "adv_training_behaviors.csv"),
        "r2d2_targets": str(hb / "adv_training_targets.json"),
    }
    out = tmp_path / "r2d2" / "checkpoints"
    train_arm("r2d2", _files(tiny_model_dir, sft_file, out), params, extra, {})
    log = read_table(tmp_path / "r2d2" / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
    assert log["step"] == [1, 2, 3]
    for entries, losses, extra_json in zip(
        log["gcg_entries"], log["gcg_losses"], log["extra"], strict=True
    ):
        assert len(entries) == len(losses) == 4
        assert all(0 <= i < 5 for i in entries)
        # Each micro-step refreshes distinct entries.
        assert len(set(entries[:2])) == len(set(entries[2:])) == 2
        assert all(loss > 0 for loss in losses)
        mean = json.loads(extra_json)["r2d2_gcg_loss"]
        assert sum(losses) / 4 == pytest.approx(mean, rel=1e-9)
        assert "r2d2_gcg_losses" not in json.loads(extra_json)


def test_bfloat16_trains_under_autocast_with_float32_weights(tmp_path, tiny_model_dir, sft_file):
    # model.dtype bfloat16 is mixed precision on the CPU too, as on CUDA: the losses move
    # (bfloat16 matmuls) but stay close, and the exported weights stay float32.
    from safetensors.torch import load_file

    losses = {}
    for dtype in ("float32", "bfloat16"):
        params = dict(_params(2, [0, 2]), model={"dtype": dtype, "device": "cpu"})
        out = tmp_path / dtype / "checkpoints"
        train_arm("sft", _files(tiny_model_dir, sft_file, out), params, {}, {})
        log = read_table(tmp_path / dtype / "train_log.parquet", TRAIN_LOG_SCHEMA).to_pydict()
        losses[dtype] = log["loss"]
        weights = load_file(next((out / "step-000002").glob("*.safetensors")))
        assert {t.dtype for t in weights.values()} == {__import__("torch").float32}
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)


def test_rerun_reuses_stored_anchors_and_extends(tmp_path, tiny_model_dir, sft_file, caplog):
    import logging

    caplog.set_level(logging.INFO)
    out = tmp_path / "sft" / "checkpoints"
    train_arm("sft", _files(tiny_model_dir, sft_file, out), _params(6, [0, 3]), {}, {})
    first = (out / "step-000003" / "model.safetensors").read_bytes()
    # Snakemake deletes declared outputs before a rerun; the stored anchors survive.
    import shutil

    shutil.rmtree(out)
    caplog.clear()
    train_arm("sft", _files(tiny_model_dir, sft_file, out), _params(6, [0, 3]), {}, {})
    assert "already trained" in caplog.text
    assert (out / "step-000003" / "model.safetensors").read_bytes() == first
    # A new later anchor resumes from the stored state at step 3, not from zero.
    caplog.clear()
    train_arm("sft", _files(tiny_model_dir, sft_file, out), _params(6, [0, 3, 6]), {}, {})
    assert "resuming arm sft" in caplog.text
    assert (out / "step-000006").is_dir()
    assert (out / "step-000003" / "model.safetensors").read_bytes() == first
    log = read_table(tmp_path / "sft" / "train_log.parquet").to_pydict()
    assert log["step"] == list(range(1, 7))


def test_unknown_arm_is_rejected(tmp_path, tiny_model_dir, sft_file):
    with pytest.raises(RgeomError, match="unknown arm 'dpo'"):
        train_arm(
            "dpo", _files(tiny_model_dir, sft_file, tmp_path / "c"), _params(2, [0, 2]), {}, {}
        )


def test_segments_equal_one_run(tmp_path, tiny_model_dir, sft_file):
    """Training 0→3 then 3→6 (the workflow's per-anchor jobs) equals one 0→6 run."""
    whole = tmp_path / "whole" / "checkpoints"
    train_arm("sft", _files(tiny_model_dir, sft_file, whole), _params(6, [3, 6]), {}, {})
    seg = tmp_path / "seg" / "checkpoints"
    for anchor in (3, 6):
        train_arm(
            "sft",
            _files(tiny_model_dir, sft_file, seg, write_log=False),
            _params(6, [anchor]),
            {},
            {},
        )
    assert not (tmp_path / "seg" / "train_log.parquet").exists()
    for name in ("step-000003", "step-000006"):
        a = (whole / name / "model.safetensors").read_bytes()
        assert (seg / name / "model.safetensors").read_bytes() == a, name
    from rgeom.train.runner import write_train_log

    got = write_train_log(tmp_path / "seg" / "train_state", tmp_path / "seg.parquet", {})
    want = read_table(tmp_path / "whole" / "train_log.parquet").to_pydict()
    assert got.column("step").to_pylist() == want["step"] == list(range(1, 7))
    assert got.column("loss").to_pylist() == pytest.approx(want["loss"], rel=1e-6)


def test_changed_parameters_discard_the_stored_state(tmp_path, tiny_model_dir, sft_file, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO)
    out = tmp_path / "sft" / "checkpoints"
    train_arm("sft", _files(tiny_model_dir, sft_file, out), _params(6, [0, 3]), {}, {})
    first = (out / "step-000003" / "model.safetensors").read_bytes()
    shutil.rmtree(out)
    caplog.clear()
    changed = _params(6, [0, 3])
    changed["train"]["learning_rate"] = 1e-4
    train_arm("sft", _files(tiny_model_dir, sft_file, out), changed, {}, {})
    # Never the stale checkpoint of the old learning rate, and no resume from its state.
    assert "discarding its resume state" in caplog.text
    assert "already trained" not in caplog.text and "resuming" not in caplog.text
    assert (out / "step-000003" / "model.safetensors").read_bytes() != first
    # max_steps under a constant schedule is not a training parameter: the state is kept.
    caplog.clear()
    shutil.rmtree(out)
    longer = _params(9, [0, 3])
    longer["train"]["learning_rate"] = 1e-4
    train_arm("sft", _files(tiny_model_dir, sft_file, out), longer, {}, {})
    assert "already trained" in caplog.text


# --- utility data: the reference (dataset) and self-distillation -------------------------
def _prompt_tables(tmp_path, harmless_spec):
    from rgeom.data import prepare_set

    bad, good = tmp_path / "bad.parquet", tmp_path / "good.parquet"
    prepare_set("bad", {"format": "builtin", "path": "harmful", "limit": 3}, ".", 0, bad, {})
    prepare_set("good", harmless_spec, ".", 0, good, {})
    return str(bad), str(good)


def test_truncated_answer_gets_no_eos(tmp_path, tiny, monkeypatch):
    """An answer cut at helpful_max_new_tokens must not end in EOS (it would teach the
    model to stop mid-answer); an answer that stopped by itself keeps its EOS."""
    import rgeom.generation
    from rgeom.train.data import build_sft_data, sft_dataset

    _, tokenizer = tiny
    limit = 4

    def fake_generate(model, tok, prompts, batch_size, max_new_tokens):
        assert max_new_tokens == limit
        # Even rows used the whole budget (no EOS came), odd rows stopped after 2 tokens.
        new = [limit if i % 2 == 0 else 2 for i in range(len(prompts))]
        return ["the sea is wide"] * len(prompts), [0] * len(prompts), new

    monkeypatch.setattr(rgeom.generation, "generate_completions", fake_generate)
    bad, good = _prompt_tables(tmp_path, {"format": "builtin", "path": "harmless", "limit": 4})
    out = tmp_path / "sft.parquet"
    params = {"train": {"utility_source": "self_distill", "helpful_max_new_tokens": limit}}
    build_sft_data(object(), tokenizer, bad, good, str(out), params, {})
    rows = read_table(out).to_pydict()
    assert rows["complete"] == [True] * 3 + [False, True, False, True]
    data = sft_dataset(str(out), tokenizer)
    eos = tokenizer.eos_token_id
    for i, complete in enumerate(rows["complete"]):
        ids, mask = data[i]["input_ids"], data[i]["completion_mask"]
        assert (ids[-1] == eos) == complete, i
        assert mask[-1] == 1 and mask[0] == 0


def test_dataset_utility_trains_on_whole_conversations(tmp_path, tiny):
    """utility_source dataset (the reference): the set's own multi-turn answers, as one
    document each with the loss on every token, closed by EOS; no model is needed."""
    from rgeom.train.data import build_sft_data, sft_dataset

    _, tokenizer = tiny
    chats = [
        [
            {"role": "user", "content": f"How do tides work? {i}"},
            {"role": "assistant", "content": "The moon pulls the sea."},
            {"role": "user", "content": "And the sun?"},
            {"role": "assistant", "content": "Less so."},
        ]
        for i in range(2)
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text(
        "".join(json.dumps({"prompt": c[0]["content"], "messages": c}) + "\n" for c in chats)
    )
    bad, good = _prompt_tables(tmp_path, {"format": "jsonl", "path": str(src), "label": "harmless"})
    out = tmp_path / "sft.parquet"
    build_sft_data(None, None, bad, good, str(out), {"train": {"utility_source": "dataset"}}, {})
    rows = read_table(out).to_pydict()
    assert rows["kind"] == ["refusal"] * 3 + ["helpful"] * 2
    assert rows["response"][3:] == ["The moon pulls the sea."] * 2
    data = sft_dataset(str(out), tokenizer)
    for i, chat in enumerate(chats):
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        want = tokenizer(text)["input_ids"]
        want = want if want[-1] == tokenizer.eos_token_id else want + [tokenizer.eos_token_id]
        assert data[3 + i]["input_ids"] == want
        assert data[3 + i]["completion_mask"] == [1] * len(want)

    # A prompt set without conversations cannot be the reference's utility data.
    bad, plain = _prompt_tables(tmp_path, {"format": "builtin", "path": "harmless", "limit": 2})
    with pytest.raises(RgeomError, match="no conversation.*utility_source: self_distill"):
        build_sft_data(None, None, bad, plain, str(out), {"train": {}}, {})


def test_trl_packs_rows_into_max_length_blocks(tmp_path, tiny_model_dir, sft_file, monkeypatch):
    """train.packing hands the rows to TRL's SFTTrainer, which packs them (wrapped, as the
    reference's packer) into max_length blocks whose labels keep the completion masks."""
    import trl

    seen = {}

    class Stop(Exception):
        pass

    def capture(self, *args, **kwargs):
        seen["data"] = self.train_dataset
        raise Stop

    monkeypatch.setattr(trl.SFTTrainer, "train", capture)
    params = _params(4, [0, 4])
    params["train"].update(packing=True, max_length=32)
    with pytest.raises(Stop):
        train_arm("sft", _files(tiny_model_dir, sft_file, tmp_path / "c"), params, {}, {})
    rows = seen["data"]
    lengths = [len(r["input_ids"]) for r in rows]
    assert set(lengths[:-1]) == {32} and 0 < lengths[-1] <= 32
    labels = [t for r in rows for t in r["labels"]]
    # Prompt tokens are masked, responses are not.
    assert -100 in labels and any(t != -100 for t in labels)


def test_paper_training_is_harmbenchs_r2d2_recipe():
    """config/paper.yaml's start model and optimisation are the reference recipe's
    (recipes/zephyr-7b-beta/sft_adv_training/config_full.yaml, run_adv_training.sh)."""
    import hashlib
    from pathlib import Path

    import yaml

    from rgeom.models import NAMED_CHAT_TEMPLATES

    paper = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text()
    )
    assert paper["model"]["path"] == "mistralai/Mistral-7B-v0.1"
    assert paper["model"]["chat_template"] == "zephyr"
    # sha256 of alignment-handbook's DEFAULT_CHAT_TEMPLATE (src/alignment/data.py).
    digest = hashlib.sha256(NAMED_CHAT_TEMPLATES["zephyr"].encode()).hexdigest()
    assert digest == "66291cf0045c2425a3a667cf3cbb7af2b11f09e025c02f97245323ab79119362"
    train = paper["train"]
    assert {k: train[k] for k in RECIPE} == RECIPE
    harmless = paper["data"]["sets"]["train_harmless"]
    assert (harmless["path"], harmless["hf_split"]) == ("HuggingFaceH4/ultrachat_200k", "train_sft")


RECIPE = {
    "learning_rate": 2.0e-5,
    "lr_scheduler": "cosine",
    "warmup_steps": 0,
    "batch_size": 8,
    "grad_accum": 4,
    "num_gpus": 8,
    "max_length": 2048,
    "packing": True,
    "utility_source": "dataset",
}


# --- preemption -----------------------------------------------------------------------
def test_time_limit_saves_a_resumable_state(tmp_path, tiny_model_dir, sft_file):
    """Near its time limit a run saves resume state and exits as if SIGUSR1 had come; the
    rerun resumes from that state to the uninterrupted run's weights, bit for bit."""
    import signal

    whole = tmp_path / "whole" / "checkpoints"
    train_arm("sft", _files(tiny_model_dir, sft_file, whole), _params(4, [4]), {}, {})
    out = tmp_path / "cut" / "checkpoints"
    params = _params(4, [4])
    params["train"]["save_margin_s"] = 0
    with pytest.raises(SystemExit) as stop:
        # Any limit below two steps' time stops after the first step.
        train_arm("sft", _files(tiny_model_dir, sft_file, out), params, {}, {}, time_limit_s=1e-3)
    assert stop.value.code == 128 + signal.SIGUSR1
    state = tmp_path / "cut" / "train_state" / "resume" / "checkpoint-1" / "trainer_state.json"
    assert state.exists() and not out.exists()
    train_arm("sft", _files(tiny_model_dir, sft_file, out), params, {}, {})
    name = "step-000004"
    assert (out / name / "model.safetensors").read_bytes() == (
        whole / name / "model.safetensors"
    ).read_bytes()


def test_time_limit_applies_only_under_slurm(monkeypatch):
    """The rule passes its runtime everywhere; only a SLURM job stops before it (a
    workstation run with the rule's runtime must train to the end)."""
    import rgeom.train
    from rgeom.stages.train import run as run_train

    seen = []
    monkeypatch.setattr(rgeom.train, "train_arm", lambda **kw: seen.append(kw))
    args = ("sft", "m", "d", "o", "s", None, [], {"train": {}})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run_train(*args, time_limit_min=240, save_every=25, save_margin_s=30)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    run_train(*args, time_limit_min=240)
    assert [kw["time_limit_s"] for kw in seen] == [None, 240 * 60]
    # Both saving settings reach the runner (the rule passes them beside --params).
    assert seen[0]["params"]["train"]["save_every"] == 25
    assert seen[0]["params"]["train"]["save_margin_s"] == 30
    assert "save_margin_s" not in seen[1]["params"]["train"]
