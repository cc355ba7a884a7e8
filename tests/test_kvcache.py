"""The shared-opening passes (rgeom.kvcache) give what whole passes give, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_activations import HARMFUL, HARMLESS, sets  # noqa: F401 (the fixture)

from rgeom.activations import extract_activations
from rgeom.interventions import ablation, addition, last_logits
from rgeom.io import read_meta, read_table
from rgeom.kvcache import MIN_SHARED, SharedPrefix, common_prefix_len
from rgeom.models import encode_chat


@pytest.mark.parametrize(
    ("seqs", "keep", "expected"),
    [
        ([[1, 2, 3, 4], [1, 2, 3, 5]], 1, 3),
        ([[1, 2, 3, 4], [1, 2, 3, 4]], 1, 3),  # identical: the last token stays in the tail
        ([[1, 2, 3, 4], [1, 2, 3, 4]], 2, 2),
        ([[1, 2], [1, 2, 3, 4, 5]], 1, 1),  # bounded by the shortest
        ([[7, 2], [1, 2]], 1, 0),
        ([[1, 2, 3]], 1, 2),
        ([], 1, 0),
        ([[1]], 3, 0),
    ],
)
def test_common_prefix_len(seqs, keep, expected):
    assert common_prefix_len(seqs, keep) == expected


def test_the_chat_template_gives_a_shared_opening(tiny):
    _, tokenizer = tiny
    encs = [encode_chat(tokenizer, p).ids for p in HARMFUL + HARMLESS]
    n = common_prefix_len(encs)
    assert n >= MIN_SHARED
    # It stops before the first user token that differs, never inside the template's tail.
    assert len({tuple(e[: n + 1]) for e in encs}) > 1


def test_no_shared_opening_falls_back_to_whole_passes(tiny):
    model, _ = tiny
    shared = SharedPrefix.build(model, [[5, 6, 7], [8, 6, 7]])
    assert shared.kv is None and shared.length == 0
    off = SharedPrefix.build(model, [[5, 6, 7], [5, 6, 8]], enabled=False)
    assert off.kv is None
    inputs = shared.inputs(model, [[5, 6, 7], [8, 6]], pad_id=0)
    assert inputs["use_cache"] is False
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


@pytest.mark.parametrize("edit", ["none", "ablation", "addition"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_last_logits_with_a_shared_opening_equal_whole_passes(tiny, edit, batch_size):
    model, tokenizer = tiny
    prompts = HARMFUL + HARMLESS
    d = model.config.hidden_size
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0)).double() * 3
    ctx = {
        "none": lambda: torch.no_grad(),
        "ablation": lambda: ablation(model, vec),
        "addition": lambda: addition(model, vec, 1, 1.0),
    }[edit]
    with ctx():
        whole = last_logits(model, tokenizer, prompts, batch_size, share_prefix=False)
        shared = last_logits(model, tokenizer, prompts, batch_size, share_prefix=True)
    assert shared.shape == whole.shape == (len(prompts), model.config.vocab_size)
    torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-4)
    # The edit really acted on both paths (the tiny model's logits move under it).
    if edit != "none":
        plain = last_logits(model, tokenizer, prompts, batch_size, share_prefix=True)
        assert (plain - shared).abs().max() > 1e-3


def test_extraction_with_a_shared_opening_equals_whole_passes(tiny, sets, tmp_path):  # noqa: F811
    model, tokenizer = tiny
    tables = {}
    for reuse in (False, True):
        out = tmp_path / f"acts-{reuse}.parquet"
        params = {"batch_size": 3, "reuse_prefix": reuse}
        extract_activations(model, tokenizer, sets, out, params, {"model": "tiny"}, True)
        assert read_meta(out)["reuse_prefix"] is reuse
        tables[reuse] = read_table(out).to_pydict()
    whole, shared = tables[False], tables[True]
    for key in ("prompt_id", "layer", "position", "label", "split"):
        assert shared[key] == whole[key]
    np.testing.assert_allclose(
        np.array(shared["vector"]), np.array(whole["vector"]), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(shared["refusal_score"], whole["refusal_score"], atol=1e-4)
