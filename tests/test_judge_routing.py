"""The configured judge, not the embedded matcher alone, scores adaptive attacks and the
interventions' generations (issue 15, item 18).

A scripted HarmBench classifier answers the opposite of what the matcher would say, so a
stage that still used the matcher alone would get every verdict wrong.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from rgeom.attacks import testcases as T
from rgeom.causal import judge_generations
from rgeom.data import PROMPT_SCHEMA
from rgeom.io import read_table, write_table
from rgeom.judges import model_judges as mj

REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLY = "Sure, here is a detailed plan: first gather the materials, then follow each step."
HB = {"harmbench": "harmbench_classifier", "harmbench_model": {"path": "scripted"}}


class Classifier(mj.JudgeLM):
    """Says "Yes" to a refusal and "No" to compliance: the matcher's opposite."""

    def __init__(self, tokenizer):
        super().__init__(path="scripted", model=None, tokenizer=tokenizer)

    def generate(self, prompts, max_new_tokens, chat=False, system=None):
        self.calls.append(list(prompts))
        return ["Yes" if "I cannot help" in p else "No" for p in prompts]


def _loader(judge):
    return lambda spec, name: judge


def _behaviours(tmp_path, n):
    rows = [
        {
            "prompt_id": f"b{i}",
            "source": "t",
            "split": "test",
            "text": f"Behaviour text {i}",
            "context": "CTX" if i == 0 else None,
            "category": "chem",
            "label": "harmful",
            "target": None,
        }
        for i in range(n)
    ]
    path = tmp_path / "behaviours.parquet"
    write_table(path, pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), PROMPT_SCHEMA, {})
    return str(path)


def test_adaptive_attacks_are_scored_by_the_configured_classifier(tmp_path, tiny):
    _, tok = tiny
    behaviours = _behaviours(tmp_path, 2)
    completions = tmp_path / "adaptive_gcg_completions.parquet"
    table = pa.table(
        {
            "arm": ["r2d2", "r2d2"],
            "step": pa.array([50, 50], pa.int32()),
            "behavior_id": ["b0", "b1"],
            "category": ["chem", "chem"],
            "target": ["Sure, here is 0", "Sure, here is 1"],
            "suffix": ["! !", "! !"],
            "test_case": ["Behaviour text 0 ! !", "Behaviour text 1 ! !"],
            "loss": [1.0, 1.0],
            "initial_loss": [2.0, 2.0],
            "completion": [REFUSAL, COMPLY],
        },
        schema=T.ADAPTIVE_COMPLETION_SCHEMA,
    )
    write_table(completions, table, T.ADAPTIVE_COMPLETION_SCHEMA, {})
    judge = Classifier(tok)
    out, metrics = tmp_path / "adaptive.parquet", tmp_path / "metrics.parquet"
    T.judge_adaptive(
        str(completions), str(out), str(metrics), {"bootstrap": 0, **HB}, 0, {},
        prompts=behaviours, loader=_loader(judge),
    )  # fmt: skip
    rows = read_table(out, T.ADAPTIVE_SCHEMA).to_pylist()
    # The classifier's verdicts, although the matcher calls b0 a refusal and b1 compliance.
    assert [r["success"] for r in rows] == [True, False]
    assert [r["refused"] for r in rows] == [True, False]
    assert {r["judge"] for r in rows} == {"refusal_matcher+harmbench_classifier"}
    # It read the original behaviour (and b0's context), not the attacked test case.
    assert "[CONTEXT]:\nCTX\n\n[BEHAVIOR]:\nBehaviour text 0\n" in judge.calls[0][0]
    met = {r["metric"]: r for r in read_table(metrics).to_pylist()}
    assert met["asr"]["value"] == 0.5 and met["asr"]["judge"] == "harmbench_classifier"
    assert met["asr"]["benchmark"] == "adaptive_gcg"
    assert met["n_classifier_invalid"]["value"] == 0
    # Without a model judge the matcher decides, as before.
    T.judge_adaptive(str(completions), str(out), str(metrics), {"bootstrap": 0}, 0, {})
    assert [r["success"] for r in read_table(out).to_pylist()] == [False, True]


def test_intervention_generations_are_scored_by_the_configured_classifier(tmp_path, tiny):
    _, tok = tiny
    behaviours = _behaviours(tmp_path, 3)
    rows = [
        {"intervention": "none", "_completions": [REFUSAL, REFUSAL, COMPLY]},
        {"intervention": "ablation", "_completions": [COMPLY, COMPLY, COMPLY]},
    ]
    judge = Classifier(tok)
    name = judge_generations(rows, behaviours, 3, HB, {"arm": "sft", "step": 5}, _loader(judge))
    assert name == "refusal_matcher+harmbench_classifier"
    assert len(judge.calls) == 1  # one load and one pass for every condition
    assert rows[0]["asr"] == pytest.approx(2 / 3) and rows[1]["asr"] == 0.0
    # The refusal rate stays the matcher's reading of the same generations.
    assert rows[0]["refusal_rate"] == pytest.approx(2 / 3) and rows[1]["refusal_rate"] == 0.0
    plain = [dict(r) for r in rows]
    assert judge_generations(plain, behaviours, 3, {}, {}) == "refusal_matcher"
    assert plain[0]["asr"] == pytest.approx(1 / 3) and plain[1]["asr"] == 1.0
