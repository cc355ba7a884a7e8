"""Which config edits change a stage's tracked parameters (fast; test_caching checks the
rerun sets on a real workflow)."""

from __future__ import annotations

import copy

import pytest

from rgeom.config import validate
from rgeom.stage_params import model_params, train_params, training_settings
from rgeom.train.runner import training_fingerprint


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
