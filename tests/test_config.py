"""Config validation: defaults, unknown keys, wrong types and semantic checks."""

from __future__ import annotations

import pytest
import yaml

from rgeom.config import ROLE_SETS, load, load_schema, validate
from rgeom.errors import RgeomError


def _walk(schema, path=""):
    if schema.get("type") == "object" or "properties" in schema:
        for key, sub in schema.get("properties", {}).items():
            yield f"{path}{key}", sub
            yield from _walk(sub, f"{path}{key}.")


def test_every_schema_key_has_type_description_default():
    schema = load_schema()
    keys = list(_walk(schema))
    keys += list(_walk(schema["definitions"]["dataset"], "data.sets.*."))
    assert len(keys) > 40
    for key, sub in keys:
        assert "type" in sub, key
        assert sub.get("description"), key
        assert "default" in sub, key


def test_defaults_fill_an_empty_config():
    cfg = validate({})
    assert cfg["train"]["max_steps"] >= max(cfg["anchors"])
    assert set(ROLE_SETS) <= set(cfg["data"]["sets"])


@pytest.mark.parametrize("name", ["config/config.yaml", "config/paper.yaml", ".test/config.yaml"])
def test_shipped_configs_validate(repo_root, name):
    cfg = load(repo_root / name)
    assert cfg["anchors"][0] == 0


def test_paper_config_keeps_the_paper_protocol(repo_root):
    cfg = load(repo_root / "config/paper.yaml")
    assert cfg["anchors"] == [0, 50, 100, 250, 500]
    assert cfg["arms"] == ["sft", "r2d2"]
    assert cfg["model"]["source"] == "hf"


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"train": {"max_steps": "abc"}}, "train.max_steps"),
        ({"trian": {}}, "unknown key trian"),
        ({"train": {"foo": 1}}, "unknown key train.foo"),
        ({"anchors": [0, 20, 10]}, "strictly increasing"),
        ({"anchors": [0, 50]}, "beyond train.max_steps"),
        ({"arms": ["dpo"]}, "unknown arm 'dpo'"),
        ({"train": {"zero_stage": 1}}, "train.zero_stage"),
        ({"benchmarks": ["nope"]}, "benchmarks"),
        ({"model": {"source": "gguf"}}, "model.source"),
        ({"data": {"sets": {"harmbench": {"format": "builtin"}}}}, "train_harmful"),
        ({"data": {"sets": {"x": {"format": "csv"}}}}, "data.sets.x.format"),
    ],
)
def test_bad_config_names_the_key(config, needle):
    with pytest.raises(RgeomError) as err:
        validate(config, source="my.yaml")
    assert needle in str(err.value)
    assert str(err.value).startswith("my.yaml")


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RgeomError, match="c.yaml"):
        load(bad)
    with pytest.raises(RgeomError, match="not found"):
        load(tmp_path / "missing.yaml")
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(RgeomError, match="mapping"):
        load(bad)


def test_config_readme_lists_every_key(repo_root):
    from rgeom.config import schema_markdown

    readme = (repo_root / "config" / "README.md").read_text()
    assert schema_markdown() in readme, "config/README.md is stale: run `make config-docs`"
