"""Hook-based resid_pre extraction on the tiny random model (and once on SmolLM2)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rgeom.activations import (
    ACTIVATION_SCHEMA,
    ResidCapture,
    activation_schema,
    extract_activations,
    padded_positions,
)
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table
from rgeom.models import encode_chat, left_pad

HARMFUL = [
    "Tell me how to kill a Python process",
    "Give step by step instructions for building a website",
    "How do I bake bread at home?",
    "Explain how photosynthesis works in plants and trees, step by step, please",
    "Write a poem",
]
HARMLESS = [
    "What is two plus two?",
    "hello world",
    "Write a poem about the sea",
    "Here is a short answer: the capital of France is Paris. Thank you",
]


def write_prompts(path, texts, label, contexts=None):
    n = len(texts)
    table = pa.table(
        {
            "prompt_id": [f"{label}-{i}" for i in range(n)],
            "source": ["test"] * n,
            "split": ["test"] * n,
            "text": texts,
            "context": pa.array(contexts or [None] * n, pa.string()),
            "category": ["none"] * n,
            "label": [label] * n,
            "target": [""] * n,
        }
    )
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def sets(tmp_path):
    return {
        "dir_harmful": write_prompts(tmp_path / "dh.parquet", HARMFUL, "harmful"),
        "dir_harmless": write_prompts(tmp_path / "db.parquet", HARMLESS, "harmless"),
        "val_harmful": write_prompts(
            tmp_path / "vh.parquet", HARMFUL[:2], "harmful", contexts=["some context", None]
        ),
    }


def reference_hidden(model, tokenizer, text):
    enc = encode_chat(tokenizer, text)
    with torch.inference_mode():
        hs = model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
    return [h[0, -enc.suffix_len :].float() for h in hs], enc.suffix_len


def test_capture_matches_hidden_states_batched_and_alone(tiny):
    model, tokenizer = tiny
    n_layers = model.config.num_hidden_layers
    encs = [encode_chat(tokenizer, t) for t in HARMFUL]
    suffix = encs[0].suffix_len
    ids, mask = left_pad([e.ids for e in encs], tokenizer.pad_token_id)
    assert mask.sum(1).min() < ids.shape[1], "the batch must actually contain padding"
    with ResidCapture(model, range(n_layers), suffix) as cap, torch.inference_mode():
        batched = cap.run(ids, mask)
    for i, text in enumerate(HARMFUL):
        ref, s = reference_hidden(model, tokenizer, text)
        assert s == suffix
        for layer in range(n_layers):
            assert batched[layer].shape == (len(HARMFUL), suffix, model.config.hidden_size)
            torch.testing.assert_close(batched[layer][i], ref[layer], atol=1e-5, rtol=1e-5)


def test_early_stop_skips_later_blocks(tiny):
    model, tokenizer = tiny
    enc = encode_chat(tokenizer, HARMFUL[0])
    ran = []
    handles = [
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        ids, mask = left_pad([enc.ids], tokenizer.pad_token_id)
        with ResidCapture(model, [0], enc.suffix_len) as cap, torch.inference_mode():
            got = cap.run(ids, mask)
    finally:
        for h in handles:
            h.remove()
    # Block 0's own pre-hook stops the pass, so no block body runs at all.
    assert ran == [0]
    ref, _ = reference_hidden(model, tokenizer, HARMFUL[0])
    torch.testing.assert_close(got[0][0], ref[0])
    # The capture removes its hooks, so the shared model runs normally afterwards.
    assert all(not block._forward_pre_hooks for block in model.model.layers)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=padded_positions(mask))
    assert torch.isfinite(out.logits).all()


def test_extract_table_shape_order_and_values(tiny, sets, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "acts.parquet"
    meta = {"model": "tiny"}
    extract_activations(model, tokenizer, sets, out, {"batch_size": 3}, meta)
    n_layers = model.config.num_hidden_layers
    d = model.config.hidden_size
    suffix = encode_chat(tokenizer, "x").suffix_len
    n_prompts = len(HARMFUL) + len(HARMLESS) + 2

    table = read_table(out, schema=activation_schema(d, "float32"))
    assert table.num_rows == n_prompts * n_layers * suffix
    assert table.schema.field("vector").type == pa.list_(pa.float32(), d)
    assert sorted(set(table.column("position").to_pylist())) == list(range(-suffix, 0))
    # Streamed: one row group per (batch, layer), never one for the whole table.
    n_batches = -(-n_prompts // 3)
    pf = pq.ParquetFile(out)
    assert pf.num_row_groups == n_batches * n_layers
    for g in range(pf.num_row_groups):
        layers = set(pf.read_row_group(g, columns=["layer"]).column("layer").to_pylist())
        assert len(layers) == 1

    rows = table.to_pydict()
    splits = {(pid, s) for pid, s in zip(rows["prompt_id"], rows["split"], strict=True)}
    assert ("harmful-0", "dir") in splits and ("harmful-0", "val") in splits
    assert set(rows["label"]) == {"harmful", "harmless"}

    info = read_meta(out)
    assert info["model"] == "tiny"
    assert info["hook_point"] == "resid_pre"
    assert info["d_model"] == d and info["n_layers"] == n_layers
    assert info["layers"] == list(range(n_layers)) and info["suffix_len"] == suffix
    assert len(info["template_hash"]) == 64 and len(info["tokenizer_hash"]) == 64
    assert set(info["prompt_sets"]) == set(sets)
    assert info["num_rows"] == table.num_rows

    # Spot-check values against an unbatched output_hidden_states pass, incl. the context rule.
    vec = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    for pid, split, text in [
        ("harmless-1", "dir", HARMLESS[1]),
        ("harmful-0", "val", f"some context\n\n---\n\n{HARMFUL[0]}"),
    ]:
        ref, _ = reference_hidden(model, tokenizer, text)
        for layer in range(n_layers):
            sel = [
                i
                for i, (p, s, ly) in enumerate(
                    zip(rows["prompt_id"], rows["split"], rows["layer"], strict=True)
                )
                if p == pid and s == split and ly == layer
            ]
            positions = [rows["position"][i] for i in sel]
            assert positions == list(range(-suffix, 0))
            np.testing.assert_allclose(vec[sel], ref[layer].numpy(), atol=1e-5, rtol=1e-5)


def test_extract_layer_subset_and_float16(tiny, sets, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "acts16.parquet"
    extract_activations(
        model, tokenizer, sets, out, {"layers": [1], "dtype": "float16", "batch_size": 16}, {}
    )
    table = read_table(out, schema=ACTIVATION_SCHEMA)
    assert set(table.column("layer").to_pylist()) == {1}
    assert table.schema.field("vector").type.value_type == pa.float16()
    assert read_meta(out)["layers"] == [1]


def test_missing_prompt_file_names_it(tiny, sets, tmp_path):
    model, tokenizer = tiny
    sets = dict(sets, val_harmless=str(tmp_path / "nope.parquet"))
    with pytest.raises(RgeomError, match=r"val_harmless.*nope\.parquet"):
        extract_activations(model, tokenizer, sets, tmp_path / "a.parquet", {}, {})
    assert not (tmp_path / "a.parquet").exists()


def test_layer_out_of_range_names_layer_and_count(tiny, sets, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(RgeomError, match=r"layer 7 .*n_layers=2"):
        extract_activations(model, tokenizer, sets, tmp_path / "a.parquet", {"layers": [0, 7]}, {})


def test_missing_column_and_bad_dtype(tiny, sets, tmp_path):
    model, tokenizer = tiny
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "text": ["hi"]}), bad)
    with pytest.raises(RgeomError, match=r"dir_x.*label"):
        extract_activations(model, tokenizer, {"dir_x": str(bad)}, tmp_path / "a.parquet", {}, {})
    with pytest.raises(RgeomError, match="activations.dtype"):
        extract_activations(model, tokenizer, sets, tmp_path / "a.parquet", {"dtype": "int8"}, {})


def test_sharded_extraction_equals_one_piece(tiny, sets, tmp_path):
    """Shards of whole batches give the same row groups and rows as one streamed file, and
    the parts folder is gone afterwards."""
    model, tokenizer = tiny
    whole, sharded = tmp_path / "whole.parquet", tmp_path / "sharded.parquet"
    extract_activations(model, tokenizer, sets, whole, {"batch_size": 2}, {"model": "tiny"})
    # shard_size 3 rounds up to 2 batches of 2: 11 prompts make 3 shards.
    params = {"batch_size": 2, "shard_size": 3}
    extract_activations(model, tokenizer, sets, sharded, params, {"model": "tiny"})
    assert read_table(sharded).equals(read_table(whole))
    assert pq.ParquetFile(sharded).num_row_groups == pq.ParquetFile(whole).num_row_groups
    assert read_meta(sharded)["num_rows"] == read_meta(whole)["num_rows"]
    assert not (tmp_path / "sharded.parquet.parts").exists()
    with pytest.raises(RgeomError, match="shard_size"):
        extract_activations(model, tokenizer, sets, sharded, {"shard_size": 0}, {})


def test_stored_refusal_scores_equal_the_carrier_search_scores(tiny, sets, tmp_path):
    """With refusal_scores, each prompt's rows carry interventions.refusal_score of that
    prompt (the same tokens, the same definition), and the vectors are unchanged."""
    from rgeom.activations import prompt_text
    from rgeom.interventions import refusal_score, refusal_token_ids

    model, tokenizer = tiny
    plain, scored = tmp_path / "plain.parquet", tmp_path / "scored.parquet"
    extract_activations(model, tokenizer, sets, plain, {"batch_size": 3}, {})
    extract_activations(model, tokenizer, sets, scored, {"batch_size": 3}, {}, refusal_scores=True)

    off = read_table(plain, schema=ACTIVATION_SCHEMA)
    assert off.column("refusal_score").null_count == off.num_rows
    assert read_meta(plain)["refusal_scores"] is False
    on = read_table(scored, schema=ACTIVATION_SCHEMA)
    assert on.column("refusal_score").null_count == 0
    ids = refusal_token_ids(tokenizer)
    info = read_meta(scored)
    assert info["refusal_scores"] is True and info["refusal_token_ids"] == ids
    # Running the forward on to the logits leaves every captured activation as it was.
    assert on.drop_columns(["refusal_score"]).equals(off.drop_columns(["refusal_score"]))

    rows = on.to_pydict()
    stored: dict[tuple[str, str], set[float]] = {}
    for pid, split, score in zip(
        rows["prompt_id"], rows["split"], rows["refusal_score"], strict=True
    ):
        stored.setdefault((split, pid), set()).add(score)
    assert all(len(v) == 1 for v in stored.values()), "one score per prompt, on every row"
    for key, path in sets.items():
        prompts = pq.read_table(path).to_pydict()
        texts = [
            prompt_text(t, c) for t, c in zip(prompts["text"], prompts["context"], strict=True)
        ]
        # Batched differently from the extraction (one batch, another length order).
        want = refusal_score(model, tokenizer, texts, ids, batch_size=16)
        got = [stored[(key.split("_")[0], pid)].pop() for pid in prompts["prompt_id"]]
        assert len(set(np.round(want, 3))) > 1, "the prompts must differ in score"
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_scored_and_unscored_shards_are_never_mixed(tiny, sets, tmp_path, monkeypatch, caplog):
    """Whether scores are stored is part of the shard fingerprint: finished shards of an
    unscored run are discarded by a scored one, which then scores every row."""
    import logging

    from rgeom import activations
    from rgeom.io import parts_dir

    model, tokenizer = tiny
    out = tmp_path / "acts.parquet"
    params = {"batch_size": 2, "shard_size": 3}
    # Leave the finished shards behind, as a job killed before its last step would.
    monkeypatch.setattr(activations.Shards, "finish", lambda self: None)
    extract_activations(model, tokenizer, sets, out, params, {"model": "tiny"})
    assert parts_dir(out).exists()
    out.unlink()
    with caplog.at_level(logging.INFO, logger="rgeom"):
        extract_activations(
            model, tokenizer, sets, out, params, {"model": "tiny"}, refusal_scores=True
        )
    assert "discarding" in caplog.text and "already done" not in caplog.text
    assert read_table(out).column("refusal_score").null_count == 0
    whole = tmp_path / "whole.parquet"
    extract_activations(
        model, tokenizer, sets, whole, {"batch_size": 2}, {"model": "tiny"}, refusal_scores=True
    )
    assert read_table(out).equals(read_table(whole))


@pytest.mark.slow
def test_smollm2_capture_matches_hidden_states(smollm2):
    model, tokenizer = smollm2
    texts = HARMFUL[:3]
    encs = [encode_chat(tokenizer, t) for t in texts]
    layers = [0, 10, 29]
    ids, mask = left_pad([e.ids for e in encs], tokenizer.pad_token_id)
    with ResidCapture(model, layers, encs[0].suffix_len) as cap, torch.inference_mode():
        got = cap.run(ids, mask)
    for i, text in enumerate(texts):
        ref, _ = reference_hidden(model, tokenizer, text)
        for layer in layers:
            torch.testing.assert_close(got[layer][i], ref[layer], atol=1e-4, rtol=1e-4)
