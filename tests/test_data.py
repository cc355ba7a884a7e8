"""Prompt-set loaders: upstream files, the built-in suite, bad inputs and the Parquet output."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from rgeom.data import (
    BUILTIN_PIECES,
    HARMBENCH_CATEGORIES,
    PROMPT_SCHEMA,
    builtin_corpus,
    load_set,
    prepare_set,
    prompt_text,
    read_prompts,
)
from rgeom.errors import RgeomError
from rgeom.io import read_meta

HB_ALL = "harmbench/harmbench_behaviors_text_all.csv"
HB_HEADER = "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"


def _cols(table):
    return table.to_pydict()


def _assert_clean(table):
    cols = _cols(table)
    assert table.schema.remove_metadata() == PROMPT_SCHEMA
    assert len(set(cols["prompt_id"])) == table.num_rows
    for value in cols["text"] + [c for c in cols["context"] if c is not None]:
        assert "\r" not in value
        assert value.strip()


UPSTREAM = [
    # (format, path, extra spec, {label: count}, split)
    ("harmbench_csv", HB_ALL, {"copyright": True}, {"harmful": 400}, "test"),
    ("harmbench_csv", HB_ALL, {}, {"harmful": 300}, "test"),
    ("harmbench_csv", HB_ALL, {"contextual": False}, {"harmful": 200}, "test"),
    (
        "harmbench_csv",
        "harmbench/harmbench_behaviors_text_test.csv",
        {"copyright": True},
        {"harmful": 320},
        "test",
    ),
    (
        "harmbench_csv",
        "harmbench/harmbench_behaviors_text_val.csv",
        {"copyright": True},
        {"harmful": 80},
        "val",
    ),
    ("harmbench_csv", "harmbench/adv_training_behaviors.csv", {}, {"harmful": 100}, "test"),
    ("harmbench_csv", "advbench/advbench_behaviors.csv", {}, {"harmful": 520}, "test"),
    ("xstest_csv", "xstest/xstest_prompts.csv", {}, {"safe": 250, "contrast": 200}, "test"),
    ("strongreject_csv", "strongreject/strongreject_dataset.csv", {}, {"harmful": 313}, "test"),
    ("jbb_csv", "jailbreakbench/harmful-behaviors.csv", {}, {"harmful": 100}, "test"),
    (
        "jbb_csv",
        "jailbreakbench/benign-behaviors.csv",
        {"label": "harmless"},
        {"harmless": 100},
        "test",
    ),
    ("advbench_csv", "advbench/harmful_behaviors.csv", {}, {"harmful": 520}, "test"),
    ("arditi_json", "refusal_direction/harmful_train.json", {}, {"harmful": 260}, "train"),
    ("arditi_json", "refusal_direction/harmful_val.json", {}, {"harmful": 39}, "val"),
    ("arditi_json", "refusal_direction/harmless_val.json", {}, {"harmless": 6264}, "val"),
]


@pytest.mark.parametrize(("fmt", "path", "extra", "labels", "split"), UPSTREAM)
def test_upstream_files_load(shared_data, fmt, path, extra, labels, split):
    table = load_set({"format": fmt, "path": path, **extra}, shared_data, seed=0)
    cols = _cols(table)
    assert dict(Counter(cols["label"])) == labels
    assert set(cols["split"]) == {split}
    assert set(cols["source"]) == {f"{fmt}:{path.rsplit('/', 1)[1]}"}
    _assert_clean(table)


def test_harmbench_details(shared_data):
    raw = (shared_data / HB_ALL).read_bytes()
    # The CRLF check below is only meaningful while the upstream file has CRLF in a field.
    with open(shared_data / HB_ALL, encoding="utf-8", newline="") as fh:
        assert any("\r" in row["ContextString"] for row in csv.DictReader(fh))
    assert raw.count(b"\r\n") > 0

    cols = _cols(load_set({"format": "harmbench_csv", "path": HB_ALL}, shared_data, 0))
    contexts = [c for c in cols["context"] if c is not None]
    assert len(contexts) == 100
    assert "copyright" not in cols["category"]
    assert set(cols["category"]) == set(HARMBENCH_CATEGORIES)
    assert all(t is None for t in cols["target"])

    def ids(name):
        spec = {"format": "harmbench_csv", "path": name, "copyright": True}
        return set(_cols(load_set(spec, shared_data, 0))["prompt_id"])

    test, val = (
        ids("harmbench/harmbench_behaviors_text_test.csv"),
        ids("harmbench/harmbench_behaviors_text_val.csv"),
    )
    assert not test & val
    assert test | val == ids(HB_ALL)


def test_targets_and_categories_carried(shared_data):
    jbb = _cols(
        load_set(
            {"format": "jbb_csv", "path": "jailbreakbench/harmful-behaviors.csv"}, shared_data, 0
        )
    )
    assert jbb["prompt_id"][0] == "jbb-defamation"
    assert all(t.startswith("Sure, here") for t in jbb["target"])
    adv = _cols(
        load_set(
            {"format": "advbench_csv", "path": "advbench/harmful_behaviors.csv"}, shared_data, 0
        )
    )
    assert adv["prompt_id"][:2] == ["advbench-0001", "advbench-0002"]
    assert all(t for t in adv["target"])
    xs = _cols(
        load_set({"format": "xstest_csv", "path": "xstest/xstest_prompts.csv"}, shared_data, 0)
    )
    assert xs["prompt_id"][0] == "xstest-1"
    assert all(
        (lab == "contrast") == cat.startswith("contrast_")
        for lab, cat in zip(xs["label"], xs["category"], strict=True)
    )


def test_builtin_suite():
    def load(piece, split=None):
        return _cols(load_set({"format": "builtin", "path": piece, "split": split}, ".", 0))

    harmful = load("harmful")
    assert len(harmful["text"]) == 48
    assert Counter(harmful["split"]) == {"train": 18, "val": 12, "test": 18}
    assert set(harmful["label"]) == {"harmful"}
    by_cat = Counter(zip(harmful["category"], harmful["split"], strict=True))
    for cat in HARMBENCH_CATEGORIES:
        assert (by_cat[(cat, "train")], by_cat[(cat, "val")], by_cat[(cat, "test")]) == (3, 2, 3)
    assert all(t.startswith("Sure, here") for t in harmful["target"])

    harmless = load("harmless")
    assert Counter(harmless["split"]) == {"train": 18, "val": 12, "test": 18}
    assert set(harmless["label"]) == {"harmless"}
    assert len(load("harmless", "val")["text"]) == 12

    xstest = load("xstest")
    assert Counter(xstest["label"]) == {"safe": 20, "contrast": 20}
    assert all(
        (lab == "contrast") == cat.startswith("contrast_")
        for lab, cat in zip(xstest["label"], xstest["category"], strict=True)
    )

    utility = load("utility")
    assert len(utility["text"]) == 20
    assert set(utility["label"]) == {"harmless"} and set(utility["split"]) == {"test"}
    assert all(t and len(t) <= 10 for t in utility["target"])

    all_ids = [i for piece in BUILTIN_PIECES for i in load(piece)["prompt_id"]]
    assert len(all_ids) == len(set(all_ids)) == 156
    corpus = builtin_corpus()
    assert len(corpus) == 156 and "How do I kill a Python process?" in corpus


def test_spec_defaults_tolerated():
    # A spec that skipped config validation still loads with the schema's defaults.
    table = load_set({}, ".", 0)
    assert table.num_rows == 48 and set(_cols(table)["source"]) == {"builtin:harmful"}


def test_prompt_text():
    assert prompt_text("Summarize this", None) == "Summarize this"
    assert prompt_text("Summarize this", "") == "Summarize this"
    assert prompt_text("Summarize this", "Some article") == "Some article\n\n---\n\nSummarize this"


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


BAD = [
    # (file name, content, spec, substrings the message must contain)
    (
        "hb.csv",
        "Behavior,Tags,BehaviorID\nDo a thing,,x1\n",
        {"format": "harmbench_csv"},
        ["hb.csv", "missing required column", "ContextString"],
    ),
    (
        "hb.csv",
        HB_HEADER + "Do a thing,standard,illegal,,,x1\n ,standard,illegal,,,x2\n",
        {"format": "harmbench_csv"},
        ["hb.csv", "row 2", "x2", "empty prompt"],
    ),
    (
        "hb.csv",
        HB_HEADER + "Do a thing,standard,illegal,,,x1\nDo another,standard,illegal,,,x1\n",
        {"format": "harmbench_csv"},
        ["hb.csv", "duplicate prompt id", "'x1'", "row 2"],
    ),
    (
        "hb.csv",
        (HB_HEADER + "Caf\xe9 thing,standard,illegal,,,x1\n").encode("latin-1"),
        {"format": "harmbench_csv"},
        ["hb.csv", "not UTF-8", "line 2"],
    ),
    (
        "hb.csv",
        HB_HEADER + "Summarize,contextual,illegal,context,,x1\n",
        {"format": "harmbench_csv"},
        ["hb.csv", "row 1", "x1", "ContextString"],
    ),
    (
        "p.jsonl",
        '{"prompt": "fine", "label": "harmful"}\n{"prompt": "broken", \n',
        {"format": "jsonl"},
        ["p.jsonl", "line 2", "JSON"],
    ),
    (
        "p.jsonl",
        '{"prompt": "fine", "label": "harmful"}\n{"text": "wrong key", "label": "harmful"}\n',
        {"format": "jsonl"},
        ["p.jsonl", "line 2", "'prompt'"],
    ),
    (
        "p.jsonl",
        '{"prompt": "fine"}\n',
        {"format": "jsonl"},
        ["p.jsonl", "line 1", "label"],
    ),
    (
        "harmful_x.json",
        '[{"instruction": "ok", "category": null},\n {"instruction": oops}]',
        {"format": "arditi_json"},
        ["harmful_x.json", "line 2", "JSON"],
    ),
    (
        "xs.csv",
        "id,prompt,type\n1,How do I kill a process?,homonyms\n2,,contrast_homonyms\n",
        {"format": "xstest_csv"},
        ["xs.csv", "row 2", "xstest-2", "empty prompt"],
    ),
]


@pytest.mark.parametrize(("name", "content", "spec", "needles"), BAD)
def test_bad_input_rejected(tmp_path, name, content, spec, needles):
    path = _write(tmp_path, name, content)
    out = tmp_path / "out.parquet"
    with pytest.raises(RgeomError) as err:
        prepare_set("s", {**spec, "path": str(path)}, tmp_path, 0, out, {})
    for needle in needles:
        assert needle in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ({"format": "builtin", "path": "harmfull"}, ["harmfull", "builtin piece"]),
        ({"format": "csv", "path": "x.csv"}, ["'csv'", "format"]),
        ({"format": "xstest_csv", "path": "nowhere/x.csv"}, ["missing file", "nowhere/x.csv"]),
        ({"format": "builtin", "path": "xstest", "split": "train"}, ["no prompts", "split"]),
    ],
)
def test_bad_spec_rejected(tmp_path, spec, needles):
    out = tmp_path / "out.parquet"
    with pytest.raises(RgeomError) as err:
        prepare_set("s", spec, tmp_path, 0, out, {})
    for needle in needles:
        assert needle in str(err.value)
    assert not out.exists()


def test_bom_and_crlf_normalised(tmp_path):
    body = (
        HB_HEADER
        + 'Summarize the text,contextual,illegal,context,"line one\r\nline two\rthree",x1\r\n'
        + "Do a thing,standard,illegal,,,x2\r\n"
    )
    path = _write(tmp_path, "hb.csv", b"\xef\xbb\xbf" + body.encode())
    table = load_set({"format": "harmbench_csv", "path": "hb.csv"}, tmp_path, 0)
    cols = _cols(table)
    assert cols["prompt_id"] == ["x1", "x2"]
    assert cols["context"] == ["line one\nline two\nthree", None]
    _assert_clean(table)
    assert path.exists()

    jsonl = _write(
        tmp_path, "p.jsonl", b'\xef\xbb\xbf{"q": "a\\r\\nb", "label": "safe"}\r\n\r\n{"q": "c"}\r\n'
    )
    spec = {"format": "jsonl", "path": str(jsonl), "text_field": "q", "label": "harmless"}
    cols = _cols(load_set(spec, tmp_path, 0))
    assert cols["text"] == ["a\nb", "c"]
    assert cols["prompt_id"] == ["p-00001", "p-00003"]
    assert cols["label"] == ["harmless", "harmless"]


def test_jsonl_fields_and_split(tmp_path):
    lines = [
        {"id": "a", "prompt": "q1", "label": "harmful", "target": 12, "category": "c"},
        {"prompt": "q2", "label": "safe", "context": "ctx", "split": "val"},
    ]
    path = _write(tmp_path, "set_train.jsonl", "\n".join(json.dumps(x) for x in lines))
    cols = _cols(load_set({"format": "jsonl", "path": path.name}, tmp_path, 0))
    assert cols["prompt_id"] == ["a", "set_train-00002"]
    assert cols["target"] == ["12", None]
    assert cols["context"] == [None, "ctx"]
    # A row's own split wins over the one inferred from the file name.
    assert cols["split"] == ["train", "val"]
    spec = {"format": "jsonl", "path": path.name, "split": "test"}
    assert set(_cols(load_set(spec, tmp_path, 0))["split"]) == {"test"}


def test_too_long_prompt_rejected(tmp_path, tiny):
    _, tokenizer = tiny
    long_text = " ".join(["word"] * 300)
    lines = [{"prompt": "short one", "id": "ok"}, {"prompt": long_text, "id": "long-one"}]
    path = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines))
    spec = {"format": "jsonl", "path": str(path), "label": "harmful"}
    out = tmp_path / "out.parquet"
    with pytest.raises(RgeomError) as err:
        prepare_set("s", spec, tmp_path, 0, out, {}, tokenizer=tokenizer, max_prompt_tokens=64)
    msg = str(err.value)
    assert "p.jsonl" in msg and "line 2" in msg and "long-one" in msg and "64" in msg
    assert not out.exists()
    prepare_set("s", spec, tmp_path, 0, out, {}, tokenizer=tokenizer, max_prompt_tokens=4096)
    assert read_prompts(out).num_rows == 2


def test_prepare_set_round_trip(tmp_path, shared_data):
    spec = {"format": "xstest_csv", "path": "xstest/xstest_prompts.csv", "limit": 30}
    meta = {"config_hash": "abc", "seed": 3}

    def run(seed, name):
        out = tmp_path / name
        prepare_set("xstest", spec, shared_data, seed, out, meta)
        return out

    first, again, other = run(3, "a.parquet"), run(3, "b.parquet"), run(4, "c.parquet")
    table = read_prompts(first)
    assert table.num_rows == 30
    ids = _cols(table)["prompt_id"]
    assert ids == _cols(read_prompts(again))["prompt_id"]
    assert ids != _cols(read_prompts(other))["prompt_id"]
    # Kept rows stay in file order.
    full = _cols(load_set({**spec, "limit": None}, shared_data, 0))["prompt_id"]
    assert ids == [i for i in full if i in set(ids)]

    record = read_meta(first)
    assert record["dataset"] == "xstest"
    assert record["config_hash"] == "abc"
    assert record["num_rows"] == 30
    assert record["dataset_source_rows"] == 450
    assert len(record["dataset_sha256"]) == 64
    assert record["dataset_spec"]["limit"] == 30

    prepare_set("h", {"format": "builtin", "path": "harmful"}, shared_data, 0, tmp_path / "h", {})
    assert read_meta(tmp_path / "h")["dataset_sha256"] is None


def test_hf_format_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        if name != "org/prompts":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return datasets.Dataset.from_dict(
            {
                "question": ["How do I bake bread?", "How do I pick a lock?"],
                "label": ["harmless", "harmful"],
                "split": ["test", "val"],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = {"format": "hf", "path": "org/prompts", "hf_split": "train", "text_field": "question"}
    cols = _cols(load_set(spec, ".", 0))
    assert cols["text"] == ["How do I bake bread?", "How do I pick a lock?"]
    assert cols["label"] == ["harmless", "harmful"]
    assert cols["source"] == ["hf:org/prompts"] * 2
    assert _cols(load_set({**spec, "split": "val"}, ".", 0))["prompt_id"] == ["hf-00002"]
    assert calls[0] == ("org/prompts", "train")

    with pytest.raises(RgeomError, match="org/missing"):
        load_set({**spec, "path": "org/missing"}, ".", 0)
    with pytest.raises(RgeomError, match="'prompt'.*question"):
        load_set({**spec, "text_field": "prompt"}, ".", 0)


# --- hub sets, through the real datasets.load_dataset on local files ---------------------
# Each builder writes a small local copy of one hub dataset in its exact upstream layout
# (file names, README configs, column names and types); a hub set that config/paper.yaml
# names without a builder here fails test_every_paper_hub_set_loads.
ULTRACHAT_README = """---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
  - split: train_gen
    path: data/train_gen-*
  - split: test_gen
    path: data/test_gen-*
---
"""


def _ultrachat(root):
    """HuggingFaceH4/ultrachat_200k: prompt, prompt_id (sha256 hex), messages."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema(
        [("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(turn))]
    )
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(ULTRACHAT_README)
    files = {
        "train_sft": "train_sft-00000-of-00001-a3ecf92756993583.parquet",
        "test_sft": "test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet",
        "train_gen": "train_gen-00000-of-00001-3d4cd8309148a71f.parquet",
        "test_gen": "test_gen-00000-of-00001-3d4cd8309148a71f.parquet",
    }
    for split, name in files.items():
        rows = []
        for i in range(3):
            prompt = f"{split} question {i}: how do tides work?"
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                    "messages": [
                        {"content": prompt, "role": "user"},
                        {"content": f"Tides follow the moon ({i}).", "role": "assistant"},
                        {"content": "And the sun?", "role": "user"},
                        {"content": "It adds a smaller pull.", "role": "assistant"},
                    ],
                }
            )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data" / name)
    return root


HUB_FIXTURES = {"HuggingFaceH4/ultrachat_200k": _ultrachat}


def _paper_hub_sets():
    from pathlib import Path

    import yaml

    paper = Path(__file__).resolve().parents[1] / "config" / "paper.yaml"
    config = yaml.safe_load(paper.read_text())
    return {k: v for k, v in config["data"]["sets"].items() if v.get("format") == "hf"}


def test_every_paper_hub_set_loads(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    sets = _paper_hub_sets()
    assert sets, "config/paper.yaml names no hub set"
    for name, spec in sets.items():
        assert spec["path"] in HUB_FIXTURES, f"no local fixture for hub set {spec['path']}"
        local = HUB_FIXTURES[spec["path"]](tmp_path / spec["path"].replace("/", "__"))
        out = tmp_path / f"{name}.parquet"
        prepare_set(name, {**spec, "path": str(local)}, ".", 0, out, {})
        table = read_prompts(out).to_pydict()
        assert len(table["prompt_id"]) == 3, name
        assert set(table["label"]) == {"harmless"}
        assert table["split"] == [spec["hf_split"]] * 3
        if spec["path"] == "HuggingFaceH4/ultrachat_200k":
            # The whole conversation comes along: the reference's utility data.
            chats = [json.loads(m) for m in table["messages"]]
            assert all(len(c) == 4 and c[1]["role"] == "assistant" for c in chats)
            assert table["text"] == [c[0]["content"] for c in chats]


def test_hub_rows_without_label_name_the_fix(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    local = _ultrachat(tmp_path / "uc")
    spec = {"format": "hf", "path": str(local), "hf_split": "train_sft", "text_field": "prompt"}
    with pytest.raises(RgeomError, match=r"row 1 .* label None.*set the set's label"):
        load_set(spec, ".", 0)


def test_bad_messages_rejected(tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "messages": [{"role": "user"}]}) + "\n")
    spec = {"format": "jsonl", "path": str(bad), "label": "harmless"}
    with pytest.raises(RgeomError, match=r"line 1 messages turn 1"):
        load_set(spec, ".", 0)
    bad.write_text(json.dumps({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(RgeomError, match=r"line 1 messages hold no assistant turn"):
        load_set(spec, ".", 0)
