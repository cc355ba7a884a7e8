"""Multiple-choice utility benchmarks (issue 15, item 20): MMLU and ARC through ``datasets``,
tested on small local files in the hub's exact format (cais/mmlu: question, subject,
choices, answer; allenai/ai2_arc: id, question, choices {text, label}, answerKey)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgeom.config import validate
from rgeom.data import load_set
from rgeom.data.loaders import mc_prompt
from rgeom.errors import RgeomError
from rgeom.judges import check_answer

MMLU_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("subject", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("answer", pa.int64()),  # a ClassLabel (A-D) on the hub: stored as its index
    ]
)
ARC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
        ("answerKey", pa.string()),
    ]
)
MMLU_ROWS = [
    {
        "question": "What is the SI unit of force?",
        "subject": "high_school_physics",
        "choices": ["joule", "newton", "watt", "pascal"],
        "answer": 1,
    },
    {
        "question": "Which organ pumps blood?",
        "subject": "anatomy",
        "choices": ["lung", "liver", "heart", "kidney"],
        "answer": 2,
    },
]
ARC_ROWS = [
    {
        "id": "Mercury_7175875",
        "question": "Which gas do plants take in for photosynthesis?",
        "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
    {
        # Some ARC questions are labelled 1-4; the answer key uses the same labels.
        "id": "NYSEDREGENTS_2015_4_8",
        "question": "What tool measures mass?",
        "choices": {"text": ["ruler", "balance", "thermometer", "clock"], "label": list("1234")},
        "answerKey": "2",
    },
]


@pytest.fixture()
def mmlu_file(tmp_path):
    path = tmp_path / "mmlu_test.parquet"
    pq.write_table(pa.Table.from_pylist(MMLU_ROWS, schema=MMLU_SCHEMA), path)
    return path


@pytest.fixture()
def arc_file(tmp_path):
    path = tmp_path / "arc_challenge_test.parquet"
    pq.write_table(pa.Table.from_pylist(ARC_ROWS, schema=ARC_SCHEMA), path)
    return path


def test_mmlu_rows_become_lettered_prompts_with_the_keys_letter(mmlu_file, tmp_path):
    rows = load_set({"format": "mmlu_hf", "path": str(mmlu_file)}, tmp_path, 0).to_pylist()
    assert [r["target"] for r in rows] == ["B", "C"]
    assert rows[0]["text"] == (
        "The following is a multiple choice question about high school physics. Answer with "
        "the letter of the correct option only.\n\nWhat is the SI unit of force?\n"
        "A. joule\nB. newton\nC. watt\nD. pascal\nAnswer:"
    )
    assert {r["label"] for r in rows} == {"harmless"}
    assert [r["category"] for r in rows] == ["utility:high_school_physics", "utility:anatomy"]
    assert {r["split"] for r in rows} == {"test"}  # from the file name
    assert len({r["prompt_id"] for r in rows}) == 2
    # The judge's answer check reads the model's letter against the key.
    assert check_answer("B", rows[0]["target"]) and check_answer("B. newton", rows[0]["target"])
    assert not check_answer("A", rows[0]["target"])


def test_arc_rows_are_relettered_in_file_order(arc_file, tmp_path):
    rows = load_set({"format": "arc_hf", "path": str(arc_file)}, tmp_path, 0).to_pylist()
    assert [r["prompt_id"] for r in rows] == ["Mercury_7175875", "NYSEDREGENTS_2015_4_8"]
    assert [r["target"] for r in rows] == ["B", "B"]
    assert rows[1]["text"] == mc_prompt(
        "What tool measures mass?", ["ruler", "balance", "thermometer", "clock"]
    )
    assert "\nA. ruler\nB. balance\nC. thermometer\nD. clock\nAnswer:" in rows[1]["text"]
    assert {r["category"] for r in rows} == {"utility:arc"}


def test_hub_ids_go_through_datasets_with_config_and_split(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(MMLU_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    spec = {"format": "mmlu_hf", "path": "cais/mmlu", "hf_config": "all", "hf_split": "test"}
    rows = load_set(spec, tmp_path, 0).to_pylist()
    assert calls == [("cais/mmlu", "all", "test")]
    assert [r["target"] for r in rows] == ["B", "C"] and rows[0]["split"] == "test"


def test_bad_mc_files_are_one_clear_error(tmp_path):
    bad = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": ["q"], "choices": [["a", "b"]], "answer": [0]}), bad)
    with pytest.raises(RgeomError, match=r"mmlu.parquet: missing column\(s\) subject"):
        load_set({"format": "mmlu_hf", "path": str(bad)}, tmp_path, 0)
    rows = [dict(MMLU_ROWS[0], answer=7)]
    pq.write_table(pa.Table.from_pylist(rows, schema=MMLU_SCHEMA), bad)
    with pytest.raises(RgeomError, match="row 0 answer 7 is not a choice index"):
        load_set({"format": "mmlu_hf", "path": str(bad)}, tmp_path, 0)
    arc = tmp_path / "arc.parquet"
    rows = [dict(ARC_ROWS[0], answerKey="E")]
    pq.write_table(pa.Table.from_pylist(rows, schema=ARC_SCHEMA), arc)
    with pytest.raises(RgeomError, match="answerKey 'E' is not one of its labels"):
        load_set({"format": "arc_hf", "path": str(arc)}, tmp_path, 0)
    with pytest.raises(RgeomError, match="missing file"):
        load_set({"format": "arc_hf", "path": str(tmp_path / "none.parquet")}, tmp_path, 0)


def test_paper_config_measures_utility_on_mmlu_and_the_demo_keeps_the_builtin_set():
    from pathlib import Path

    import yaml

    root = Path(__file__).parents[1]
    paper = validate(yaml.safe_load((root / "config/paper.yaml").read_text()), source="paper")
    utility = paper["data"]["sets"]["utility"]
    assert (utility["format"], utility["path"], utility["hf_config"]) == (
        "mmlu_hf",
        "cais/mmlu",
        "all",
    )
    assert utility["hf_split"] == "test"
    demo = validate(yaml.safe_load((root / "config/config.yaml").read_text()), source="demo")
    assert demo["data"]["sets"]["utility"]["format"] == "builtin"
