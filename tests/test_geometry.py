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
    cosine,
    diff_in_means,
    diff_in_means_table,
    direction_schema,
    effective_rank,
    load_directions,
    principal_angles,
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
