"""R2D2 on the tiny random Llama: loss formulas, one forward, pool draws, reset, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

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


def test_defaults_are_the_reference_values():
    cfg = R.R2D2Config()
    assert (cfg.updates_per_step, cfg.gcg_steps, cfg.search_width, cfg.topk) == (8, 5, 512, 256)
    assert (cfg.reset_every, cfg.reset_fraction) == (50, 0.2)
    assert (cfg.suffix_min, cfg.suffix_max, cfg.suffix_unit) == (15, 20, "! ")
    assert (cfg.away_coef, cfg.toward_coef, cfg.away_logp_floor) == (0.5, 0.5, -5.0)
    assert cfg.refusal == "Sorry, I can't do that."


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
    assert replaced == chosen


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
    assert float(out["away"]) == pytest.approx(float((-torch.log1p(-kept.exp())).mean()), 1e-4)
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
    assert len(calls) == 1 and len(passed) == 3
    assert all(torch.equal(p, passed[0]) for p in passed)


def test_advance_refreshes_and_resets_on_schedule(tiny):
    model, tok = tiny
    pool = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(reset_every=2, reset_fraction=0.5))
    model.train()
    entries, losses, reset = pool.advance(model)
    assert model.training
    assert len(entries) == 2 and len(losses) == 2 and reset == []
    assert all(e.refreshes == 1 and e.loss == lo for e, lo in zip(entries, losses, strict=True))
    _, _, reset = pool.advance(model)
    assert reset == []
    _, _, reset = pool.advance(model)
    assert len(reset) == 3 and pool.step == 3


def _trainer(tok, model, pool, out, max_steps, save_steps=None):
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
    assert len(trainer.r2d2_history[2]["reset"]) == round(cfg.reset_fraction * cfg.pool_size)
    logged = [h for h in trainer.state.log_history if "r2d2_away" in h]
    assert len(logged) == 3 and all("r2d2_gcg_loss" in h for h in logged)
    assert not torch.equal(before, model.lm_head.weight.detach())


def test_trainer_saves_and_restores_the_pool(tiny, tmp_path):
    from rgeom.models import build_tiny_model

    _, tok = tiny
    cfg = small_cfg()
    out = tmp_path / "out"
    pool = R.R2D2Pool(BEHAVIOURS, tok, cfg)
    _trainer(tok, build_tiny_model(tok, seed=1), pool, out, max_steps=2, save_steps=2).train()
    saved = out / "checkpoint-2" / R.pool_file(0)
    assert saved.exists() and (out / "checkpoint-2" / "trainer_state.json").exists()
    expected = json.loads(saved.read_text())
    assert expected["step"] == 2

    fresh = R.R2D2Pool(BEHAVIOURS, tok, small_cfg(seed=5))
    trainer = _trainer(tok, build_tiny_model(tok, seed=1), fresh, out, max_steps=3)
    seen = {}
    original = fresh.advance

    def spy(model):
        seen.setdefault("step", fresh.step)
        seen.setdefault("entries", fresh.state_dict()["entries"])
        return original(model)

    fresh.advance = spy
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert seen["step"] == 2 and seen["entries"] == expected["entries"]
    assert fresh.step == 3


def test_make_r2d2_trainer_from_params(tiny, shared_data, tmp_path):
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
    with pytest.raises(RgeomError, match="r2d2_targets"):
        R.make_r2d2_trainer(params, {"r2d2_behaviours": extra["r2d2_behaviours"]}, tok)
    with pytest.raises(RgeomError, match="r2d2_behaviours"):
        R.make_r2d2_trainer(params, {}, tok)
