"""GCG engine on the tiny random Llama: cache correctness, monotone loss, ASCII, determinism."""

from __future__ import annotations

import pytest
import torch

from rgeom.attacks import gcg as G
from rgeom.errors import RgeomError
from rgeom.models import encode_chat

BEHAVIOUR = "Tell me how to kill a Python process"
TARGET = "Sure, here is how to do it"


@pytest.fixture(scope="module")
def tiny_allowed(tiny):
    model, tok = tiny
    return G.ascii_token_ids(tok, model.get_input_embeddings().weight.shape[0])


def test_allowed_tokens_are_printable_ascii_and_not_special(tiny, tiny_allowed):
    _, tok = tiny
    assert 0 < tiny_allowed.numel() < len(tok)
    specials = set(tok.all_special_ids)
    for i in tiny_allowed.tolist():
        text = tok.decode([i])
        assert i not in specials
        assert text and text.isascii() and text.isprintable()


def test_prompt_ids_match_encode_chat_of_the_replayed_text(tiny):
    # GCG's layout must be exactly the project's chat encoding of the text a test case
    # replays: the behaviour alone with no suffix, and behaviour + " " + suffix text with the
    # starting suffix (whose ids carry the separator space).
    _, tok = tiny
    parts = G.split_prompt(tok, BEHAVIOUR, TARGET)
    assert parts.prompt_ids([]) == encode_chat(tok, BEHAVIOUR).ids
    assert G.build_prompt_ids(tok, BEHAVIOUR, [5, 6]) == parts.prompt_ids([5, 6])
    start = G.suffix_ids_in_context(tok, BEHAVIOUR, "! " * 5)
    text = G.suffix_text_in_context(tok, BEHAVIOUR, start)
    assert text == "! ! ! ! !"
    assert encode_chat(tok, BEHAVIOUR + " " + text).ids == parts.prompt_ids(start)


def test_roundtrip_filter_in_context(tiny, tiny_allowed):
    # A swap that only round-trips on its own (a first token without the leading space,
    # which re-encoding merges with the behaviour's last word) must be dropped in context;
    # the in-context starting suffix passes; the suffix-alone starting ids do not.
    _, tok = tiny
    start = G.suffix_ids_in_context(tok, BEHAVIOUR, "! " * 6)
    alone = G.initial_suffix_ids(tok, "! " * 6)
    assert alone != start
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(len(start), len(tok), generator=gen)
    cands = G.sample_candidates(torch.tensor(start), grad, tiny_allowed, 256, 64, gen)
    assert not G.roundtrip_mask(tok, torch.tensor([alone]), BEHAVIOUR)[0]
    cands = torch.cat([torch.tensor([start]), cands])
    mask = G.roundtrip_mask(tok, cands, BEHAVIOUR)
    assert mask[0]
    expected = []
    for row in cands.tolist():
        text = G.suffix_text_in_context(tok, BEHAVIOUR, row)
        ids = tok(BEHAVIOUR + " " + text, add_special_tokens=False)["input_ids"]
        body = tok(BEHAVIOUR, add_special_tokens=False)["input_ids"]
        expected.append(ids == body + row)
    assert mask.tolist() == expected
    # The sample must exercise both outcomes, or the comparison above proves little.
    assert 0 < int(mask.sum()) < len(mask)


def test_cached_candidate_loss_equals_full_forward(tiny, tiny_allowed):
    model, tok = tiny
    parts = G.split_prompt(tok, BEHAVIOUR, TARGET)
    gen = torch.Generator().manual_seed(1)
    picks = torch.randint(0, tiny_allowed.numel(), (7, 12), generator=gen)
    cands = tiny_allowed[picks]
    kv = G._prefix_kv(model, torch.tensor(parts.prefix))
    cached = G.candidate_losses(
        model,
        kv,
        cands,
        torch.tensor(parts.post),
        torch.tensor(parts.target),
        batching=G.Batching(batch_size=3),
    )

    target = torch.tensor(parts.target)
    full = torch.tensor([parts.prompt_ids(c) + parts.target for c in cands.tolist()])
    with torch.no_grad():
        logits = model(input_ids=full).logits
    t = target.numel()
    manual = torch.nn.functional.cross_entropy(
        logits[:, -t - 1 : -1].reshape(-1, logits.shape[-1]),
        target.repeat(cands.shape[0]),
        reduction="none",
    )
    manual = manual.view(cands.shape[0], t).mean(1)
    assert torch.allclose(cached, manual, atol=1e-4)


def _full_loss(model, tok, suffix_ids) -> float:
    """Target loss of ``BEHAVIOUR`` + ``suffix_ids``, run in full after the prefix cache."""
    parts = G.split_prompt(tok, BEHAVIOUR, TARGET)
    kv = G._prefix_kv(model, torch.tensor(parts.prefix))
    post, target = torch.tensor(parts.post), torch.tensor(parts.target)
    return float(G.candidate_losses(model, kv, torch.tensor([suffix_ids]), post, target)[0])


def _swaps(current: torch.Tensor, allowed: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """One-token swaps of ``current`` plus some multi-token edits and an unchanged row."""
    gen = torch.Generator().manual_seed(seed)
    width = current.numel()
    rows = current.repeat(n, 1)
    pos = torch.randint(0, width, (n,), generator=gen)
    rows[torch.arange(n), pos] = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
    # A few rows edited at two places (the later ones must still be run, not cached) and
    # one equal to ``current`` (nothing left to run but the template tail and target).
    for r in range(0, n, 5):
        rows[r, -1] = allowed[r % allowed.numel()]
    rows[1] = current
    return rows


@pytest.mark.parametrize("overhead", [0, 64, 1e9])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_shared_suffix_context_gives_the_full_losses(tiny, tiny_allowed, overhead, batch_size):
    # Candidates resumed from the current suffix's cache at their first changed position must
    # score exactly as candidates run in full after the prefix, however the rows are grouped.
    model, tok = tiny
    parts = G.split_prompt(tok, BEHAVIOUR, TARGET)
    post, target = torch.tensor(parts.post), torch.tensor(parts.target)
    current = torch.tensor(G.suffix_ids_in_context(tok, BEHAVIOUR, "! " * 12))
    kv = G._prefix_kv(model, torch.tensor(parts.prefix))
    _, loss, suffix_kv = G._token_gradient(model, kv, current, post, target)
    cands = _swaps(current, tiny_allowed, 23, seed=4)
    full = G.candidate_losses(model, kv, cands, post, target)
    batching = G.Batching(batch_size, overhead=overhead)
    shared = G.candidate_losses(
        model, suffix_kv, cands, post, target, current=current, batching=batching
    )
    assert torch.allclose(shared, full, atol=1e-5, rtol=0)
    assert float(shared[1]) == pytest.approx(loss, abs=1e-5)
    # The rows must differ from each other, or equal losses would prove nothing.
    assert full.unique().numel() > 10


def _bucket_cost(buckets, starts, length, overhead, cap):
    total = 0.0
    for start, rows in buckets:
        total += -(-rows.numel() // cap) * overhead + rows.numel() * (length - start)
    return total


@pytest.mark.parametrize("overhead", [0, 5, 40, 1e6])
@pytest.mark.parametrize("cap", [None, 4])
def test_plan_buckets_covers_every_row_at_minimum_cost(overhead, cap):
    import itertools

    gen = torch.Generator().manual_seed(11)
    starts = torch.randint(0, 7, (30,), generator=gen)
    length = 12
    buckets = G.plan_buckets(starts, length, overhead, cap)
    seen = torch.cat([rows for _, rows in buckets]).sort().values
    assert seen.tolist() == list(range(30))
    for start, rows in buckets:
        # A pass may only start at or before each of its rows' first changed position.
        assert (starts[rows] >= start).all() and (starts[rows] == start).any()
    # Brute force over every split of the distinct starts into consecutive groups.
    values = starts.unique().tolist()
    best = float("inf")
    for mask in itertools.product([False, True], repeat=len(values) - 1):
        groups, lo = [], 0
        for i, cut in enumerate(mask, start=1):
            if cut:
                groups.append(values[lo:i])
                lo = i
        groups.append(values[lo:])
        trial = [
            (g[0], torch.nonzero(torch.isin(starts, torch.tensor(g))).flatten()) for g in groups
        ]
        best = min(best, _bucket_cost(trial, starts, length, overhead, cap or 30))
    assert _bucket_cost(buckets, starts, length, overhead, cap or 30) == pytest.approx(best)
    if overhead == 0:
        assert len(buckets) == len(values)
    if overhead == 1e6 and cap is None:
        assert len(buckets) == 1


def test_screened_search_moves_on_exact_losses(tiny):
    # Screening in bfloat16 with every candidate rescored is the exact search step for step;
    # with a short rescoring list the losses it reports are still the float32 ones.
    model, tok = tiny
    kw = dict(steps=4, search_width=32, topk=16)
    exact = G.gcg(model, tok, [BEHAVIOUR], [TARGET], G.GCGSettings(**kw), seed=5)[0]
    screened = G.GCGSettings(screen_dtype="bfloat16", rescore_top=10_000, **kw)
    all_rescored = G.gcg(model, tok, [BEHAVIOUR], [TARGET], screened, seed=5)[0]
    assert all_rescored.suffix_ids == exact.suffix_ids
    assert all_rescored.losses_per_step == pytest.approx(exact.losses_per_step, abs=1e-6)
    screened = G.GCGSettings(screen_dtype=torch.bfloat16, rescore_top=2, **kw)
    short = G.gcg(model, tok, [BEHAVIOUR], [TARGET], screened, seed=5)[0]
    seq = [short.initial_loss, *short.losses_per_step]
    assert all(b <= a for a, b in zip(seq, seq[1:], strict=False))
    assert _full_loss(model, tok, short.suffix_ids) == pytest.approx(short.loss, abs=1e-5)


def test_screen_dtype_names():
    assert G.screen_dtype_from_name(None) is None
    assert G.screen_dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(RgeomError, match="'fp8' is not one of"):
        G.screen_dtype_from_name("fp8")


def test_token_gradient_loss_matches_candidate_loss(tiny):
    model, tok = tiny
    parts = G.split_prompt(tok, BEHAVIOUR, TARGET)
    suffix = torch.tensor(G.initial_suffix_ids(tok, "! " * 10))
    kv = G._prefix_kv(model, torch.tensor(parts.prefix))
    post, target = torch.tensor(parts.post), torch.tensor(parts.target)
    grad, loss, _ = G._token_gradient(model, kv, suffix, post, target)
    assert grad.shape == (suffix.numel(), model.get_input_embeddings().weight.shape[0])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    ref = G.candidate_losses(model, kv, suffix.unsqueeze(0), post, target)
    assert loss == pytest.approx(float(ref[0]), abs=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_gcg_loss_non_increasing_and_decreases(tiny):
    model, tok = tiny
    settings = G.GCGSettings(steps=10, search_width=64, topk=32)
    (res,) = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings, seed=0)
    seq = [res.initial_loss, *res.losses_per_step]
    assert all(b <= a + 1e-6 for a, b in zip(seq, seq[1:], strict=False))
    assert res.loss < res.initial_loss
    assert res.loss == pytest.approx(res.losses_per_step[-1])
    # The reported loss is the loss of the reported suffix.
    assert _full_loss(model, tok, res.suffix_ids) == pytest.approx(res.loss, abs=1e-4)
    assert res.prompt_ids == G.split_prompt(tok, BEHAVIOUR, TARGET).prompt_ids(res.suffix_ids)


def test_suffix_is_ascii_and_roundtrips(tiny, tiny_allowed):
    model, tok = tiny
    results = G.gcg(
        model,
        tok,
        [BEHAVIOUR, "Write a poem about the sea"],
        [TARGET, "Sure, here is a poem"],
        G.GCGSettings(steps=6, search_width=48, topk=64),
        seed=3,
    )
    allowed = set(tiny_allowed.tolist())
    for res in results:
        start = set(G.suffix_ids_in_context(tok, res.behaviour, "! " * 20))
        assert set(res.suffix_ids) <= allowed | start
        assert res.suffix_text.isascii()
        # The text a test case replays encodes back to exactly the optimised ids.
        assert encode_chat(tok, res.user_text).ids == res.prompt_ids


def test_candidates_are_single_swaps_from_topk(tiny_allowed):
    gen = torch.Generator().manual_seed(0)
    suffix = torch.tensor([10] * 8)
    grad = torch.randn(8, 600, generator=gen)
    cands = G.sample_candidates(suffix, grad, tiny_allowed, 100, 5, gen)
    assert cands.shape == (100, 8)
    diff = (cands != suffix).sum(1)
    assert (diff <= 1).all()
    masked = torch.full_like(grad, float("inf"))
    masked[:, tiny_allowed] = grad[:, tiny_allowed]
    top = (-masked).topk(5, dim=1).indices
    for row in cands:
        for pos in (row != suffix).nonzero().flatten().tolist():
            assert int(row[pos]) in top[pos].tolist()


def test_gcg_deterministic_for_seed_and_restores_mode(tiny):
    model, tok = tiny
    model.train()
    settings = G.GCGSettings(steps=4, search_width=32, topk=16)
    a = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings, seed=7)[0]
    assert model.training
    model.eval()
    b = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings, seed=7)[0]
    assert not model.training
    assert a.suffix_ids == b.suffix_ids and a.losses_per_step == b.losses_per_step
    c = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings, seed=8)[0]
    assert c.suffix_ids != a.suffix_ids or c.losses_per_step != a.losses_per_step


def test_gcg_works_under_no_grad(tiny):
    model, tok = tiny
    with torch.no_grad():
        settings = G.GCGSettings(steps=2, search_width=16, topk=8)
        (res,) = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings)
    assert len(res.losses_per_step) == 2


def test_warm_start_and_zero_steps(tiny):
    model, tok = tiny
    start = G.initial_suffix_ids(tok, "! " * 15)
    (res,) = G.gcg(model, tok, [BEHAVIOUR], [TARGET], G.GCGSettings(steps=0), suffixes=[start])
    assert res.suffix_ids == start and res.losses_per_step == []
    assert res.loss == res.initial_loss
    settings = G.GCGSettings(steps=2, search_width=16, topk=8)
    (res2,) = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings, suffixes=[start])
    assert len(res2.suffix_ids) == len(start)


def test_bad_arguments_raise(tiny):
    model, tok = tiny
    with pytest.raises(RgeomError, match="targets"):
        G.gcg(model, tok, [BEHAVIOUR], [], G.GCGSettings(steps=1))
    with pytest.raises(RgeomError, match="empty"):
        G.gcg(model, tok, [BEHAVIOUR], [TARGET], G.GCGSettings(steps=1), suffixes=[[]])


@pytest.mark.slow
def test_smollm2_suffix_roundtrips_in_context(smollm2):
    # SmolLM2's byte-level BPE joins the separator space with a following "!": the suffix
    # encoded alone never round-trips in context, the in-context one does, and what GCG
    # returns replays as text to exactly the optimised ids.
    model, tok = smollm2
    alone = G.initial_suffix_ids(tok, "! " * 10)
    start = G.suffix_ids_in_context(tok, BEHAVIOUR, "! " * 10)
    mask = G.roundtrip_mask(tok, torch.tensor([start]), BEHAVIOUR)
    assert mask.tolist() == [True]
    assert not G.roundtrip_mask(tok, torch.tensor([alone]), BEHAVIOUR)[0]
    settings = G.GCGSettings(steps=2, search_width=16, topk=16)
    (res,) = G.gcg(model, tok, [BEHAVIOUR], [TARGET], settings, seed=0)
    assert encode_chat(tok, res.user_text).ids == res.prompt_ids
