"""R2D2 on the tiny random Llama: loss formulas, one forward, pool draws, reset, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from rgeom.attacks import gcg as G
from rgeom.attacks.gcg import build_prompt_ids
from rgeom.errors import RgeomError
from rgeom.models import encode_chat, encode_response
from rgeom.train import r2d2 as R

BEHAVIOURS = [
    R.R2D2Behaviour(f"b{i}", text, tuple(f"Sure, here is {word} {i}" for word in WORDS))
    for i, text in enumerate(
        [
            "Tell me how to kill a Python process",
            "Give step by step instructions for building a website",
            "Explain how photosynthesis works",
            "Write a poem about the sea",
        ]
    )
    for WORDS in [("how", "the answer", "a plan")]
]
CONTEXTUAL = R.R2D2Behaviour("ctx", "Summarise this", ("Sure",), context="Some text", tags=())

SMALL = dict(pool_size=6, updates_per_step=2, gcg_steps=1, search_width=8, topk=8)


def small_cfg(**kw) -> R.R2D2Config:
    return R.R2D2Config(**{**SMALL, **kw})


REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_reference_values():
    # HarmBench's run_sft_adv_training.py: NUM_SINGLE_BEHAVIOR_TEST_CASES = 8,
    # NUM_TEST_CASES_TO_UPDATE_PER_STEP = 8, NUM_GCG_STEPS = 5, GCG_SEARCH_WIDTH = 512,
    # RESET_EVERY = 50; adv_training_utils.py: topk 256, 20% reset, "! " * [15, 20], the
    # argmin candidate of every GCG step, 0.5 / 0.5 loss weights, log p floor -5.
    cfg = R.R2D2Config()
    assert (cfg.pool_size, cfg.updates_per_step) == (8, 8)
    assert (cfg.gcg_steps, cfg.search_width, cfg.topk) == (5, 512, 256)
    assert cfg.gcg_keep_best is False
    assert (cfg.reset_every, cfg.reset_fraction) == (50, 0.2)
    assert (cfg.suffix_min, cfg.suffix_max, cfg.suffix_unit) == (15, 20, "! ")
    assert (cfg.away_coef, cfg.toward_coef, cfg.away_logp_floor) == (0.5, 0.5, -5.0)
    assert cfg.refusal == "Sorry, I can't do that."


def test_schema_defaults_are_the_dataclass_defaults():
    # The schema is where the paper default lives; the dataclass must not drift from it.
    schema = yaml.safe_load((REPO / "src/rgeom/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["r2d2"]["properties"]
    cfg = R.R2D2Config()
    for key in R.R2D2Config.__dataclass_fields__:
        if key == "seed":
            continue  # the run's seed
        want = getattr(cfg, key)
        assert props[key]["default"] == (list(want) if isinstance(want, tuple) else want), key


def test_validation_errors(tiny):
    _, tok = tiny
    with pytest.raises(RgeomError, match="pool_size"):
        R.R2D2Pool(BEHAVIOURS, tok, small_cfg(pool_size=1, updates_per_step=2))
    bad = R.R2D2Behaviour("no_targets_here", "Do a thing", (" ",))
    with pytest.raises(RgeomError, match="no_targets_here"):
        R.R2D2Pool([*BEHAVIOURS, bad], tok, small_cfg())
    with pytest.raises(RgeomError, match="non-contextual"):
        R.R2D2Pool([CONTEXTUAL], tok, small_cfg())
    with pytest.raises(RgeomError, match="r2d2.gcg_screen_dtype"):
        R.R2D2Pool(BEHAVIOURS, tok, small_cfg(gcg_screen_dtype="fp8"))
    with pytest.raises(RgeomError, match="r2d2.gcg_rescore_top"):
        R.R2D2Pool(BEHAVIOURS, tok, small_cfg(gcg_rescore_top=0))


def test_load_harmbench_behaviours(shared_data, tiny, tmp_path):
    hb = shared_data / "harmbench"
    rows = R.load_harmbench_behaviours(
        hb / "adv_training_behaviors.csv", hb / "adv_training_targets.json"
    )
    assert len(rows) == 100 and all(len(r.targets) == 12 for r in rows)
    # Upstream has empty strings among the targets; the pool never draws them.
    assert any(not t.strip() for r in rows for t in r.targets)
    adv = R.R2D2Pool(rows, tiny[1], small_cfg(pool_size=200))
    assert all(e.target.strip() for e in adv.entries)
    val = R.load_harmbench_behaviours(
        hb / "harmbench_behaviors_text_val.csv", hb / "harmbench_targets_text.json"
    )
    assert any(r.contextual for r in val) and all(len(r.targets) == 1 for r in val)
    _, tok = tiny
    pool = R.R2D2Pool(val, tok, small_cfg(pool_size=40))
    contextual = {r.behaviour_id for r in val if r.contextual}
    assert not contextual & {e.behaviour_id for e in pool.entries}
    pool.cfg.reset_fraction = 1.0
    pool.reset()
    assert not contextual & {e.behaviour_id for e in pool.entries}

    targets = tmp_path / "t.json"
    targets.write_text(json.dumps({"adv_training_1": ["Sure"]}))
    with pytest.raises(RgeomError, match="adv_training_2"):
        R.load_harmbench_behaviours(hb / "adv_training_behaviors.csv", targets)


def test_reference_pool_source_is_two_files_deduped_and_filtered(shared_data, tiny, tmp_path):
    # The reference pool: adv_training_behaviors.csv (100) + HarmBench val (80), targets from
    # both adv_training targets files; contextual rows never enter, at init or reset.
    _, tok = tiny
    hb = shared_data / "harmbench"
    csvs = [hb / "adv_training_behaviors.csv", hb / "harmbench_behaviors_text_val.csv"]
    jsons = [hb / "adv_training_targets.json", hb / "adv_training_val_targets.json"]
    extra = {
        "r2d2_behaviours": ",".join(map(str, csvs)),
        "r2d2_targets": ",".join(map(str, jsons)),
    }
    cfg = R.R2D2Config()
    rows = R.load_behaviours(extra, cfg.exclude)
    ids = [r.behaviour_id for r in rows]
    assert len(ids) == len(set(ids)) == 100 + 80 - len(cfg.exclude)
    val_ids = {r.behaviour_id for r in R.load_harmbench_behaviours(csvs[1], jsons[1], cfg.exclude)}
    assert len(val_ids & set(ids)) == 80 - len(cfg.exclude)
    contextual = {r.behaviour_id for r in rows if r.contextual}
    assert contextual and contextual <= val_ids
    pool = R.R2D2Pool(rows, tok, small_cfg(pool_size=300, reset_fraction=1.0))
    assert len(pool.behaviours) == len(rows) - len(contextual)
    assert not contextual & {e.behaviour_id for e in pool.entries}
    pool.reset()
    assert not contextual & {e.behaviour_id for e in pool.entries}
    # Both files contribute entries.
    assert {e.behaviour_id for e in pool.entries} & val_ids
    assert {e.behaviour_id for e in pool.entries} - val_ids

    # Without the exclusion, the val behaviour that has no targets is a clear error.
    with pytest.raises(RgeomError, match="dimethylmercury_instructions_home.*r2d2.exclude"):
        R.load_behaviours(extra, ())
    # The same file twice is deduped; one id naming two behaviours is an error.
    twice = {**extra, "r2d2_behaviours": f"{csvs[0]},{csvs[0]}"}
    assert len(R.load_behaviours(twice)) == 100
    clash = tmp_path / "clash.csv"
    text = csvs[0].read_text()
    first = text.splitlines()[1]
    clash.write_text(text.splitlines()[0] + "\n" + first.replace(",", " changed,", 1) + "\n")
    with pytest.raises(RgeomError, match="different behaviours"):
        R.load_behaviours({**extra, "r2d2_behaviours": f"{csvs[0]},{clash}"})


def test_pool_init_draws_differ_across_entries(tiny):
    _, tok = tiny
    pool = R.R2D2Pool([*BEHAVIOURS, CONTEXTUAL], tok, small_cfg(pool_size=30))
    counts = set()
    for e in pool.entries:
        # The suffix ids carry the separator space: they are "! ! !" as encoded after the
        # behaviour, which is what GCG's in-context round-trip filter needs.
        text = tok.decode(e.suffix_ids)
        n = text.count("!")
        assert text == " " + ("! " * n).rstrip()
        counts.add(n)
    assert len(counts) > 1 and counts <= set(range(15, 21))
    assert len({e.target for e in pool.entries}) > 3
    assert len({e.target.split()[3] for e in pool.entries}) > 1  # not all the same index
    assert "ctx" not in {e.behaviour_id for e in pool.entries}
    again = R.R2D2Pool(BEHAVIOURS + [CONTEXTUAL], tok, small_cfg(pool_size=30))
    assert [e.target for e in again.entries] == [e.target for e in pool.entries]


def test_reset_replaces_the_configured_fraction(tiny):
    _, tok = tiny
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(pool_size=20, reset_fraction=0.2))
    marker = 999
    for e in pool.entries:
        e.suffix_ids = [marker]
    chosen = pool.reset()
    assert len(chosen) == 4 == len(set(chosen))
    replaced = [i for i, e in enumerate(pool.entries) if e.suffix_ids != [marker]]
    assert replaced == sorted(chosen)
    # The reference resets int(0.2 * 8) = 1 entry of its pool of 8 (rounding would give 2).
    ref = R.R2D2Pool(BEHAVIOURS * 2, tok, small_cfg(pool_size=8, reset_fraction=0.2))
    assert len(ref.reset()) == 1


def test_initial_pool_draws_distinct_behaviours(tiny):
    _, tok = tiny
    many = [R.R2D2Behaviour(f"m{i}", f"Do thing number {i}", ("Sure",)) for i in range(12)]
    for seed in range(5):
        pool = R.R2D2Pool(many, tok, small_cfg(pool_size=8, updates_per_step=8, seed=seed))
        assert len({e.behaviour_id for e in pool.entries}) == 8
    # A pool larger than the behaviour list covers every behaviour before repeating one.
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(pool_size=6))
    assert len({e.behaviour_id for e in pool.entries[:4]}) == 4


def test_state_dict_roundtrip_through_json(tiny):
    _, tok = tiny
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg())
    pool.entries[0].loss = 1.5
    pool.step = 7
    state = json.loads(json.dumps(pool.state_dict()))
    other = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(seed=123))
    other.load_state_dict(state)
    # The saved config is provenance; the running config stays the caller's.
    mine, theirs = other.state_dict(), pool.state_dict()
    assert mine.pop("config")["seed"] == 123
    theirs.pop("config")
    assert mine == theirs
    # The RNG continues identically after resume.
    assert other.choose_updates() == pool.choose_updates()
    assert other.reset() == pool.reset()
    with pytest.raises(RgeomError, match="pool_size"):
        R.R2D2Pool(BEHAVIOURS, tok, small_cfg(pool_size=7)).load_state_dict(state)


def test_away_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0]])
    target = torch.tensor([0, 2, 0])
    logp = F.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    per_tok, keep = R.away_loss_terms(logp, -5.0)
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    assert float(per_tok[0]) == pytest.approx(-math.log(1 - p0), rel=1e-5)
    assert float(per_tok[1]) == pytest.approx(-math.log(1 - 1 / 3), rel=1e-5)
    # Token 2 has p = e^-3 / (e^-3 + e^5 + 1), log p ~ -8: below the floor, ignored.
    assert keep.tolist() == [True, True, False]
    # HarmBench's log_1_minus_p_loss: the kept terms summed, divided by ALL three tokens
    # (the mean over the two kept ones would be 1.5 times larger).
    want = (-math.log(1 - p0) - math.log(1 - 1 / 3)) / 3
    assert float(R.away_loss(logp, -5.0)) == pytest.approx(want, rel=1e-5)
    assert float(R.away_loss(logp, 0.0)) == 0.0


def _utility_batch(tok, n=2):
    examples = [
        ("What is two plus two?", "The answer is four."),
        ("Write a poem about the sea", "Here is a short answer: the sea."),
        ("How do I bake bread at home?", "Here is how to do it."),
    ][:n]
    rows, labels = [], []
    for q, a in examples:
        prompt = encode_chat(tok, q).ids
        reply = encode_response(tok, a)
        rows.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    return rows, labels


def _collate_left(rows, labels, pad_id):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, width - len(r) :] = torch.tensor(r)
        lab[i, width - len(r) :] = torch.tensor(lb)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _manual_nll(model, ids, labels):
    """Summed NLL and token count of one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    lab = torch.tensor(labels[1:])
    sel = lab != -100
    logp = F.log_softmax(logits[sel], -1).gather(1, lab[sel][:, None]).squeeze(1)
    return logp


def test_losses_match_manual_and_use_one_forward(tiny):
    model, tok = tiny
    model.eval()
    cfg = small_cfg(away_logp_floor=-1e9)
    pool = R.R2D2Pool(BEHAVIOURS, tok, cfg)
    entries = pool.entries[:3]
    rows, labels = _utility_batch(tok)
    batch = _collate_left(rows, labels, tok.pad_token_id)

    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = R.compute_r2d2_losses(model, tok, batch, entries, cfg)
    finally:
        handle.remove()
    assert len(calls) == 1

    util = torch.cat([_manual_nll(model, r, lb) for r, lb in zip(rows, labels, strict=True)])
    assert float(out["utility"]) == pytest.approx(float(-util.mean()), abs=1e-4)

    refusal = encode_response(tok, cfg.refusal)
    toward, away = [], []
    for e in entries:
        prompt = build_prompt_ids(tok, e.behaviour, e.suffix_ids)
        toward.append(_manual_nll(model, prompt + refusal, [-100] * len(prompt) + refusal))
        tgt = tok(e.target, add_special_tokens=False)["input_ids"]
        away.append(_manual_nll(model, prompt + tgt, [-100] * len(prompt) + tgt))
    toward_ref = float(-torch.cat(toward).mean())
    assert float(out["toward"]) == pytest.approx(toward_ref, abs=1e-4)
    away_ref = float((-torch.log1p(-torch.cat(away).exp())).mean())
    assert float(out["away"]) == pytest.approx(away_ref, abs=1e-4)
    total = float(out["utility"]) + 0.5 * float(out["away"]) + 0.5 * float(out["toward"])
    assert float(out["total"]) == pytest.approx(total, abs=1e-5)


def test_away_floor_drops_unlikely_tokens(tiny):
    model, tok = tiny
    model.eval()
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg())
    e = pool.entries[0]
    prompt = build_prompt_ids(tok, e.behaviour, e.suffix_ids)
    tgt = tok(e.target, add_special_tokens=False)["input_ids"]
    logp = _manual_nll(model, prompt + tgt, [-100] * len(prompt) + tgt)
    floor = float(logp.median())
    kept = logp[logp >= floor]
    assert 0 < kept.numel() < logp.numel()
    with torch.no_grad():
        out = R.compute_r2d2_losses(model, tok, None, [e], small_cfg(away_logp_floor=floor))
    # Dropped tokens count zero but stay in the denominator (the reference's normalisation).
    want = float((-torch.log1p(-kept.exp())).sum()) / logp.numel()
    assert float(out["away"]) == pytest.approx(want, 1e-4)
    assert float(out["utility"]) == 0.0
    with torch.no_grad():
        none = R.compute_r2d2_losses(model, tok, None, [e], small_cfg(away_logp_floor=0.0))
    assert float(none["away"]) == 0.0


def test_losses_backpropagate_to_weights(tiny):
    model, tok = tiny
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(away_logp_floor=-1e9))
    rows, labels = _utility_batch(tok)
    out = R.compute_r2d2_losses(
        model, tok, _collate_left(rows, labels, tok.pad_token_id), pool.entries[:2], pool.cfg
    )
    grads = torch.autograd.grad(out["total"], [model.lm_head.weight])
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


def test_allowed_tokens_are_decoded_once_per_pool(tiny, monkeypatch):
    # The whole-vocabulary decode behind GCG's ASCII filter is as slow as a small GCG step;
    # the pool keeps it across refreshes, and the refreshes still pass it to GCG.
    model, tok = tiny
    calls, passed = [], []
    real_ascii, real_gcg = R.ascii_token_ids, R.gcg
    monkeypatch.setattr(R, "ascii_token_ids", lambda *a: calls.append(a) or real_ascii(*a))
    monkeypatch.setattr(
        R, "gcg", lambda *a, **kw: passed.append(kw["allowed_tokens"]) or real_gcg(*a, **kw)
    )
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg())
    for _ in range(3):
        pool.advance(model)
    # One GCG call per refreshed entry (each with its own seed): 3 micro-steps x 2 entries.
    assert len(calls) == 1 and len(passed) == 6
    assert all(torch.equal(p, passed[0]) for p in passed)


def test_advance_refreshes_and_resets_on_schedule(tiny):
    model, tok = tiny
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(reset_every=2, reset_fraction=0.5))
    model.train()
    entries, losses, reset = pool.advance(model)
    assert model.training
    assert len(entries) == 2 and len(losses) == 2 and reset == []
    assert all(e.refreshes == 1 and e.loss == lo for e, lo in zip(entries, losses, strict=True))
    # The reference resets when the micro-step index is 1 mod reset_every * grad_accum.
    _, _, reset = pool.advance(model)
    assert len(reset) == 3 and pool.step == 2
    _, _, reset = pool.advance(model)
    assert reset == []


def test_resets_are_counted_in_optimizer_steps():
    # reset_every = 2 optimizer steps of grad_accum = 3 micro-steps: micro-steps 5, 11, 17.
    pool = R.R2D2Pool.__new__(R.R2D2Pool)
    pool.cfg = small_cfg(reset_every=2)
    due = []
    for step in range(18):
        pool.step = step
        due.append(pool.reset_due(grad_accum=3))
    assert [i for i, d in enumerate(due) if d] == [5, 11, 17]


def test_refresh_takes_the_argmin_candidate_unless_keep_best(tiny, monkeypatch):
    # The reference moves to each step's argmin candidate even when it is worse than the
    # current suffix; gcg_keep_best (rgeom's option) keeps the best suffix found so far.
    model, tok = tiny
    worse = 1e6

    def worst_first(model, kv, cands, current, post, target, search):
        return 0, worse

    monkeypatch.setattr(G, "_best_candidate", worst_first)
    for keep_best in (False, True):
        pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(gcg_steps=1, gcg_keep_best=keep_best))
        before = {i: list(e.suffix_ids) for i, e in enumerate(pool.entries)}
        pool.advance(model)
        for i in pool.last_refreshed:
            e = pool.entries[i]
            moved = e.suffix_ids != before[i]
            assert moved is (not keep_best)
            assert (e.loss == worse) is (not keep_best)


def _trainer(tok, model, pool, out, max_steps, save_steps=None, grad_accum=1):
    from datasets import Dataset
    from transformers import TrainingArguments

    rows, labels = _utility_batch(tok, n=3)
    data = Dataset.from_list(
        [
            {"input_ids": r, "attention_mask": [1] * len(r), "labels": lb}
            for r, lb in zip(rows, labels, strict=True)
        ]
    )

    def collate(features):
        return _collate_left(
            [f["input_ids"] for f in features], [f["labels"] for f in features], tok.pad_token_id
        )

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum,
        use_cpu=True,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        seed=0,
        remove_unused_columns=False,
    )
    return R.R2D2Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        processing_class=tok,
        pool=pool,
    )


def test_trainer_runs_a_few_steps(tiny, tmp_path):
    from rgeom.models import build_tiny_model

    _, tok = tiny
    model = build_tiny_model(tok, seed=1)
    cfg = small_cfg(reset_every=2)
    pool = R.R2D2Pool(BEHAVIOURS, tok, cfg)
    trainer = _trainer(tok, model, pool, tmp_path / "out", max_steps=3)
    before = model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert len(trainer.r2d2_history) == 3 and pool.step == 3
    for rec in trainer.r2d2_history:
        assert all(math.isfinite(rec[k]) for k in ("r2d2_total", "r2d2_away", "r2d2_toward"))
        assert len(rec["gcg_losses"]) == cfg.updates_per_step
    assert len(trainer.r2d2_history[1]["reset"]) == int(cfg.reset_fraction * cfg.pool_size)
    logged = [h for h in trainer.state.log_history if "r2d2_away" in h]
    assert len(logged) == 3 and all("r2d2_gcg_loss" in h for h in logged)
    assert not torch.equal(before, model.lm_head.weight.detach())


def test_trainer_resets_per_optimizer_step_under_grad_accum(tiny, tmp_path):
    from rgeom.models import build_tiny_model

    _, tok = tiny
    cfg = small_cfg(reset_every=2, reset_fraction=0.5)
    pool = R.R2D2Pool(BEHAVIOURS, tok, cfg)
    trainer = _trainer(
        tok, build_tiny_model(tok, seed=1), pool, tmp_path / "out", max_steps=2, grad_accum=2
    )
    trainer.train()
    # 2 optimizer steps x 2 micro-steps, every micro-step refreshes; the one reset falls
    # before the last micro-step of optimizer step 2 (micro-step index 3), not at index 1.
    assert pool.step == 4 and trainer.state.global_step == 2
    assert [len(h["reset"]) for h in trainer.r2d2_history] == [0, 0, 0, 3]


def test_trainer_saves_and_restores_the_pool(tiny, tmp_path):
    from rgeom.models import build_tiny_model

    _, tok = tiny
    cfg = small_cfg()
    out = tmp_path / "out"
    pool = R.R2D2Pool(BEHAVIOURS, tok, cfg)
    _trainer(tok, build_tiny_model(tok, seed=1), pool, out, max_steps=2, save_steps=2).train()
    saved = out / "checkpoint-2" / R.pool_file()
    assert saved.exists() and (out / "checkpoint-2" / "trainer_state.json").exists()
    expected = json.loads(saved.read_text())
    assert expected["step"] == 2

    fresh = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(seed=5))
    trainer = _trainer(tok, build_tiny_model(tok, seed=1), fresh, out, max_steps=3)
    seen = {}
    original = fresh.advance

    def spy(model, **kw):
        seen.setdefault("step", fresh.step)
        seen.setdefault("entries", fresh.state_dict()["entries"])
        return original(model, **kw)

    fresh.advance = spy
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert seen["step"] == 2 and seen["entries"] == expected["entries"]
    assert fresh.step == 3


def test_make_r2d2_trainer_from_params(tiny, shared_data, tmp_path, monkeypatch):
    _, tok = tiny
    hb = shared_data / "harmbench"
    extra = {
        "r2d2_behaviours": str(hb / "adv_training_behaviors.csv"),
        "r2d2_targets": str(hb / "adv_training_targets.json"),
    }
    params = {"seed": 4, "r2d2": {"pool_size": 10, "updates_per_step": 3}}
    cls, kwargs = R.make_r2d2_trainer(params, extra, tok)
    assert cls is R.R2D2Trainer
    assert kwargs["pool"].cfg.seed == 4 and kwargs["pool"].cfg.pool_size == 10
    assert len(kwargs["pool"].entries) == 10
    with pytest.raises(RgeomError, match="r2d2.bogus"):
        R.make_r2d2_trainer({"r2d2": {"bogus": 1}}, extra, tok)
    # Every process gets an equal share of the refresh, as the reference requires.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RgeomError, match=r"updates_per_step \(3\) must be a multiple"):
        R.make_r2d2_trainer(params, extra, tok)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RgeomError, match="r2d2_targets"):
        R.make_r2d2_trainer(params, {"r2d2_behaviours": extra["r2d2_behaviours"]}, tok)
    with pytest.raises(RgeomError, match="r2d2_behaviours"):
        R.make_r2d2_trainer(params, {}, tok)


# Run by torch.distributed.run with 1 or 2 gloo processes: builds the pool, advances it three
# micro-steps (grad_accum 2, reset every optimizer step) on the same untrained model and
# writes, per rank, the pool states, the entries it trained on and its forward-pass counts.
_DIST_WORKER = """
import json, sys
import torch, torch.distributed as dist
from rgeom.attacks import gcg as G
from rgeom.models import load_model, load_tokenizer
from rgeom.train import r2d2 as R

model_dir, spec, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
model, tok = load_model(model_dir), load_tokenizer(model_dir)
spec = json.load(open(spec))
behaviours = [R.R2D2Behaviour(b, t, tuple(ts)) for b, t, ts in spec["behaviours"]]
pool = R.R2D2Pool(behaviours, tok, R.R2D2Config(**spec["cfg"]))
forwards, padded = [0], [0]
model.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
real_pad = G._pad_passes

def counting_pad(model, planned, tail):
    before = forwards[0]
    real_pad(model, planned, tail)
    padded[0] += forwards[0] - before

G._pad_passes = counting_pad
states, trained = [pool.state_dict()], []
for _ in range(3):
    entries, losses, reset = pool.advance(model, grad_accum=2)
    trained.append([[e.behaviour_id, e.suffix_ids] for e in entries])
    states.append(pool.state_dict())
json.dump(
    {"states": states, "trained": trained, "forwards": forwards[0], "padded": padded[0]},
    open(f"{out}/rank{rank}.json", "w"),
)
dist.destroy_process_group()
"""


def _run_pool_processes(tmp_path: Path, model_dir: Path, nproc: int, cfg: dict) -> list[dict]:
    out = tmp_path / f"n{nproc}"
    out.mkdir()
    worker, spec = tmp_path / "worker.py", tmp_path / "spec.json"
    worker.write_text(_DIST_WORKER)
    spec.write_text(
        json.dumps(
            {
                "cfg": cfg,
                "behaviours": [[b.behaviour_id, b.behaviour, b.targets] for b in BEHAVIOURS],
            }
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), str(worker), str(model_dir), str(spec), str(out)]
    src = str(REPO / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow  # three torchrun launches of one or two processes: about a minute
def test_pool_is_the_same_for_one_and_two_processes(tiny_model_dir, tmp_path):
    """One global pool: 1 and 2 processes build it and refresh it identically.

    Shapes big enough that the two ranks' GCG candidate batches need different numbers of
    forward passes (the ZeRO-3 collective mismatch of issue 16): the padding evens them out.
    """
    cfg = dict(
        pool_size=4,
        updates_per_step=4,
        gcg_steps=2,
        search_width=48,
        topk=16,
        suffix_min=10,
        suffix_max=12,
        reset_every=1,
        reset_fraction=0.5,
        seed=3,
    )
    (one,) = _run_pool_processes(tmp_path, tiny_model_dir, 1, cfg)
    two = _run_pool_processes(tmp_path, tiny_model_dir, 2, cfg)
    assert one["states"] == two[0]["states"] == two[1]["states"]
    # Resets at micro-steps 1 (index 1 of every 2): entries were restarted, and refreshed.
    assert one["states"][2]["entries"]["refreshes"] != one["states"][1]["entries"]["refreshes"]
    # Rank r trains on the r-th half of the refresh order; one process trains on all of it.
    for step, entries in enumerate(one["trained"]):
        assert two[0]["trained"][step] + two[1]["trained"][step] == entries
        assert len(two[0]["trained"][step]) == 2
    # The same number of forward passes on both ranks, though their own plans differed.
    assert two[0]["forwards"] == two[1]["forwards"]
    unpadded = [r["forwards"] - r["padded"] for r in two]
    assert unpadded[0] != unpadded[1] and max(r["padded"] for r in two) > 0
    assert one["padded"] == 0


def test_config_refuses_a_refresh_that_does_not_split_over_the_gpus(tmp_path):
    from rgeom.config import load

    path = tmp_path / "c.yaml"
    path.write_text("arms: [sft, r2d2]\ntrain:\n  num_gpus: 2\nr2d2:\n  updates_per_step: 3\n")
    with pytest.raises(RgeomError, match=r"r2d2.updates_per_step: 3 .* train.num_gpus=2"):
        load(path)
    path.write_text("arms: [sft, r2d2]\ntrain:\n  num_gpus: 4\n")
    assert load(path)["r2d2"]["updates_per_step"] == 8
