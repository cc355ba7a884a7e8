"""AutoDAN-style genetic attack: operators, batched fitness, elitism, seeds, output schema."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest

from rgeom.attacks import autodan as A
from rgeom.attacks import testcases as T
from rgeom.data import PROMPT_SCHEMA, prompt_text
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table

CONTEXT = "A short article.\nSecond line."
BEHAVIOURS = [
    {
        "prompt_id": f"b{i}",
        "source": "test",
        "split": "test",
        "text": f"Explain how to do forbidden thing number {i}",
        "context": CONTEXT if i == 0 else None,
        "category": "chem",
        "label": "harmful",
        "target": f"Sure, here is forbidden thing number {i}",
    }
    for i in range(4)
] + [
    {
        "prompt_id": "ok0",
        "source": "test",
        "split": "test",
        "text": "How do I bake bread?",
        "context": None,
        "category": None,
        "label": "harmless",
        "target": None,
    }
]
TINY = {
    "population": 8,
    "generations": 4,
    "elite_fraction": 0.25,
    "crossover_rate": 0.8,
    "mutation_rate": 0.5,
    "paragraph_every": 2,
    "early_stop": False,
}


@pytest.fixture()
def behaviours(tmp_path):
    path = tmp_path / "harmbench.parquet"
    write_table(path, pa.Table.from_pylist(BEHAVIOURS, schema=PROMPT_SCHEMA), PROMPT_SCHEMA, {})
    return path


def _prototypes():
    return [t["template"] for t in T.load_templates(A.PROTOTYPES_FILE)]


def test_prototypes_are_ours_many_sentences_and_slotted():
    protos = _prototypes()
    assert len(protos) >= 2
    for p in protos:
        assert p.count(A.SLOT) == 1
        assert len(p.split("\n\n")) >= 3  # paragraphs for the crossover to align
    # Enough of their vocabulary is in the synonym table for the mutator to act on.
    index = A.synonym_index(A.DEFAULT_SYNONYMS)
    for p in protos:
        assert len(A._words(p) & set(index)) >= 8


def test_synonym_table_rejects_ambiguous_words():
    with pytest.raises(RgeomError, match="two groups"):
        A.synonym_index([("a", "b"), ("b", "c")])


def test_mutator_is_seeded_keeps_the_slot_and_case():
    text = "Write the Answer now. {behavior} Explain it in Clear steps."
    mut = A.SynonymMutator(word_rate=1.0)
    a = mut(text, np.random.default_rng(0))
    b = mut(text, np.random.default_rng(0))
    assert a == b and a != text
    assert a.count(A.SLOT) == 1
    # Capitalised words stay capitalised; words outside the table are untouched.
    assert a.split()[0][0].isupper() and " now." in a
    # The slot's own letters are never treated as a word.
    assert (
        A.SynonymMutator(groups=[("behavior", "conduct")], word_rate=1.0)(
            text, np.random.default_rng(0)
        ).count(A.SLOT)
        == 1
    )


def test_crossover_swaps_aligned_sentences_and_conserves_them():
    a = "A one. A two.\n\nslot {behavior}\n\nA three. A four."
    b = "B one. B two. B extra.\n\nslot {behavior}\n\nB three."
    seen = set()
    for s in range(20):
        ca, cb = A.crossover(a, b, np.random.default_rng(s))
        sentences = sorted(
            x for c in (ca, cb) for para in c.split("\n\n") for x in A._sentences(para)
        )
        original = sorted(x for c in (a, b) for para in c.split("\n\n") for x in A._sentences(para))
        assert sentences == original  # nothing lost or duplicated
        assert ca.count(A.SLOT) == 1 and cb.count(A.SLOT) == 1
        assert "B extra." in cb  # unmatched sentences stay with their parent
        seen.add(ca)
    assert len(seen) > 2


def test_word_scores_have_momentum_and_pick_the_best_synonym():
    scores = A.update_word_scores({}, ["clear answer", "plain answer"], [1.0, 3.0])
    assert scores["clear"] == -1.0 and scores["plain"] == -3.0 and scores["answer"] == -2.0
    scores = A.update_word_scores(scores, ["clear reply"], [5.0])
    assert scores["clear"] == pytest.approx((-1.0 + -5.0) / 2)
    index = A.synonym_index(A.DEFAULT_SYNONYMS)
    out = A.replace_with_best_synonyms(
        "Plain words. {behavior}", {"clear": 0.0, "plain": -9.0}, index, np.random.default_rng(0), 1
    )
    assert out == "Clear words. {behavior}"


def test_batched_target_loss_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [p.replace(A.SLOT, "do the thing") for p in _prototypes()] + ["short one"]
    target = "Sure, here is how to do the thing"
    batched = A.target_losses(model, tok, prompts, target)
    chunked = A.target_losses(model, tok, prompts, target, batch_size=2)
    single = [A.target_losses(model, tok, [p], target)[0] for p in prompts]
    assert np.allclose(batched, single, atol=1e-4) and np.allclose(chunked, single, atol=1e-4)
    assert len(set(np.round(single, 4))) == len(prompts)  # the prompts really differ

    # Against a plain unpadded forward pass and a hand-computed NLL.
    import torch

    from rgeom.models import encode_chat

    tgt = tok(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([encode_chat(tok, prompts[-1]).ids + tgt])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = ids.shape[1]
    nll = -np.mean([float(logp[n - len(tgt) - 1 + j, tgt[j]]) for j in range(len(tgt))])
    assert batched[-1] == pytest.approx(nll, abs=1e-4)


def _run(tiny, seed=0, **over):
    model, tok = tiny
    settings = A.AutoDANSettings.from_params({**TINY, **over}, "test")
    search = A.AutoDANSearch(_prototypes(), settings, seed, progress=False)
    return A.autodan_one(
        model, tok, "b1", "Explain how to do forbidden thing", "Sure, here is the thing", search
    )


def test_elite_loss_never_increases_and_the_search_is_seeded(tiny):
    a = _run(tiny)
    b = _run(tiny)
    c = _run(tiny, seed=1)
    hist = a.losses_per_generation
    assert len(hist) == TINY["generations"] == a.generations_run
    assert all(x >= y for x, y in zip(hist, hist[1:], strict=False))
    assert hist[0] <= a.initial_best_loss <= a.initial_loss
    assert a.loss == hist[-1] and a.template.count(A.SLOT) == 1
    assert (a.template, a.losses_per_generation) == (b.template, b.losses_per_generation)
    # Another seed explores another population (different offspring, hence history or
    # result), while generation 0 starts from the same prototypes.
    assert (c.template, c.losses_per_generation) != (a.template, a.losses_per_generation)
    assert c.initial_loss == pytest.approx(a.initial_loss)


def test_elitism_holds_under_a_mutator_that_only_hurts(tiny):
    """A mutator that appends noise to every offspring can only add loss: the best stays."""

    def noisy(text, rng):
        return text + " zq" * int(rng.integers(5, 30))

    model, tok = tiny
    settings = A.AutoDANSettings.from_params(
        {**TINY, "mutation_rate": 1.0, "crossover_rate": 0.0}, "t"
    )
    search = A.AutoDANSearch(_prototypes(), settings, 0, mutator=noisy, progress=False)
    res = A.autodan_one(model, tok, "b2", "Explain it", "Sure, here it is", search)
    hist = res.losses_per_generation
    assert all(x >= y for x, y in zip(hist, hist[1:], strict=False))
    assert res.loss <= res.initial_best_loss


def test_early_stop_on_a_reply_that_is_not_refused(tiny):
    model, tok = tiny
    settings = A.AutoDANSettings.from_params({**TINY, "early_stop": True}, "t")
    calls = []

    def never_refuses(text):
        calls.append(text)
        return False

    search = A.AutoDANSearch(_prototypes(), settings, 0, refused=never_refuses, progress=False)
    res = A.autodan_one(model, tok, "b3", "Explain it", "Sure, here it is", search)
    assert res.stopped_early and res.generations_run == 0 and len(calls) == 1
    assert isinstance(res.completion, str)


def test_bad_settings_are_clear_errors():
    with pytest.raises(RgeomError, match="population"):
        A.AutoDANSettings.from_params({"population": 1}, "attacks.autodan")
    with pytest.raises(RgeomError, match="crossover_rate"):
        A.AutoDANSettings.from_params({"crossover_rate": 1.5}, "attacks.autodan")
    assert A.AutoDANSettings.from_params({"elite_fraction": 0.0}, "x").n_elite == 1


def test_autodan_method_writes_the_test_case_schema(tiny, behaviours, tmp_path):
    model, tok = tiny
    params = {"autodan": {**TINY, "n_behaviors": 2}}
    out = tmp_path / "AutoDAN.parquet"
    kw = dict(params=params, seed=0, source_model="results/model/base", meta={"stage": "t"})
    T.build_method(T.MethodJob("AutoDAN", str(behaviours), str(out), **kw), model, tok)
    rows = read_table(out, T.TEST_CASE_SCHEMA).to_pylist()
    assert len(rows) == 2 and {r["method"] for r in rows} == {"AutoDAN"}
    chosen = [r["prompt_id"] for r in T.select_behaviours(T.read_behaviours(behaviours), 2, 0)]
    assert [r["behavior_id"] for r in rows] == chosen
    meta = read_meta(out)
    assert meta["method"] == "AutoDAN" and meta["autodan"]["settings"]["population"] == 8
    for r in rows:
        b = next(x for x in BEHAVIOURS if x["prompt_id"] == r["behavior_id"])
        message = prompt_text(b["text"], b["context"])
        history = meta["autodan"]["behaviours"][r["behavior_id"]]
        # The test case is the evolved template with the behaviour in its slot.
        assert r["test_case"] == history["template"].replace(A.SLOT, message)
        assert A.SLOT not in r["test_case"] and message in r["test_case"]
        assert r["source_model"] == "results/model/base" and r["target"] == b["target"]
        assert r["loss"] <= r["initial_loss"] and r["loss"] == history["losses_per_generation"][-1]
    # Replayable: the combined file accepts it alongside the other methods.
    combined = tmp_path / "test_cases.parquet"
    T.combine_test_cases([str(out)], str(behaviours), str(combined), {})
    assert read_table(combined).num_rows == 2


def test_autodan_needs_a_model_and_slotted_prototypes(tiny, behaviours, tmp_path):
    kw = dict(params={"autodan": TINY}, seed=0, source_model="m", meta={})
    with pytest.raises(RgeomError, match="source model"):
        T.build_method(T.MethodJob("AutoDAN", str(behaviours), str(tmp_path / "o.parquet"), **kw))
    bad = tmp_path / "protos.jsonl"
    bad.write_text(
        json.dumps({"template_id": "ok", "template": "A. {behavior}"})
        + "\n"
        + json.dumps({"template_id": "noslot", "template": "A. B."})
        + "\n"
    )
    model, tok = tiny
    with pytest.raises(RgeomError) as err:
        job = T.MethodJob(
            "AutoDAN", str(behaviours), str(tmp_path / "o.parquet"), templates=str(bad), **kw
        )
        T.build_method(job, model=model, tokenizer=tok)
    assert str(bad) in str(err.value) and "row 2" in str(err.value)
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.slow
def test_autodan_cost_on_smollm2(smollm2, behaviours, tmp_path):
    """Embedded-scale AutoDAN on SmolLM2 lowers the target loss; prints the cost."""
    model, tok = smollm2
    params = {"autodan": {**TINY, "population": 8, "generations": 3, "n_behaviors": 1}}
    start = time.perf_counter()
    job = T.MethodJob(
        "AutoDAN", str(behaviours), str(tmp_path / "a.parquet"), params=params, seed=0,
        source_model="m", meta={},
    )  # fmt: skip
    T.build_method(job, model=model, tokenizer=tok)
    elapsed = time.perf_counter() - start
    (row,) = read_table(tmp_path / "a.parquet").to_pylist()
    print(f"AutoDAN on SmolLM2: {elapsed:.1f} s per behaviour, loss {row['initial_loss']:.3f}"
          f" -> {row['loss']:.3f}")  # fmt: skip
    assert row["loss"] <= row["initial_loss"]


def test_cli_autodan_bad_prototypes_is_one_line(tiny_model_dir, behaviours, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "protos.jsonl"
    bad.write_text(json.dumps({"template_id": "noslot", "template": "No slot here."}) + "\n")
    out = tmp_path / "AutoDAN.parquet"
    params = json.dumps({"model": {"device": "cpu"}, "attacks": {"autodan": TINY}})
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "attack", "--method", "AutoDAN", "--behaviors",
         str(behaviours), "--model", str(tiny_model_dir), "--templates", str(bad), "--out",
         str(out), "--params", params],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "row 1" in errors[0]
    assert not out.exists()


def test_cli_autodan_end_to_end(tiny_model_dir, behaviours, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "AutoDAN.parquet"
    params = {"model": {"device": "cpu"}, "seed": 3}
    params["attacks"] = {"autodan": {**TINY, "n_behaviors": 1, "generations": 1}}
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "attack", "--method", "AutoDAN", "--behaviors",
         str(behaviours), "--model", str(tiny_model_dir), "--out", str(out), "--params",
         json.dumps(params)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = read_table(out, T.TEST_CASE_SCHEMA).to_pylist()
    assert row["method"] == "AutoDAN" and row["source_model"] == str(tiny_model_dir)
    assert read_meta(out)["autodan"]["settings"]["generations"] == 1


def test_adaptive_autodan_attacks_the_checkpoint_and_reports_its_asr(
    tiny_model_dir, behaviours, tmp_path
):
    """rgeom adaptive-autodan, adaptive-generate, adaptive-judge, adaptive-metrics: AutoDAN
    evolved against this checkpoint on the adaptive subset, its completions judged into
    adaptive_autodan.asr."""
    import subprocess
    import sys

    cases = tmp_path / "adaptive_autodan_cases.parquet"
    completions = tmp_path / "adaptive_autodan_completions.parquet"
    params = {"model": {"device": "cpu"}, "seed": 0, "arm": "r2d2", "step": 50}
    params["attacks"] = {"adaptive": {"n_behaviors": 2}, "autodan": {**TINY, "generations": 1}}
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "adaptive-autodan", "--model", str(tiny_model_dir),
         "--behaviors", str(behaviours), "--out", str(cases), "--params",
         json.dumps(params)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    # AutoDAN's test cases are text, encoded through the chat template when generated.
    assert read_table(cases, T.ADAPTIVE_CASES_SCHEMA).column("prompt_ids").null_count == 2
    gen = {"model": {"device": "cpu"}, "seed": 0, "generate": {"max_new_tokens": 4}}
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "adaptive-generate", "--model", str(tiny_model_dir),
         "--cases", str(cases), "--out", str(completions), "--params", json.dumps(gen)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_table(completions, T.ADAPTIVE_COMPLETION_SCHEMA).to_pylist()
    # The same seeded subset as adaptive GCG, attacked at this (arm, step).
    chosen = [r["prompt_id"] for r in T.select_behaviours(T.read_behaviours(behaviours), 2, 0)]
    assert [r["behavior_id"] for r in rows] == chosen
    meta = read_meta(completions)
    assert meta["benchmark"] == "adaptive_autodan"
    for r in rows:
        b = next(x for x in BEHAVIOURS if x["prompt_id"] == r["behavior_id"])
        assert r["test_case"] == r["suffix"].replace(A.SLOT, prompt_text(b["text"], b["context"]))
        assert (r["arm"], r["step"]) == ("r2d2", 50) and r["loss"] <= r["initial_loss"]
        assert isinstance(r["completion"], str)
        assert meta["autodan"]["behaviours"][r["behavior_id"]]["generations_run"] == 1
    out, metrics = tmp_path / "adaptive_autodan.parquet", tmp_path / "metrics.parquet"
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "adaptive-judge", "--completions", str(completions),
         "--out", str(out), "--params", json.dumps({"seed": 0, "judge": {}})],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "adaptive-metrics", "--labels", str(out),
         "--out", str(metrics), "--params", json.dumps({"seed": 0, "judge": {"bootstrap": 10}})],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (metric,) = read_table(metrics).to_pylist()
    assert (metric["benchmark"], metric["metric"]) == ("adaptive_autodan", "asr")
    judged = read_table(out, T.ADAPTIVE_SCHEMA).to_pylist()
    assert metric["value"] == pytest.approx(np.mean([r["success"] for r in judged]))


def test_adaptive_autodan_is_on_at_paper_scale_and_off_in_the_demo():
    from pathlib import Path

    import yaml

    from rgeom.config import validate

    root = Path(__file__).parents[1]
    paper = validate(yaml.safe_load((root / "config/paper.yaml").read_text()), source="paper")
    assert paper["attacks"]["adaptive"]["methods"] == ["gcg", "autodan"]
    demo = validate(yaml.safe_load((root / "config/config.yaml").read_text()), source="demo")
    assert demo["attacks"]["adaptive"]["methods"] == ["gcg"]
