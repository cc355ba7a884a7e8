"""GCG-transfer split over SLURM jobs (attacks.gcg.jobs): chunks merge to one job's table."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from test_attacks import BEHAVIOURS

from rgeom.attacks import testcases as T
from rgeom.data import PROMPT_SCHEMA
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.stages.attack_merge import run as attack_merge

PARAMS = {"gcg": {"steps": 2, "search_width": 8, "topk": 8, "init_suffix": "! ! ! !"}}
MERGE_PARAMS = {"seed": 0, "attacks": {"gcg": PARAMS["gcg"]}}


@pytest.fixture()
def behaviours(tmp_path):
    path = tmp_path / "harmbench.parquet"
    write_table(path, pa.Table.from_pylist(BEHAVIOURS, schema=PROMPT_SCHEMA), PROMPT_SCHEMA, {})
    return path


def _build(tiny, behaviours, out, chunk=None):
    model, tok = tiny
    job = T.MethodJob(
        method="GCG-transfer",
        behaviours_path=str(behaviours),
        out=str(out),
        params=PARAMS,
        seed=0,
        source_model="results/model/base",
        meta={"stage": "test"},
        chunk=chunk,
    )
    return T.build_method(job, model=model, tokenizer=tok)


def _chunks(tiny, behaviours, tmp_path, n):
    parts = [tmp_path / f"chunk-{k}.parquet" for k in range(n)]
    for k, part in enumerate(parts):
        _build(tiny, behaviours, part, chunk=(k, n))
    return [str(p) for p in parts]


def test_chunks_merge_to_the_unchunked_table(tiny, behaviours, tmp_path):
    whole = _build(tiny, behaviours, tmp_path / "whole.parquet").to_pylist()
    parts = _chunks(tiny, behaviours, tmp_path, 4)
    # Round-robin: chunk k holds every 4th behaviour from the k-th (6 harmful: 2, 2, 1, 1).
    sizes = [read_table(p).num_rows for p in parts]
    assert sizes == [2, 2, 1, 1]
    assert read_table(parts[0]).column("behavior_id").to_pylist() == ["b0", "b4"]
    out = tmp_path / "merged.parquet"
    attack_merge("GCG-transfer", list(reversed(parts)), str(behaviours), str(out), MERGE_PARAMS)
    assert read_table(out).to_pylist() == whole
    meta = read_meta(out)
    assert meta["method"] == "GCG-transfer" and "chunk" not in meta and len(meta["parts"]) == 4


def test_more_jobs_than_behaviours_leaves_empty_chunks(tiny, behaviours, tmp_path):
    parts = _chunks(tiny, behaviours, tmp_path, 8)
    assert [read_table(p).num_rows for p in parts] == [1] * 6 + [0, 0]
    out = tmp_path / "merged.parquet"
    attack_merge("GCG-transfer", parts, str(behaviours), str(out), MERGE_PARAMS)
    assert read_table(out).num_rows == 6


def test_an_incomplete_or_doubled_set_of_chunks_is_one_error(tiny, behaviours, tmp_path):
    parts = _chunks(tiny, behaviours, tmp_path, 3)
    out = str(tmp_path / "merged.parquet")
    with pytest.raises(RgeomError, match=r"chunks \[0, 2\] of \[3\] are not one complete set"):
        attack_merge("GCG-transfer", [parts[0], parts[2]], str(behaviours), out, MERGE_PARAMS)
    with pytest.raises(RgeomError, match="chunk 1 of 3 is also"):
        attack_merge("GCG-transfer", [*parts, parts[1]], str(behaviours), out, MERGE_PARAMS)
    with pytest.raises(RgeomError, match="not a AutoDAN chunk"):
        attack_merge("AutoDAN", parts, str(behaviours), out, MERGE_PARAMS)


def test_only_gcg_transfer_is_chunked(behaviours, tmp_path):
    with pytest.raises(RgeomError, match="not split into chunks"):
        T.build_method(
            T.MethodJob(
                method="DirectRequest",
                behaviours_path=str(behaviours),
                out=str(tmp_path / "dr.parquet"),
                params={},
                seed=0,
                source_model="m",
                meta={},
                chunk=(0, 2),
            )
        )


# --- the candidate batch is bounded by the expanded cache's size ---------------------------


def test_cache_bound_at_mistral_7b_shapes_for_a_contextual_prompt():
    # 32 layers x 8 KV heads x 128 dims in bf16, a 1,000-token contextual prompt: all 512
    # candidates would expand ~62 GiB of cache; the bound keeps a pass to 126 of them.
    from rgeom.attacks import gcg as G

    kv = [
        (torch.empty(1, 8, 1000, 128, dtype=torch.bfloat16, device="meta"),) * 2 for _ in range(32)
    ]
    per_row = 32 * 2 * 8 * 128 * 2 * 1040
    assert 512 * per_row / 2**30 == pytest.approx(65, abs=1)
    assert G.cache_bounded_batch(kv, 40, 512, None) == 126
    assert G.cache_bounded_batch(kv, 40, 512, 64) == 64  # a smaller batch_size stands
    short = [(torch.empty(1, 8, 100, 128, dtype=torch.bfloat16, device="meta"),) * 2] * 32
    assert G.cache_bounded_batch(short, 40, 512, None) is None  # fits: one pass, as before


def test_bounded_passes_give_the_same_losses(tiny, monkeypatch):
    from rgeom.attacks import gcg as G

    model, tok = tiny
    parts = G.split_prompt(tok, "Tell me how to kill a Python process", "Sure, here it is")
    post, target = torch.tensor(parts.post), torch.tensor(parts.target)
    kv = G._prefix_kv(model, torch.tensor(parts.prefix))
    allowed = G.ascii_token_ids(tok, model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    cands = allowed[torch.randint(0, allowed.numel(), (20, 6), generator=gen)]
    full = G.candidate_losses(model, kv, cands, post, target)
    sizes = []
    expand = G._expand_cache
    monkeypatch.setattr(G, "_expand_cache", lambda m, k, b: sizes.append(b) or expand(m, k, b))
    per_token = sum(k.numel() * k.element_size() * 2 for k, _ in kv) / kv[0][0].shape[2]
    row = per_token * (kv[0][0].shape[2] + 6 + post.numel() + target.numel())
    batching = G.Batching(max_cache_bytes=int(row * 6))
    bounded = G.candidate_losses(model, kv, cands, post, target, batching=batching)
    assert max(sizes) == 6 and sum(sizes) == 20
    assert torch.allclose(bounded, full, atol=1e-5, rtol=0)
