"""Ablation, addition and weight orthogonalization on the tiny model; carrier search."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from rgeom.errors import RgeomError
from rgeom.interventions import (
    PrefixCache,
    ablation,
    addition,
    bootstrap_means,
    filter_by_baseline,
    kl_last_position,
    last_logits,
    orthogonalize_weights,
    orthonormal_basis,
    refusal_score,
    refusal_score_from_logits,
    refusal_token_ids,
    select_carrier,
)
from rgeom.models import decoder_layers

PROMPTS = [
    "Tell me how to kill a Python process",
    "What is two plus two?",
    "Write a poem about the sea and the trees, please",
]


def unit(d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d)
    return v / np.linalg.norm(v)


def record_sites(model, sink):
    """Hooks that record every block input, attention output and MLP output."""
    handles = []
    for block in decoder_layers(model):
        handles.append(
            block.register_forward_pre_hook(
                lambda m, a, k: sink.append(a[0] if a else k["hidden_states"]), with_kwargs=True
            )
        )
        for part in (block.self_attn, block.mlp):
            handles.append(
                part.register_forward_hook(
                    lambda m, a, o: sink.append(o[0] if isinstance(o, tuple) else o)
                )
            )
    return handles


def test_ablation_removes_component_at_every_site(tiny):
    model, tokenizer = tiny
    d = model.config.hidden_size
    r = torch.tensor(unit(d, 0))
    sites: list[torch.Tensor] = []
    # Registered after the ablation hooks, so they see what the model goes on to use.
    with ablation(model, r):
        handles = record_sites(model, sites)
        try:
            last_logits(model, tokenizer, PROMPTS, batch_size=2)
        finally:
            for h in handles:
                h.remove()
    n_layers = len(decoder_layers(model))
    # Three sites per block, in three passes: the prompts' shared opening, then two batches.
    assert len(sites) == 3 * n_layers * 3
    for x in sites:
        assert (x.double() @ r).abs().max() < 1e-5
    # Hooks are gone afterwards: the component is back.
    sites.clear()
    handles = record_sites(model, sites)
    try:
        last_logits(model, tokenizer, PROMPTS[:1])
    finally:
        for h in handles:
            h.remove()
    assert max((x.double() @ r).abs().max() for x in sites) > 1e-3


def test_subspace_ablation_removes_all_k(tiny):
    model, tokenizer = tiny
    d = model.config.hidden_size
    dirs = np.stack([unit(d, s) * (s + 1) for s in range(3)])
    basis = orthonormal_basis(dirs)
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    sites: list[torch.Tensor] = []
    with ablation(model, dirs):
        handles = record_sites(model, sites)
        try:
            last_logits(model, tokenizer, PROMPTS)
        finally:
            for h in handles:
                h.remove()
    for x in sites:
        assert (x.double() @ torch.tensor(dirs).T).abs().max() < 1e-5
    with pytest.raises(ValueError):
        orthonormal_basis(np.stack([dirs[0], 2 * dirs[0]]))


def test_weight_orthogonalization_matches_hooks(tiny):
    model, tokenizer = tiny
    d = model.config.hidden_size
    r = unit(d, 3)
    with ablation(model, r):
        hooked = last_logits(model, tokenizer, PROMPTS)
    edited = copy.deepcopy(model)
    assert edited.get_output_embeddings().weight is edited.get_input_embeddings().weight
    orthogonalize_weights(edited, r)
    # The tied head was split off and left as it was.
    assert edited.get_output_embeddings().weight is not edited.get_input_embeddings().weight
    torch.testing.assert_close(
        edited.get_output_embeddings().weight, model.get_output_embeddings().weight
    )
    assert not edited.config.tie_word_embeddings
    baked = last_logits(edited, tokenizer, PROMPTS)
    torch.testing.assert_close(baked, hooked, atol=1e-4, rtol=1e-4)
    base = last_logits(model, tokenizer, PROMPTS)
    assert (base - hooked).abs().max() > 1e-3, "the ablation must change something"


def test_addition_coefficient_zero_is_identity_and_nonzero_is_not(tiny):
    model, tokenizer = tiny
    r = unit(model.config.hidden_size, 4) * 5.0
    base = last_logits(model, tokenizer, PROMPTS)
    with addition(model, r, layer=1, coeff=0.0):
        same = last_logits(model, tokenizer, PROMPTS)
    torch.testing.assert_close(same, base)
    with addition(model, r, layer=1, coeff=1.0):
        moved = last_logits(model, tokenizer, PROMPTS)
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(last_logits(model, tokenizer, PROMPTS), base)


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("layer", [0, 1])
def test_prefix_cache_addition_matches_full_forward(tiny, layer, share_prefix):
    model, tokenizer = tiny
    r = unit(model.config.hidden_size, 6) * 4.0
    cache = PrefixCache(model, tokenizer, PROMPTS, [0, 1], 2, share_prefix)
    assert cache.usable
    # With sharing on, the template's opening really is run once (and restarted from).
    assert (cache.shared_len > 0) is share_prefix
    whole = last_logits(model, tokenizer, PROMPTS, share_prefix=False)
    torch.testing.assert_close(cache.base, whole, atol=1e-5, rtol=1e-5)
    with addition(model, r, layer=layer, coeff=1.0):
        full = last_logits(model, tokenizer, PROMPTS, share_prefix=False)
    torch.testing.assert_close(cache.logits_with_addition(layer, r), full, atol=1e-5, rtol=1e-5)
    # The model's own block list is restored.
    assert len(decoder_layers(model)) == model.config.num_hidden_layers


def test_orthogonalized_model_survives_save_and_load(tiny, tmp_path):
    from rgeom.models import load_model

    model, tokenizer = tiny
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, unit(model.config.hidden_size, 7))
    expected = last_logits(edited, tokenizer, PROMPTS)
    edited.save_pretrained(tmp_path / "ortho")
    reloaded = load_model(tmp_path / "ortho")
    torch.testing.assert_close(last_logits(reloaded, tokenizer, PROMPTS), expected)


def test_last_logits_batched_equals_single(tiny):
    model, tokenizer = tiny
    batched = last_logits(model, tokenizer, PROMPTS, batch_size=3)
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(batched[i], last_logits(model, tokenizer, [p])[0])


def test_refusal_score_and_kl():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids = [3, 7]
    p = torch.softmax(logits.double(), -1)[:, ids].sum(-1)
    expected = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(refusal_score_from_logits(logits, ids), expected)
    # Saturated logits stay finite.
    sat = torch.full((1, 50), -1e4)
    sat[0, 3] = 1e4
    assert torch.isfinite(refusal_score_from_logits(sat, ids)).all()
    assert torch.all(kl_last_position(logits, logits) == 0)
    other = logits + torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    kl = kl_last_position(logits, other)
    assert torch.all(kl > 0)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(other.double(), -1),
        torch.log_softmax(logits.double(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(kl, ref)


def test_refusal_token_ids_come_from_the_tokenizer(tiny):
    _, tokenizer = tiny
    ids = refusal_token_ids(tokenizer)
    assert len(ids) == len(set(ids)) >= 1
    assert tokenizer.decode([ids[0]]) == "I"


def test_refusal_score_end_to_end(tiny):
    model, tokenizer = tiny
    scores = refusal_score(model, tokenizer, PROMPTS, refusal_token_ids(tokenizer))
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_select_carrier_rules(tiny):
    model, tokenizer = tiny
    d = model.config.hidden_size
    ids = refusal_token_ids(tokenizer)
    head = model.get_output_embeddings().weight.detach().double()
    # Adding the refusal tokens' unembedding rows pushes towards refusal (induce > 0).
    toward = head[ids].mean(0).numpy()
    toward = 20 * toward / np.linalg.norm(toward)
    directions = {
        (0, -1): toward,
        (1, -1): -toward,
        (1, -2): np.zeros(d),
    }
    result = select_carrier(
        model,
        tokenizer,
        directions,
        PROMPTS[:2],
        PROMPTS[1:],
        refusal_ids=ids,
        kl_max=10.0,
        max_layer_frac=0.5,
    )
    rows = {(r["layer"], r["position"]): r for r in result.candidates}
    assert set(rows) == set(directions)
    # Layer 1 is >= 0.5 * 2 layers: recorded, not evaluated.
    assert not rows[(1, -1)]["admissible"] and math.isnan(rows[(1, -1)]["bypass"])
    assert not rows[(1, -2)]["admissible"]
    c = rows[(0, -1)]
    assert math.isfinite(c["bypass"]) and c["kl"] >= 0
    assert result.carrier == ((0, -1) if c["admissible"] else None)
    assert c["admissible"] == (c["induce"] >= 0 and c["kl"] <= 10.0)
    assert result.reused_prefix
    # Restarting from cached activations changes nothing but the cost.
    full = select_carrier(
        model,
        tokenizer,
        directions,
        PROMPTS[:2],
        PROMPTS[1:],
        refusal_ids=ids,
        kl_max=10.0,
        max_layer_frac=0.5,
        reuse_prefix=False,
    )
    assert not full.reused_prefix and full.carrier == result.carrier
    for a, b in zip(full.candidates, result.candidates, strict=True):
        for key in ("bypass", "induce", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-4, nan_ok=True)
    # A strict KL bound rules every candidate out.
    strict = select_carrier(
        model, tokenizer, {(0, -1): toward}, PROMPTS[:2], PROMPTS[1:], refusal_ids=ids, kl_max=0
    )
    assert strict.carrier is None or strict.candidates[0]["kl"] == 0


@pytest.mark.slow
def test_smollm2_orthogonalization_matches_hooks(smollm2):
    model, tokenizer = smollm2
    d = model.config.hidden_size
    r = unit(d, 5)
    prompts = PROMPTS[:2]
    with ablation(model, r):
        hooked = last_logits(model, tokenizer, prompts)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r)
    baked = last_logits(edited, tokenizer, prompts)
    del edited
    torch.testing.assert_close(baked, hooked, atol=2e-3, rtol=1e-3)
    ids = refusal_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids][:2] == ["I", "Sorry"]


def test_carrier_search_table_end_to_end(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rgeom.activations import extract_activations
    from rgeom.carrier_table import CarrierInputs
    from rgeom.geometry import diff_in_means_table
    from rgeom.interventions import CARRIER_SCHEMA, carrier_search_table
    from rgeom.io import read_meta, read_table

    model, tokenizer = tiny

    def prompts(name, texts, label):
        n = len(texts)
        path = tmp_path / f"{name}.parquet"
        table = {
            "prompt_id": [f"{name}-{i}" for i in range(n)],
            "text": texts,
            "context": pa.array([None] * n, pa.string()),
            "label": [label] * n,
        }
        pq.write_table(pa.table(table), path)
        return str(path)

    sets = {
        "dir_harmful": prompts("dh", PROMPTS[:2], "harmful"),
        "dir_harmless": prompts("db", PROMPTS[1:], "harmless"),
    }
    extract_activations(model, tokenizer, sets, tmp_path / "a.parquet", {"layers": [0, 1]}, {})
    diff_in_means_table(tmp_path / "a.parquet", tmp_path / "d.parquet", {})
    out = tmp_path / "carrier.parquet"
    suffix = read_meta(tmp_path / "a.parquet")["suffix_len"]
    # Every captured position; the default searches only the last one.
    positions = list(range(-suffix, 0))
    inputs = CarrierInputs(tmp_path / "d.parquet", sets["dir_harmful"], sets["dir_harmless"])
    result = carrier_search_table(
        model,
        tokenizer,
        inputs,
        out,
        # A random-init model never refuses: the prompt filter would keep nothing.
        {
            "kl_max": 1.0,
            "max_layer_frac": 1.0,
            "positions": positions,
            "filter_prompts": False,
            "n_boot": 50,
        },
        {"arm": "base"},
        seed=3,
    )
    table = read_table(out, schema=CARRIER_SCHEMA)
    assert table.num_rows == 2 * suffix
    scored = [row for row in table.to_pylist() if math.isfinite(row["bypass"])]
    assert scored
    for row in table.to_pylist():
        if row not in scored:
            # Zero directions (identical template tokens) are not scored: no interval.
            assert row["n_harmful"] is None and row["bypass_ci_low"] is None
            continue
        assert row["n_harmful"] == 2 and row["n_harmless"] == 2
        for score in ("bypass", "induce", "kl"):
            lo, hi = row[f"{score}_ci_low"], row[f"{score}_ci_high"]
            assert lo <= row[score] <= hi
    assert read_meta(out)["prompt_filter"] == {
        "enabled": False,
        "harmful_kept": 2,
        "harmless_kept": 2,
    }
    assert read_meta(out)["bootstrap"] == {"n_boot": 50, "ci": 0.95, "seed": 3}

    # The shared prompt filter (decided on the source model) picks the validation prompts:
    # here it keeps one harmful prompt, whatever this model's own scores say.
    from rgeom.geometry import PROMPT_FILTER_SCHEMA
    from rgeom.io import write_table

    def filter_file(name, harmful_ids):
        rows = [(pid, "val", "harmful", 1.0, pid == "dh-1") for pid in harmful_ids]
        rows += [(pid, "val", "harmless", -1.0, True) for pid in ("db-0", "db-1")]
        path = tmp_path / name
        cols = PROMPT_FILTER_SCHEMA.names
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})
        write_table(path, table, PROMPT_FILTER_SCHEMA, {"prompt_filter": {"enabled": True}})
        return path

    params = {"max_layer_frac": 1.0, "positions": [-1], "n_boot": 0, "subspace_ranks": []}
    filtered = tmp_path / "filtered.parquet"
    carrier_search_table(
        model,
        tokenizer,
        dataclasses.replace(inputs, prompt_filter=filter_file("f.parquet", ["dh-0", "dh-1"])),
        filtered,
        params,
        {},
    )
    record = read_meta(filtered)["prompt_filter"]
    assert (record["harmful_kept"], record["harmful_total"]) == (1, 2)
    assert set(read_table(filtered).column("n_harmful").to_pylist()) - {None} == {1}
    # A filter built on other prompts is refused by name.
    with pytest.raises(
        RgeomError, match=r"lacks prompt\(s\) \['zz'\] and has prompt\(s\) \['dh-0'\]"
    ):
        carrier_search_table(
            model,
            tokenizer,
            dataclasses.replace(inputs, prompt_filter=filter_file("g.parquet", ["zz", "dh-1"])),
            tmp_path / "never.parquet",
            params,
            {},
        )
    assert not (tmp_path / "never.parquet").exists()
    meta = read_meta(out)
    assert meta["arm"] == "base" and meta["refusal_tokens"][0] == "I"
    assert meta["carrier"] == (list(result.carrier) if result.carrier else None)
    assert sum(table.column("is_carrier").to_pylist()) == (result.carrier is not None)


def test_admissible_is_arditis_filter_fn_negated():
    from rgeom.interventions import admissible

    # filter_fn discards kl > 0.1 and induce < 0 (not <= 0), and any NaN.
    assert admissible(-5.0, 0.0, 0.1, 0.1)
    assert not admissible(-5.0, -1e-9, 0.0, 0.1)
    assert not admissible(-5.0, 1.0, 0.1000001, 0.1)
    assert not admissible(math.nan, 1.0, 0.0, 0.1)


def test_rank_k_carriers_ablate_the_span_and_add_the_projection(tiny):
    from rgeom.causal import subspace_basis

    model, tokenizer = tiny
    d = model.config.hidden_size
    ids = refusal_token_ids(tokenizer)
    rng = np.random.default_rng(5)
    directions = {(layer, -1): 3 * rng.normal(size=d) for layer in (0, 1)}
    # One contrast: r-hat plus one more axis, so rank 2 exists and rank 3 does not.
    contrasts = rng.normal(size=(1, d))
    asked = []

    def subspace(anchor, k):
        asked.append((anchor, k))
        basis = subspace_basis(directions[anchor], contrasts, k)
        return basis if len(basis) == k else None

    result = select_carrier(
        model,
        tokenizer,
        directions,
        PROMPTS[:2],
        PROMPTS[1:],
        refusal_ids=ids,
        kl_max=100.0,
        max_layer_frac=1.0,
        subspace_ranks=[2, 3],
        subspace=subspace,
    )
    subs = {sub["rank"]: sub for sub in result.subspaces}
    # Around the carrier, or the lowest-bypass candidate when none is admissible.
    bypass = {(r["layer"], r["position"]): r["bypass"] for r in result.candidates}
    anchor = result.carrier or min(bypass, key=lambda k: (bypass[k], k[0]))
    assert asked == [(anchor, 2), (anchor, 3)]
    two = subs[2]
    assert (two["layer"], two["position"]) == anchor
    basis = subspace_basis(directions[anchor], contrasts, 2)
    # Ablating the plane is the bypass and the KL, measured directly.
    with ablation(model, basis):
        want = refusal_score(model, tokenizer, PROMPTS[:2], ids).mean()
        edited = last_logits(model, tokenizer, PROMPTS[1:])
    assert two["bypass"] == pytest.approx(want, abs=1e-5)
    kl = kl_last_position(last_logits(model, tokenizer, PROMPTS[1:]), edited).mean()
    assert two["kl"] == pytest.approx(float(kl), abs=1e-5)
    # Induce adds r projected on the plane: r itself, which the nested span holds.
    with addition(model, directions[anchor], anchor[0]):
        want = refusal_score(model, tokenizer, PROMPTS[1:], ids).mean()
    assert two["induce"] == pytest.approx(want, abs=1e-4)
    assert two["admissible"] == (two["induce"] >= 0 and two["kl"] <= 100.0)
    assert math.isnan(subs[3]["bypass"]) and not subs[3]["admissible"]


def test_filter_by_baseline_counts_and_error():
    harmful = np.array([1.5, -0.2, 0.3, -3.0])
    harmless = np.array([-1.0, 0.5, -0.1])
    keep_h, keep_b, record = filter_by_baseline(harmful, harmless, min_prompts=2)
    assert keep_h.tolist() == [0, 2] and keep_b.tolist() == [0, 2]
    assert (record["harmful_kept"], record["harmful_total"]) == (2, 4)
    assert (record["harmless_kept"], record["harmless_total"]) == (2, 3)
    # A score of exactly 0 is neither a refusal nor an answer.
    keep_h, keep_b, _ = filter_by_baseline(np.array([0.0, 1.0]), np.array([0.0, -1.0]), 1)
    assert keep_h.tolist() == [1] and keep_b.tolist() == [1]
    with pytest.raises(RgeomError, match=r"harmful 2/4 kept .* harmless 2/3 kept .* is 3"):
        filter_by_baseline(harmful, harmless, min_prompts=3)


def test_select_carrier_filters_prompts_by_baseline_score(tiny):
    model, tokenizer = tiny
    a, b = PROMPTS[0], PROMPTS[1]
    logp = torch.log_softmax(last_logits(model, tokenizer, [a, b]).double(), -1)
    # "Refusal" tokens planted to separate the two prompts: those most likelier after a than
    # after b, until they just hold half of a's mass. Along that order a's cumulative mass
    # stays ahead of b's, so a "refuses" (score > 0) and b does not.
    order = torch.argsort(logp[0] - logp[1], descending=True)
    mass = torch.cumsum(logp[0, order].exp(), 0)
    ids = order[: int((mass <= 0.5).sum()) + 1].tolist()
    base = refusal_score_from_logits(last_logits(model, tokenizer, [a, b]), ids).numpy()
    assert base[0] > 0 > base[1], "precondition: the planted tokens separate the prompts"
    r = 5 * unit(model.config.hidden_size, 7)
    kwargs = dict(refusal_ids=ids, kl_max=10.0, max_layer_frac=1.0, filter_prompts=True)
    result = select_carrier(model, tokenizer, {(0, -1): r}, [a, b], [a, b], **kwargs)
    assert result.prompt_filter == {
        "enabled": True,
        "min_prompts": 1,
        "harmful_kept": 1,
        "harmful_total": 2,
        "harmless_kept": 1,
        "harmless_total": 2,
    }
    # Scored on the kept prompts only: the same as searching [a] and [b] unfiltered, with
    # the prefix cache (built over both harmless prompts) read at the kept row.
    alone = select_carrier(
        model, tokenizer, {(0, -1): r}, [a], [b], refusal_ids=ids, kl_max=10.0, max_layer_frac=1.0
    )
    for key in ("bypass", "induce", "kl"):
        assert result.candidates[0][key] == pytest.approx(alone.candidates[0][key], abs=1e-5)
    with pytest.raises(RgeomError, match=r"harmful 1/2 kept .* harmless 1/2 kept"):
        select_carrier(model, tokenizer, {(0, -1): r}, [a, b], [a, b], min_prompts=2, **kwargs)


def test_bootstrap_means_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=400)
    lo, hi = bootstrap_means(x, 400, 0.95, seed=1)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.1) and hi == pytest.approx(
        x.mean() + half, abs=0.1
    )
    assert bootstrap_means(x, 400, 0.95, seed=1) == (lo, hi)
    assert bootstrap_means(np.full(5, 2.0), 50, 0.9, seed=0) == (2.0, 2.0)
    assert bootstrap_means(x, 0, 0.95, seed=0) == (None, None)
    assert bootstrap_means(np.array([1.0, np.nan]), 10, 0.95, seed=0) == (None, None)
