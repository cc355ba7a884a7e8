"""Which config edits change a stage's tracked parameters (fast; test_caching checks the
rerun sets on a real workflow)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rgeom.config import validate
from rgeom.stage_params import model_params, train_params, training_settings
from rgeom.train.runner import training_fingerprint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg():
    return validate({}, source="test")


def edited(cfg, section, key, value):
    new = copy.deepcopy(cfg)
    new[section][key] = value
    return new


def test_model_params_leave_out_paths_and_threads(cfg):
    assert set(model_params(cfg)) == {"dtype", "device", "trust_remote_code"}
    assert model_params(edited(cfg, "model", "gguf_file", "other.gguf")) == model_params(cfg)


@pytest.mark.parametrize("key", ["save_every", "save_margin_s"])
def test_saving_keys_never_change_a_segment(cfg, key):
    assert train_params(edited(cfg, "train", key, 7), "sft", 6) == train_params(cfg, "sft", 6)


def test_max_steps_matters_only_under_a_decaying_schedule(cfg):
    longer = edited(cfg, "train", "max_steps", cfg["train"]["max_steps"] * 2)
    assert cfg["train"]["lr_scheduler"] == "constant"
    assert train_params(longer, "sft", 6) == train_params(cfg, "sft", 6)
    cosine = edited(cfg, "train", "lr_scheduler", "cosine")
    cosine_longer = edited(cosine, "train", "max_steps", cfg["train"]["max_steps"] * 2)
    assert train_params(cosine_longer, "sft", 6) != train_params(cosine, "sft", 6)


def test_a_segment_carries_its_own_anchor_only(cfg):
    more = copy.deepcopy(cfg)
    more["anchors"] = [*cfg["anchors"], cfg["anchors"][-1] + 1]
    assert train_params(more, "sft", 6) == train_params(cfg, "sft", 6)
    assert train_params(cfg, "sft", 6)["anchors"] == [6]


def test_r2d2_settings_reach_the_r2d2_arm_only(cfg):
    tuned = edited(cfg, "r2d2", "search_width", 3)
    assert train_params(tuned, "sft", 6) == train_params(cfg, "sft", 6)
    assert train_params(tuned, "r2d2", 6) != train_params(cfg, "r2d2", 6)
    # Its shared files are tracked by content (common.smk adds their digests), not path.
    assert not {"behaviours", "targets"} & set(train_params(cfg, "r2d2", 6)["r2d2"])


def test_the_runner_fingerprints_the_same_settings(cfg):
    # A resumed segment must agree with the workflow on what a checkpoint depends on.
    params = {"train": dict(cfg["train"]), "anchors": [6, 12]}
    assert training_fingerprint(params)["train"] == training_settings(cfg["train"])


# --- which edits rerun which rules (tests/test_caching.py checks the same on a real run) ---


def rerun_rules(cfg, **edits):
    """The rules whose tracked parameters change when the dotted keys take new values."""
    from rgeom.stage_params import tracked_params

    edited = copy.deepcopy(cfg)
    for dotted, value in edits.items():
        *path, last = dotted.split(".")
        node = edited
        for part in path:
            node = node[part]
        node[last] = value
    before, after = tracked_params(cfg), tracked_params(edited)
    return {rule for rule in before if before[rule] != after[rule]}


def test_no_edit_reruns_nothing(cfg):
    assert rerun_rules(cfg) == set()


def test_a_carrier_parameter_reaches_only_the_carrier_analyses(cfg):
    kl = cfg["carrier"]["kl_max"] * 2
    assert rerun_rules(cfg, **{"carrier.kl_max": kl}) == {
        "carriers",
        "cross_anchor",
        "interventions",
    }


def test_the_prompt_filter_switch_reaches_the_source_models_extraction(cfg):
    changed = rerun_rules(cfg, **{"carrier.filter_prompts": not cfg["carrier"]["filter_prompts"]})
    assert changed == {"carriers", "cross_anchor", "interventions"}
    from rgeom.stage_params import extract_params

    flipped = {**cfg, "carrier": {**cfg["carrier"], "filter_prompts": True}}
    # Only the base cell scores prompts for the filter; trained cells never do.
    assert extract_params(flipped, "sft", 2, "base") == extract_params(cfg, "sft", 2, "base")
    assert extract_params(flipped, "base", 0, "base") != extract_params(
        {**cfg, "carrier": {**cfg["carrier"], "filter_prompts": False}}, "base", 0, "base"
    )


def test_the_bootstrap_count_reaches_only_the_metrics(cfg):
    n = cfg["judge"]["bootstrap"] // 2
    assert rerun_rules(cfg, **{"judge.bootstrap": n}) == {"metrics", "adaptive_metrics"}


def test_a_new_judge_reaches_the_scoring_jobs(cfg):
    other = (
        "harmfulness_judge"
        if cfg["judge"]["harmbench"] != "harmfulness_judge"
        else "refusal_matcher"
    )
    changed = rerun_rules(cfg, **{"judge.harmbench": other})
    assert changed == {"judge", "adaptive_judge", "validate_judges", "interventions"}


@pytest.mark.parametrize(
    "key", ["generate.batch_size", "generate.shard_size", "judge.batch_size", "data.shared_dir"]
)
def test_speed_knobs_and_the_data_folder_rerun_nothing(cfg, key):
    section, name = key.split(".")
    value = cfg[section][name]
    new = "/elsewhere" if isinstance(value, str) else (value or 1) * 2 + 1
    assert rerun_rules(cfg, **{key: new}) == set()


def test_the_generation_length_reaches_generation_not_training_or_searches(cfg):
    n = cfg["generate"]["max_new_tokens"] + 2
    assert rerun_rules(cfg, **{"generate.max_new_tokens": n}) == {
        "generate",
        "adaptive_generate",
    }


def test_the_utility_audit_reaches_only_itself(cfg):
    assert rerun_rules(cfg, **{"utility_shift.limit": 4}) == {"utility_shift"}


def test_drift_settings_reach_only_drift(cfg):
    assert rerun_rules(cfg, **{"drift.n_null": cfg["drift"]["n_null"] + 1}) == {"drift"}


def test_every_rule_with_tracked_params_is_listed():
    """tracked_params names real rules, and every rule that runs a stage has an entry."""
    import re

    from rgeom.stage_params import tracked_params

    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^rule (\w+):", smk.read_text(), re.M))
    listed = set(tracked_params(validate({}, source="test")))
    assert listed <= rules, listed - rules
    # Rules with no parameters of their own: they merge, publish, log or collect.
    untracked_rules = {
        "attack_gcg_merge",
        "test_cases",
        "train_log",
        "directions",
        "record_config",
        "publish_summary",
    }
    assert rules - listed == untracked_rules
