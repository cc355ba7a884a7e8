"""The paper default equals the reference: attack and benchmark constants that the
reference code fixes, pinned on the config that `config/paper.yaml` resolves to.

Each expected value cites where the reference fixes it; docs/protocol.md is the table of
every protocol element, its reference and the test that pins it. Constants owned by one
stage (R2D2 pool and losses, carrier search, judge prompts) are pinned beside that stage's
tests and listed in the same table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rgeom.config import load_yaml, validate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper() -> dict:
    return validate(load_yaml(REPO / "config" / "paper.yaml"), "config/paper.yaml")


# HarmBench configs/method_configs/GCG_config.yaml (num_steps, search_width, adv_string_init)
# and baselines/gcg/gcg.py (sample_control(..., topk=256)).
GCG_REFERENCE = {
    "steps": 500,
    "search_width": 512,
    "topk": 256,
    "init_suffix": " ".join(["!"] * 20),
}

# HarmBench configs/method_configs/AutoDAN_config.yaml.
AUTODAN_REFERENCE = {
    "generations": 100,  # num_steps
    "population": 64,  # batch_size: parallel mutations
    "elite_fraction": 0.1,  # num_elites
    "crossover_rate": 0.5,  # crossover
    "paragraph_every": 5,  # num_points
    "mutation_rate": 0.01,  # mutation
}


@pytest.mark.parametrize("section", ["gcg", "adaptive"])
def test_gcg_constants_equal_harmbench(paper, section):
    got = {k: paper["attacks"][section][k] for k in GCG_REFERENCE}
    assert got == GCG_REFERENCE
    # Screening in low precision is rgeom's own option; the reference scores in the
    # model's dtype, so the paper default leaves it off.
    assert paper["attacks"][section]["screen_dtype"] is None


def test_gcg_transfer_targets_are_harmbench_targets(paper):
    assert paper["attacks"]["gcg"]["targets"] == "harmbench/harmbench_targets_text.json"


def test_autodan_constants_equal_harmbench(paper):
    got = {k: paper["attacks"]["autodan"][k] for k in AUTODAN_REFERENCE}
    assert got == AUTODAN_REFERENCE
    assert "AutoDAN" in paper["attacks"]["methods"]


def test_paper_anchors_and_arms(paper):
    # arXiv 2604.27019: checkpoints at steps 0, 50, 100, 250 and 500 of both arms.
    assert paper["anchors"] == [0, 50, 100, 250, 500]
    assert paper["arms"] == ["sft", "r2d2"]
    assert paper["train"]["max_steps"] == 500


def test_harmbench_test_split_with_contextual_behaviours(paper):
    # HarmBench reports ASR on the 320-behaviour test split, contextual behaviours included.
    hb = paper["data"]["sets"]["harmbench"]
    assert hb["path"] == "harmbench/harmbench_behaviors_text_test.csv"
    assert hb["contextual"] is True


def test_judge_bootstrap_and_clip(paper):
    # HarmBench's evaluate_completions.py clips each generation to 512 classifier tokens.
    assert paper["judge"]["harmbench"] == "harmbench_classifier"
    assert paper["judge"]["harmbench_model"]["path"] == "cais/HarmBench-Llama-2-13b-cls"
    assert paper["judge"]["max_generation_tokens"] == 512
    # Copyright behaviours are judged by hashing upstream, never by the classifier.
    assert paper["judge"]["exclude_copyright"] is True


def test_deepspeed_stage_is_the_r2d2_runs(paper):
    # adversarial_training/alignment-handbook/scripts/run_adv_training.sh launches
    # recipes/accelerate_configs/deepspeed_config.yaml: ZeRO stage 2 on 8 processes.
    assert paper["train"]["zero_stage"] == 2
    assert paper["train"]["num_gpus"] == 8
