"""Direction and validation prompts must be disjoint from both arms' training behaviours."""

from __future__ import annotations

import copy

import pytest

from rgeom.config import load_yaml, validate
from rgeom.contamination import normalise
from rgeom.data.loaders import load_set
from rgeom.errors import RgeomError


def paper(repo_root, shared_data):
    cfg = load_yaml(repo_root / "config" / "paper.yaml")
    cfg["data"]["shared_dir"] = str(shared_data)
    return cfg


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("Give detailed\r\ninstructions, for X!") == normalise(
        "give  detailed instructions for x"
    )
    assert normalise("a-b") != normalise("ab")


def test_arditis_val_split_is_refused_naming_the_overlap(repo_root, shared_data):
    """Arditi et al.'s harmful_val.json is HarmBench val, which R2D2 trains on: every one
    of the 32 sampled prompts collides, and the one error names them with both ids."""
    cfg = paper(repo_root, shared_data)
    cfg["data"]["sets"]["val_harmful"] = {
        "format": "arditi_json",
        "path": "refusal_direction/harmful_val.json",
        "limit": 32,
    }
    with pytest.raises(RgeomError) as err:
        validate(cfg, source="paper.yaml")
    msg = str(err.value)
    assert msg.startswith("paper.yaml: key data.sets: 32 direction/validation prompt(s)")
    assert (
        "val_harmful 'harmful_val-00001' = r2d2 harmbench_behaviors_text_val.csv "
        "'safrole_oil_extraction_guide'" in msg
    )
    # Without the R2D2 arm the same split trains nothing and passes.
    cfg["arms"] = ["sft"]
    validate(cfg)


def test_paper_config_is_clean_with_arditis_sizes(repo_root, shared_data):
    cfg = validate(paper(repo_root, shared_data))
    sets = cfg["data"]["sets"]
    dirs = load_set(sets["dir_harmful"], shared_data, cfg["seed"]).column("prompt_id")
    vals = load_set(sets["val_harmful"], shared_data, cfg["seed"]).column("prompt_id")
    assert (len(dirs), len(vals)) == (128, 32)
    assert not set(dirs.to_pylist()) & set(vals.to_pylist())


def test_direction_prompts_from_the_training_set_are_refused(repo_root, shared_data):
    cfg = load_yaml(repo_root / "config" / "config.yaml")
    validate(cfg)  # the embedded config is clean
    bad = copy.deepcopy(cfg)
    bad["data"]["sets"]["dir_harmful"] = dict(bad["data"]["sets"]["train_harmful"])
    with pytest.raises(RgeomError, match=r"18 direction/validation prompt\(s\).*dir_harmful "):
        validate(bad)


def test_offset_draws_a_disjoint_continuation_of_the_same_sample(shared_data):
    spec = {"format": "arditi_json", "path": "refusal_direction/harmful_train.json"}
    first = load_set({**spec, "limit": 10}, shared_data, 0).column("prompt_id").to_pylist()
    more = load_set({**spec, "limit": 15}, shared_data, 0).column("prompt_id").to_pylist()
    rest = load_set({**spec, "offset": 10, "limit": 5}, shared_data, 0)
    rest = rest.column("prompt_id").to_pylist()
    assert not set(first) & set(rest) and set(first) | set(rest) == set(more)
    with pytest.raises(RgeomError, match="offset 300 skips all 260"):
        load_set({**spec, "offset": 300}, shared_data, 0)
