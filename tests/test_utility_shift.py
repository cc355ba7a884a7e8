"""Benign-utility audit: CE and KL(base || checkpoint) on the base model's answers."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from rgeom.io import read_table, write_table
from rgeom.models import build_tiny_model, encode_chat, load_model
from rgeom.utility_shift import SHIFT_SCHEMA, token_shift, utility_shift_table

GEN = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("label", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
    ]
)
PAIRS = [
    ("What is two plus two?", "The answer is four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are long, the answer"),
    ("How do I bake bread at home?", "Mix flour and water, then bake it."),
]


def _reference(tmp_path):
    rows = {
        "prompt_id": ["p0", "p1", "p2", "h0", "x0"],
        "label": ["harmless", "harmless", "safe", "harmful", "harmless"],
        "prompt": [p for p, _ in PAIRS] + ["bad", "empty"],
        "completion": [c for _, c in PAIRS] + ["Sure, here is how.", ""],
    }
    path = tmp_path / "gen.parquet"
    write_table(path, pa.table(rows, schema=GEN), GEN, {})
    return str(path)


def test_base_against_itself_has_zero_kl_and_equal_ce(tiny_model_dir, tiny):
    _, tok = tiny
    # Two independently loaded copies: nothing is shared but the weights on disk.
    a, b = load_model(tiny_model_dir), load_model(tiny_model_dir)
    shift = token_shift(a, b, tok, PAIRS, batch_size=2)
    assert (shift["n_tokens"] > 0).all()
    assert shift["kl"] == pytest.approx([0.0] * len(PAIRS), abs=1e-6)
    assert shift["ce"] == pytest.approx(shift["ce_base"], abs=1e-6)


def test_ce_matches_the_models_own_loss_and_kl_moves_with_the_weights(tiny_model_dir, tiny):
    _, tok = tiny
    base = load_model(tiny_model_dir)
    other = build_tiny_model(tok, seed=7).eval()
    shift = token_shift(other, base, tok, PAIRS, batch_size=3)
    assert (shift["kl"] > 1e-3).all()
    for i, (prompt, completion) in enumerate(PAIRS):
        pre = encode_chat(tok, prompt).ids
        body = tok(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = torch.tensor([pre + body])
        labels = ids.clone()
        labels[0, : len(pre)] = -100
        with torch.no_grad():
            loss_other = other(input_ids=ids, labels=labels).loss.item()
            loss_base = base(input_ids=ids, labels=labels).loss.item()
        assert shift["ce"][i] == pytest.approx(loss_other, rel=1e-4)
        assert shift["ce_base"][i] == pytest.approx(loss_base, rel=1e-4)
    # Batching (right padding) does not change any row.
    single = token_shift(other, base, tok, PAIRS, batch_size=1)
    assert single["kl"] == pytest.approx(shift["kl"], rel=1e-4)


def test_table_uses_harmless_rows_and_feeds_the_summary(tmp_path, tiny_model_dir, tiny):
    from rgeom.report import build_summary
    from rgeom.summary_inputs import SummaryInputs

    _, tok = tiny
    base = load_model(tiny_model_dir)
    other = build_tiny_model(tok, seed=3).eval()
    ref = _reference(tmp_path)
    paths = []
    for arm, step, model in (("base", 0, base), ("sft", 10, other)):
        out = tmp_path / f"{arm}.parquet"
        utility_shift_table(
            model, base, tok, [ref], str(out), {"bootstrap": 20}, 0, {"arm": arm, "step": step}
        )
        paths.append(str(out))
        t = read_table(out, SHIFT_SCHEMA).to_pylist()
        vals = {r["metric"]: r for r in t}
        # The harmful row is skipped; the empty answer is scored as its end-of-turn token.
        assert {r["n"] for r in t} == {4}
        if arm == "base":
            assert vals["utility_kl"]["value"] == pytest.approx(0.0, abs=1e-6)
            assert vals["utility_ce"]["value"] == pytest.approx(vals["utility_ce_base"]["value"])
        else:
            assert vals["utility_kl"]["value"] > 0
            assert vals["utility_kl"]["ci_low"] <= vals["utility_kl"]["value"]
    inputs = SummaryInputs([], [], utility_shift=paths)
    build_summary(inputs, str(tmp_path / "summary"), {"arms": ["sft"]}, {})
    summary = read_table(tmp_path / "summary" / "summary.parquet").to_pylist()
    by_step = {r["step"]: r for r in summary}
    assert set(by_step) == {0, 10}
    assert by_step[0]["utility_kl"] == pytest.approx(0.0, abs=1e-6)
    assert by_step[10]["utility_kl"] > 0 and "utility_ce_n" in by_step[10]
