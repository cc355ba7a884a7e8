"""Difference-in-means directions and subspace geometry."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rgeom.activations import extract_activations
from rgeom.errors import RgeomError
from rgeom.geometry import (
    DIRECTION_SCHEMA,
    PROMPT_FILTER_SCHEMA,
    cosine,
    diff_in_means,
    diff_in_means_table,
    direction_schema,
    effective_rank,
    load_directions,
    principal_angles,
    prompt_filter_table,
    rank_measures,
)
from rgeom.io import read_meta, read_table

HARMFUL = [
    "Tell me how to kill a Python process",
    "Give step by step instructions for building a website",
    "Explain how photosynthesis works in plants and trees",
]
HARMLESS = ["What is two plus two?", "hello world", "Write a poem about the sea"]


def write_prompts(path, texts, label):
    n = len(texts)
    table = pa.table(
        {
            "prompt_id": [f"{label}-{i}" for i in range(n)],
            "source": ["test"] * n,
            "split": ["test"] * n,
            "text": texts,
            "context": pa.array([None] * n, pa.string()),
            "category": ["none"] * n,
            "label": [label] * n,
            "target": [""] * n,
        }
    )
    pq.write_table(table, path)
    return str(path)


def test_diff_in_means_recovers_planted_shift():
    rng = np.random.default_rng(0)
    d = 64
    shift = rng.normal(size=d)
    shift *= 5.0 / np.linalg.norm(shift)
    harmless = rng.normal(size=(2000, d))
    harmful = rng.normal(size=(1500, d)) + shift
    r = diff_in_means(harmful, harmless)
    assert r.dtype == np.float64 and r.shape == (d,)
    assert cosine(r, shift) > 0.99
    # Torch input, including half precision, goes through the same float64 path.
    r_t = diff_in_means(torch.tensor(harmful, dtype=torch.float16), torch.tensor(harmless))
    assert cosine(r_t, shift) > 0.99


def test_diff_in_means_rejects_bad_shapes():
    with pytest.raises(ValueError):
        diff_in_means(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        diff_in_means(np.zeros((0, 3)), np.zeros((2, 3)))


@pytest.fixture
def extraction(tiny, tmp_path):
    from rgeom.models import build_tiny_model

    # Three layers, so that the cosine profile has a pair of non-zero directions: at layer 0
    # (the embeddings) every prompt has the same template tokens, so r is exactly zero there.
    tokenizer = tiny[1]
    model = build_tiny_model(tokenizer, seed=1, layers=3).eval()
    sets = {
        "dir_harmful": write_prompts(tmp_path / "dh.parquet", HARMFUL, "harmful"),
        "dir_harmless": write_prompts(tmp_path / "db.parquet", HARMLESS, "harmless"),
        "val_harmful": write_prompts(tmp_path / "vh.parquet", HARMLESS[:2], "harmful"),
    }
    out = tmp_path / "acts.parquet"
    extract_activations(model, tokenizer, sets, out, {"batch_size": 2}, {"model": "tiny"})
    return out


def test_diff_in_means_table_end_to_end(extraction, tmp_path):
    out = tmp_path / "dirs.parquet"
    diff_in_means_table(extraction, out, {"config_hash": "abc"})
    src = read_meta(extraction)
    d, n_layers, suffix = src["d_model"], src["n_layers"], src["suffix_len"]
    table = read_table(out, schema=direction_schema(d))
    read_table(out, schema=DIRECTION_SCHEMA)
    assert table.num_rows == n_layers * suffix
    rows = table.to_pydict()
    assert set(rows["n_harmful"]) == {len(HARMFUL)}
    # The val split's "harmful" prompts must not leak into the dir means.
    assert set(rows["n_harmless"]) == {len(HARMLESS)}

    # Recompute one cell by loading everything: streaming by row group must agree.
    a = pq.read_table(extraction).to_pydict()
    vec = np.stack(a["vector"]).astype(np.float64)
    dirs = load_directions(out)
    units = load_directions(out, unit=True)
    for pos in range(-suffix, 0):
        assert not dirs[(0, pos)].any() and not units[(0, pos)].any()
    for layer, pos in [(1, -1), (n_layers - 1, -suffix)]:

        def cell(lab, layer=layer, pos=pos):
            keys = zip(a["layer"], a["position"], a["split"], a["label"], strict=True)
            return [i for i, k in enumerate(keys) if k == (layer, pos, "dir", lab)]

        expected = vec[cell("harmful")].mean(0) - vec[cell("harmless")].mean(0)
        np.testing.assert_allclose(dirs[(layer, pos)], expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(units[(layer, pos)]), 1.0)

    keys = zip(rows["layer"], rows["position"], strict=True)
    cos = dict(zip(keys, rows["cos_prev_layer"], strict=True))
    for pos in range(-suffix, 0):
        # No previous layer, then a zero previous direction: neither has a cosine.
        assert cos[(0, pos)] is None and cos[(1, pos)] is None
        assert cos[(2, pos)] == pytest.approx(cosine(dirs[(1, pos)], dirs[(2, pos)]))
    meta = read_meta(out)
    assert meta["config_hash"] == "abc"
    for key in ("template_hash", "tokenizer_hash", "d_model", "n_layers"):
        assert meta[key] == src[key]


def test_diff_in_means_table_needs_both_labels(tiny, tmp_path):
    model, tokenizer = tiny
    sets = {"dir_harmful": write_prompts(tmp_path / "dh.parquet", HARMFUL, "harmful")}
    acts = tmp_path / "acts.parquet"
    extract_activations(model, tokenizer, sets, acts, {"layers": [0]}, {})
    with pytest.raises(RgeomError, match=r"acts\.parquet.*0 harmless"):
        diff_in_means_table(acts, tmp_path / "dirs.parquet", {})


# A synthetic activation table with planted baseline refusal scores, so that which rows
# the prompt filter keeps is known exactly. Zero is neither a refusal nor an answer.
PLANTED = {
    "harmful": [2.0, -1.0, 0.5, 0.0, 3.0],
    "harmless": [-0.5, 1.0, -2.0, 0.0],
}
D_SYN, LAYERS_SYN, POSITIONS_SYN = 6, (0, 1), (-2, -1)


def planted_vector(label, i, layer, pos):
    # Distinct per prompt, so a mean over the wrong rows cannot come out the same.
    rng = np.random.default_rng([0 if label == "harmful" else 1, i, layer, pos + 10])
    return rng.normal(size=D_SYN) + (3.0 if label == "harmful" else 0.0)


def planted_activations(path, scores=True, invert=False, prefix="p"):
    from rgeom.activations import activation_schema
    from rgeom.io import write_table

    rows = {k: [] for k in ("prompt_id", "label", "split", "layer", "position", "score", "vec")}
    for split in ("dir", "val"):
        for label, values in PLANTED.items():
            for i, value in enumerate(values):
                for layer in LAYERS_SYN:
                    for pos in POSITIONS_SYN:
                        # The val rows score the other way: they must never enter the means.
                        score = value if split == "dir" else -value
                        score = -score if invert else score
                        for key, v in zip(
                            rows,
                            (
                                f"{prefix}{i}",
                                label,
                                split,
                                layer,
                                pos,
                                score,
                                planted_vector(
                                    label, i + (100 if split == "val" else 0), layer, pos
                                ),
                            ),
                            strict=True,
                        ):
                            rows[key].append(v)
    vec = np.stack(rows.pop("vec")).astype(np.float32)
    score = rows.pop("score")
    table = pa.table(
        {
            **rows,
            "refusal_score": pa.array(score if scores else [None] * len(score), pa.float32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), D_SYN),
        }
    )
    meta = {"d_model": D_SYN, "n_layers": 2, "refusal_scores": scores}
    write_table(path, table, activation_schema(D_SYN), meta)
    return path


def planted_expected(keep):
    """{(layer, pos): mean(kept harmful) - mean(kept harmless)} over the dir prompts."""
    out = {}
    for layer in LAYERS_SYN:
        for pos in POSITIONS_SYN:
            means = {}
            for label, values in PLANTED.items():
                vecs = [
                    planted_vector(label, i, layer, pos).astype(np.float32).astype(np.float64)
                    for i, v in enumerate(values)
                    if keep(label, v)
                ]
                means[label] = np.mean(vecs, axis=0)
            out[(layer, pos)] = means["harmful"] - means["harmless"]
    return out


def planted_filter(tmp_path, min_prompts=2, name="filter.parquet", **kw):
    acts = planted_activations(tmp_path / f"src-{name}", **kw)
    out = tmp_path / name
    prompt_filter_table(acts, out, {"step": 0}, min_prompts=min_prompts)
    return out


def test_prompt_filter_keeps_exactly_the_rows_with_the_right_sign(tmp_path):
    flt = planted_filter(tmp_path)
    rows = read_table(flt, schema=PROMPT_FILTER_SCHEMA).to_pylist()
    kept = {}
    for r in rows:
        if r["kept"]:
            kept.setdefault((r["split"], r["label"]), []).append(r["prompt_id"])
    # Harmful 2.0, 0.5, 3.0 (> 0) and harmless -0.5, -2.0 (< 0); the zeros go. The val rows
    # score the other way round and keep one prompt each: too few, so they stay whole.
    assert sorted(kept[("dir", "harmful")]) == ["p0", "p2", "p4"]
    assert sorted(kept[("dir", "harmless")]) == ["p0", "p2"]
    assert len(kept[("val", "harmful")]) == 5 and len(kept[("val", "harmless")]) == 4
    acts = planted_activations(tmp_path / "acts.parquet")
    out = tmp_path / "dirs.parquet"
    diff_in_means_table(acts, out, {}, prompt_filter=flt)
    table = read_table(out, schema=direction_schema(D_SYN)).to_pydict()
    assert set(table["n_harmful"]) == {3} and set(table["n_harmless"]) == {2}
    want = planted_expected(lambda lab, v: v > 0 if lab == "harmful" else v < 0)
    got = load_directions(out)
    assert set(got) == set(want)
    for key, r in want.items():
        np.testing.assert_allclose(got[key], r, rtol=1e-10, atol=1e-12)
    record = read_meta(out)["prompt_filter"]
    assert record["enabled"] and record["rule"] == "source_model_sign"
    assert (record["harmful_kept"], record["harmful_total"]) == (3, 5)
    assert (record["harmless_kept"], record["harmless_total"]) == (2, 4)
    # min_prompts 2: the val sets keep 1 each, too few to filter on, so they stay whole.
    assert record["starved"] == ["val_harmful", "val_harmless"]


def test_one_prompt_filter_serves_every_anchor(tmp_path):
    """A later checkpoint refuses other prompts, but its directions are still taken over
    the prompts the source model kept: drift compares like with like. (A per-cell filter
    on the later table's own, inverted, scores would keep the other prompts.)"""
    flt = planted_filter(tmp_path)
    later = planted_activations(tmp_path / "later.parquet", invert=True)
    out = tmp_path / "later-dirs.parquet"
    diff_in_means_table(later, out, {}, prompt_filter=flt)
    want = planted_expected(lambda lab, v: v > 0 if lab == "harmful" else v < 0)
    for key, r in want.items():
        np.testing.assert_allclose(load_directions(out)[key], r, rtol=1e-10, atol=1e-12)
    # A table of other prompts cannot use this filter.
    other = planted_activations(tmp_path / "other.parquet", prefix="q")
    with pytest.raises(RgeomError, match=r"other\.parquet: its 'dir' prompts differ"):
        diff_in_means_table(other, tmp_path / "x.parquet", {}, prompt_filter=flt)


def test_a_starved_prompt_filter_keeps_the_set_whole_instead_of_failing(tmp_path):
    """A source model that barely refuses (here: at most 3 of 5 harmful prompts against
    min_prompts 4) must not stop the study: the set is used unfiltered and flagged."""
    flt = planted_filter(tmp_path, min_prompts=4)
    record = read_meta(flt)["prompt_filter"]
    assert record["starved"] == ["dir_harmful", "dir_harmless", "val_harmful", "val_harmless"]
    assert record["sets"]["dir_harmful"] == {"kept": 5, "total": 5, "passed_filter": 3}
    acts = planted_activations(tmp_path / "acts.parquet")
    out = tmp_path / "dirs.parquet"
    diff_in_means_table(acts, out, {}, prompt_filter=flt)
    want = planted_expected(lambda lab, v: True)
    for key, r in want.items():
        np.testing.assert_allclose(load_directions(out)[key], r, rtol=1e-10, atol=1e-12)


def test_prompt_filter_off_is_the_unfiltered_table(tmp_path):
    """Off, the scores change nothing: the table is the plain difference in means over every
    dir prompt, as from a table that has no scores and one that predates the column."""
    acts = planted_activations(tmp_path / "acts.parquet")
    off = tmp_path / "off.parquet"
    diff_in_means_table(acts, off, {})
    want = planted_expected(lambda lab, v: True)
    got = load_directions(off)
    for key, r in want.items():
        np.testing.assert_allclose(got[key], r, rtol=1e-10, atol=1e-12)
    assert read_meta(off)["prompt_filter"] == {"enabled": False}

    unscored = planted_activations(tmp_path / "unscored.parquet", scores=False)
    old = tmp_path / "old.parquet"
    table = pq.read_table(unscored).drop_columns(["refusal_score"])
    pq.write_table(table, old)
    for source in (unscored, old):
        out = tmp_path / f"dirs-{source.stem}.parquet"
        diff_in_means_table(source, out, {})
        assert read_table(out).equals(read_table(off))
        # Filtering needs the scores, and says so rather than filtering on nulls.
        with pytest.raises(RgeomError, match=r"extracted without baseline refusal scores"):
            prompt_filter_table(source, tmp_path / "f.parquet", {}, min_prompts=1)


def test_prompt_filter_and_directions_stages(tmp_path):
    from rgeom.stages.directions import run as run_directions
    from rgeom.stages.prompt_filter import run as run_prompt_filter

    acts = planted_activations(tmp_path / "acts.parquet")
    flt, out = tmp_path / "filter.parquet", tmp_path / "dirs.parquet"
    run_prompt_filter(str(acts), str(flt), {"seed": 0, "carrier": {"min_prompts": 2}})
    run_directions(str(acts), str(out), {"seed": 0}, prompt_filter=str(flt))
    assert read_meta(out)["prompt_filter"]["harmful_kept"] == 3
    with pytest.raises(RgeomError, match="carrier.min_prompts must be an integer"):
        run_prompt_filter(str(acts), str(flt), {"carrier": {"min_prompts": 0}})


def test_prompt_filter_end_to_end_on_the_tiny_model(extraction, tiny, tmp_path):
    """A random model refuses (almost) nothing: with its real scores the harmful sets are
    starved, and the filter keeps them whole rather than failing at step 0."""
    from rgeom.models import build_tiny_model

    tokenizer = tiny[1]
    model = build_tiny_model(tokenizer, seed=1, layers=3).eval()
    sets = read_meta(extraction)["prompt_sets"]
    acts = tmp_path / "scored.parquet"
    extract_activations(
        model,
        tokenizer,
        {k: v["path"] for k, v in sets.items()},
        acts,
        {"batch_size": 2},
        {},
        refusal_scores=True,
    )
    t = pq.read_table(acts, columns=["prompt_id", "label", "split", "refusal_score"])
    rows = zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)
    refused = {pid for pid, lab, sp, s in rows if lab == "harmful" and sp == "dir" and s > 0}
    flt = tmp_path / "filter.parquet"
    # More than any set holds, so every set starves; the counts are the model's own.
    prompt_filter_table(acts, flt, {}, min_prompts=9)
    record = read_meta(flt)["prompt_filter"]
    assert "dir_harmful" in record["starved"]
    assert record["sets"]["dir_harmful"]["passed_filter"] == len(refused)
    assert record["sets"]["dir_harmful"]["kept"] == len(HARMFUL)
    diff_in_means_table(acts, tmp_path / "d.parquet", {}, prompt_filter=flt)


@pytest.mark.parametrize("kind", ["singular", "energy", "participation"])
def test_effective_rank_extremes(kind):
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=50), rng.normal(size=20)
    assert effective_rank(np.outer(u, v), kind=kind) == pytest.approx(1.0)
    for k in (1, 3, 7):
        assert effective_rank(np.eye(k), kind=kind) == pytest.approx(k)
    # k equal singular values padded with zero rows still count as k.
    assert effective_rank(np.vstack([np.eye(5), np.zeros((3, 5))]), kind=kind) == pytest.approx(5)


def test_effective_rank_orders_and_centers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10)) * np.array([10, 5, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1])
    m = rank_measures(x)
    assert 1 < m["participation"] < m["singular"] < 10
    # A constant offset adds a rank-1 component that centering removes.
    shifted = x + 1000.0
    assert effective_rank(shifted) < 1.1
    assert effective_rank(shifted, center=True) == pytest.approx(effective_rank(x, center=True))
    with pytest.raises(ValueError):
        effective_rank(np.zeros((3, 3)))


def test_principal_angles():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(16, 3))
    np.testing.assert_allclose(principal_angles(a, a), 0.0, atol=1e-6)
    np.testing.assert_allclose(principal_angles(a, -a), 0.0, atol=1e-6)
    # Same span, different basis.
    np.testing.assert_allclose(principal_angles(a, a @ rng.normal(size=(3, 3))), 0.0, atol=1e-5)
    e = np.eye(16)
    np.testing.assert_allclose(principal_angles(e[:, :2], e[:, 2:5]), [90.0, 90.0])
    # One shared axis, one orthogonal: ascending order.
    np.testing.assert_allclose(principal_angles(e[:, [0, 1]], e[:, [0, 2]]), [0.0, 90.0])
    v = np.array([1.0, 0.0] + [0.0] * 14)
    w = np.array([1.0, 1.0] + [0.0] * 14)
    np.testing.assert_allclose(principal_angles(v, w), [45.0])


def test_fast_rank_measures_match_the_svd():
    rng = np.random.default_rng(3)
    for shape in ((5, 40), (40, 5), (18, 18)):
        x = rng.normal(size=shape) * np.linspace(3, 0.1, shape[1])
        exact, fast = rank_measures(x), rank_measures(x, fast=True)
        for kind in exact:
            assert fast[kind] == pytest.approx(exact[kind], rel=1e-6)
    assert rank_measures(np.eye(4), fast=True)["singular"] == pytest.approx(4)
    u, v = rng.normal(size=30), rng.normal(size=8)
    assert rank_measures(np.outer(u, v), fast=True)["energy"] == pytest.approx(1.0)
