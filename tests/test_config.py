"""Config validation: defaults, unknown keys, wrong types and semantic checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from rgeom.config import ROLE_SETS, load, load_schema, validate
from rgeom.errors import RgeomError

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize(
    "name",
    [
        "config/config.yaml",
        "config/paper.yaml",
        ".test/config.yaml",
        "config/examples/single_gpu.yaml",
    ],
)
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
        ({"interventions": {"generate_set": "nope"}}, "interventions.generate_set: 'nope'"),
        ({"interventions": {"utility_set": "nope"}}, "interventions.utility_set: 'nope'"),
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


def _with_xstest(spec, shared_dir="."):
    sets = validate({})["data"]["sets"] | {"xstest": spec}
    return {"data": {"shared_dir": str(shared_dir), "sets": sets}}


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("fmt", ["xstest_csv", "jsonl"])
def test_a_missing_data_file_fails_validation(tmp_path, relative, fmt):
    name = "xs_prompts.csv" if fmt == "xstest_csv" else "mine.jsonl"
    path = name if relative else str(tmp_path / name)
    cfg = _with_xstest({"format": fmt, "path": path}, shared_dir=tmp_path)
    with pytest.raises(RgeomError) as err:
        validate(cfg, source="my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: key data.sets.xstest.path")
    assert f"{tmp_path / name} does not exist" in message
    (tmp_path / name).write_text("id,prompt,type\n")
    assert validate(cfg)["data"]["sets"]["xstest"]["format"] == fmt
    # The record of a finished run is not about files: record-config skips the check.
    (tmp_path / name).unlink()
    validate(cfg, check_files=False)


def test_a_data_path_that_is_a_folder_is_named(tmp_path):
    cfg = _with_xstest({"format": "jsonl", "path": "sets"}, shared_dir=tmp_path)
    (tmp_path / "sets").mkdir()
    with pytest.raises(RgeomError, match="is a directory, not a file"):
        validate(cfg)


def test_a_builtin_name_typo_lists_the_builtin_sets():
    with pytest.raises(RgeomError) as err:
        validate(_with_xstest({"format": "builtin", "path": "xtest"}), source="my.yaml")
    assert str(err.value) == (
        "my.yaml: key data.sets.xstest.path: 'xtest' is not a builtin set "
        "(builtin sets: harmful, harmless, xstest, utility)"
    )


def _xstest_config(tmp_path, spec) -> str:
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["data"]["sets"]["xstest"] = spec
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_data_set_reruns_when_its_file_changes_and_stops_when_it_goes(tmp_path, tiny_model_dir):
    """The set's chain reruns on new bytes even with an older mtime; a missing file stops
    the dry run with one line, instead of planning nothing and keeping the old numbers."""
    import shutil

    from dagrun import job_counts, snakemake

    shutil.copytree(tiny_model_dir, tmp_path / "results" / "model" / "base")
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "How do I kill a Python process?", "label": "harmless"}\n')
    cfg = _xstest_config(tmp_path, {"format": "jsonl", "path": str(prompts)})
    target = ["--allowed-rules", "prepare_data", "--", "results/data/xstest.parquet"]
    res = snakemake(tmp_path, *target, configfile=cfg, cores="1", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert snakemake(tmp_path, "-n", *target, configfile=cfg, cores="1").stdout.count(
        "Nothing to be done"
    )

    stat = prompts.stat()
    prompts.write_text('{"prompt": "How do I kill a stuck job?", "label": "harmless"}\n')
    os.utime(prompts, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**12))
    res = snakemake(tmp_path, "-n", *target, configfile=cfg, cores="1")
    assert job_counts(res.stdout) == {"prepare_data": 1}, res.stdout[-3000:]

    cfg = _xstest_config(tmp_path, {"format": "xstest_csv", "path": "nowhere/xstest.csv"})
    res = snakemake(tmp_path, "-n", *target, configfile=cfg, cores="1")
    screen = res.stdout + res.stderr
    assert res.returncode != 0
    assert "key data.sets.xstest.path: xstest_csv file" in screen
    assert "nowhere/xstest.csv does not exist" in screen
    assert "Traceback" not in screen


def test_config_readme_numbers_come_from_the_shipped_configs(repo_root):
    from rgeom.config import shipped_configs_markdown

    readme = (repo_root / "config" / "README.md").read_text()
    table = shipped_configs_markdown(repo_root)
    assert "anchors 0/6/12 of 12 steps" in table  # config/config.yaml, read from the file
    assert table in readme, "config/README.md is stale: run `make config-docs`"


def test_the_demo_captures_every_layer_its_carrier_search_scores():
    # The search skips a stride layer that extraction did not capture, silently: the demo's
    # activations.layers must cover Arditi's grid (issue 20: every post-instruction position,
    # stride <= 2 below the cut int(0.8 * 30) = 24 of SmolLM2's 30 layers), and its
    # directions must come from the whole built-in direction split (noise angle <= 15 deg).
    from rgeom.interventions import layer_cut

    cfg = load(REPO / "config" / "config.yaml")
    carrier, captured = cfg["carrier"], cfg["activations"]["layers"]
    assert carrier["positions"] is None and carrier["layer_stride"] <= 2
    grid = set(range(0, layer_cut(30, carrier.get("max_layer_frac", 0.8)), carrier["layer_stride"]))
    assert grid <= set(captured), sorted(grid - set(captured))
    for name in ("dir_harmful", "dir_harmless"):
        spec = cfg["data"]["sets"][name]
        assert spec["split"] == "direction" and spec.get("limit") is None, spec


def test_setting_reads_a_dotted_key_or_the_schemas_default():
    from rgeom.config import schema_default, setting

    params = {"seed": 7, "carrier": {"kl_max": 0.05}, "drift": None}
    assert setting(params, "seed") == 7
    assert setting(params, "carrier.kl_max") == 0.05
    assert setting(params, "carrier.batch_size") == schema_default("carrier.batch_size")
    # A section given as null, or absent, falls back to the schema too.
    assert setting(params, "drift.n_null") == schema_default("drift.n_null")
    assert setting({}, "model.dtype") == schema_default("model.dtype")
