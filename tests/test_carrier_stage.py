"""`rgeom carriers` (and `rgeom drift` on its output) end to end on the tiny model."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgeom.cli import main
from rgeom.errors import RgeomError
from rgeom.geometry import load_directions
from rgeom.interventions import CARRIER_SCHEMA, select_candidates
from rgeom.io import read_meta, read_table, write_table
from rgeom.stages.carriers import run as carrier_search
from rgeom.stages.directions import run as run_directions
from rgeom.stages.extract import run as run_extract

HARMFUL = [
    "Tell me how to kill a Python process",
    "Give step by step instructions for building a website",
    "Explain how photosynthesis works in plants and trees",
]
HARMLESS = ["What is two plus two?", "hello world", "Write a poem about the sea"]


def prompts(path, texts, label):
    n = len(texts)
    table = {
        "prompt_id": [f"{label}-{i}" for i in range(n)],
        "text": texts,
        "context": pa.array([None] * n, pa.string()),
        "label": [label] * n,
    }
    pq.write_table(pa.table(table), path)
    return str(path)


@pytest.fixture(scope="module")
def cell(tiny_model_dir, tmp_path_factory):
    """Activations and directions of the tiny model as the workflow would write them."""
    tmp = tmp_path_factory.mktemp("carrier-stage")
    files = {
        "dir_harmful": prompts(tmp / "dh.parquet", HARMFUL, "harmful"),
        "dir_harmless": prompts(tmp / "db.parquet", HARMLESS, "harmless"),
        "val_harmful": prompts(tmp / "vh.parquet", HARMFUL[:2], "harmful"),
        "val_harmless": prompts(tmp / "vb.parquet", HARMLESS[:2], "harmless"),
    }
    params = {"seed": 0, "arm": "base", "step": 0, "model": {"device": "cpu"}}
    run_extract(str(tiny_model_dir), list(files.items()), str(tmp / "acts.parquet"), params)
    run_directions(str(tmp / "acts.parquet"), str(tmp / "dirs.parquet"), {"seed": 0})
    return tmp, files


def run_carriers(model_dir, tmp, files, out, carrier):
    # A random-init model never refuses, so Arditi's prompt filter (on by default) would
    # keep no harmful prompt; it is exercised in tests/test_interventions.py.
    carrier = {"filter_prompts": False, **carrier}
    params = {"seed": 0, "model": {"device": "cpu"}, "arm": "base", "step": 0, "carrier": carrier}
    return main(
        [
            "carriers",
            "--model",
            str(model_dir),
            "--directions",
            str(tmp / "dirs.parquet"),
            "--val-harmful",
            files["val_harmful"],
            "--val-harmless",
            files["val_harmless"],
            "--out",
            str(out),
            "--activations",
            str(tmp / "acts.parquet"),
            "--params",
            json.dumps(params),
        ]
    )


def test_carriers_stage_end_to_end(tiny_model_dir, cell, capsys):
    tmp, files = cell
    out = tmp / "carriers.parquet"
    start = time.perf_counter()
    rc = run_carriers(tiny_model_dir, tmp, files, out, {"max_layer_frac": 1.0, "kl_max": 10.0})
    elapsed = time.perf_counter() - start
    assert rc == 0, capsys.readouterr().err
    table = read_table(out, schema=CARRIER_SCHEMA)
    meta = read_meta(out)
    n_layers = read_meta(tmp / "dirs.parquet")["n_layers"]
    # Default candidates: every layer below the cut at every post-instruction position
    # (Arditi et al. search them all), not only the last one.
    positions = sorted({pos for _, pos in load_directions(tmp / "dirs.parquet")})
    assert len(positions) > 1 and positions[-1] == -1
    layers, at = table.column("layer").to_pylist(), table.column("position").to_pylist()
    got = list(zip(layers, at, strict=True))
    assert sorted(got) == [(layer, pos) for layer in range(n_layers) for pos in positions]
    assert meta["arm"] == "base" and meta["step"] == 0 and meta["config_hash"]
    assert meta["selection"]["positions"] == positions
    chosen = [r for r in table.to_pylist() if r["is_carrier"]]
    assert meta["carrier"] == ([chosen[0]["layer"], chosen[0]["position"]] if chosen else None)
    # Rank-k carriers beside rank 1, around the carrier or the lowest-bypass candidate.
    subs = {s["rank"]: s for s in meta["subspaces"]}
    assert sorted(subs) == [2, 3] and meta["selection"]["subspace_ranks"] == [2, 3]
    scored = [r for r in table.to_pylist() if r["bypass"] == r["bypass"]]
    low = min(scored, key=lambda r: (r["bypass"], r["layer"]))
    anchor = meta["carrier"] or [low["layer"], low["position"]]
    for sub in subs.values():
        assert [sub["layer"], sub["position"]] == anchor
        assert sub["kl"] >= 0 and sub["admissible"] == (sub["induce"] >= 0 and sub["kl"] <= 10)
    print(f"carriers stage on the tiny model: {elapsed:.2f} s")

    # The stride keeps only layers whose index is a multiple of it.
    strided = tmp / "strided.parquet"
    rc = run_carriers(
        tiny_model_dir,
        tmp,
        files,
        strided,
        {"max_layer_frac": 1.0, "layer_stride": 2, "positions": [-1], "subspace_ranks": []},
    )
    assert rc == 0
    assert read_table(strided).column("layer").to_pylist() == list(range(0, n_layers, 2))
    assert read_meta(strided)["subspaces"] == []

    # drift on this one cell: the activation table gives the label-shuffled null.
    drift_dir = tmp / "drift"
    rc = main(
        [
            "drift",
            "--directions",
            str(tmp / "dirs.parquet"),
            "--carriers",
            str(out),
            "--activations",
            str(tmp / "acts.parquet"),
            "--out-dir",
            str(drift_dir),
            "--params",
            '{"seed": 0, "drift": {"n_null": 8}}',
        ]
    )
    assert rc == 0, capsys.readouterr().err
    (row,) = read_table(drift_dir / "drift.parquet").to_pylist()
    assert row["null_kind"] == "shuffle"
    # Layer 0 sees the same template tokens for every prompt, so its difference vanishes in
    # every shuffle too (up to rounding, which must not count as a direction): only layer 1
    # is left in the window, observed and null alike.
    assert row["window_layers"] == [0, 1]
    assert row["erank_energy"] == pytest.approx(1.0)
    assert row["erank_null_mean"] == pytest.approx(1.0)
    assert row["erank_ci_low"] == pytest.approx(1.0)


def test_carrier_layers_outside_the_model_are_refused(tiny_model_dir, cell, capsys):
    tmp, files = cell
    out = tmp / "bad.parquet"
    rc = run_carriers(tiny_model_dir, tmp, files, out, {"layers": [0, 5]})
    assert rc == 1
    err = capsys.readouterr().err
    assert "carrier.layers" in err and "[5]" in err and "n_layers=2" in err
    assert not out.exists()
    rc = run_carriers(tiny_model_dir, tmp, files, out, {"positions": [-99]})
    assert rc == 1 and "position -99" in capsys.readouterr().err


def test_directions_from_another_tokenizer_are_refused(tiny_model_dir, cell):
    tmp, files = cell
    source = tmp / "dirs.parquet"
    meta = read_meta(source)
    meta["tokenizer_hash"] = "0" * 64
    table = pq.read_table(source)
    odd = tmp / "odd-dirs.parquet"
    write_table(odd, table, table.schema, meta)
    with pytest.raises(RgeomError, match=r"odd-dirs\.parquet: tokenizer_hash differs"):
        carrier_search(
            str(tiny_model_dir),
            str(odd),
            files["val_harmful"],
            files["val_harmless"],
            str(tmp / "never.parquet"),
            {"model": {"device": "cpu"}},
        )
    assert not (tmp / "never.parquet").exists()


def test_select_candidates_rules():
    dirs = {(layer, pos): [1.0] for layer in range(10) for pos in (-2, -1)}
    # null layers: below 0.8 * 10 and on the stride; null positions: all of them.
    keys = select_candidates(dirs, 10, {"layer_stride": 3})
    assert list(keys) == [(0, -2), (0, -1), (3, -2), (3, -1), (6, -2), (6, -1)]
    keys = select_candidates(dirs, 10, {"layer_stride": 3, "positions": [-1]})
    assert list(keys) == [(0, -1), (3, -1), (6, -1)]
    keys = select_candidates(dirs, 10, {"layers": [2, 9], "positions": [-2, -1]})
    assert list(keys) == [(2, -2), (2, -1), (9, -2), (9, -1)]
    with pytest.raises(RgeomError, match="layer_stride"):
        select_candidates(dirs, 10, {"layer_stride": 0})
    with pytest.raises(RgeomError, match="not negative"):
        select_candidates(dirs, 10, {"positions": [0]})
    with pytest.raises(RgeomError, match=r"\(5, -3\) is not in"):
        select_candidates({**dirs, (4, -3): [1.0]}, 10, {"layers": [4, 5], "positions": [-3]})


@pytest.mark.parametrize(("n_layers", "last"), [(30, 23), (32, 24)])
def test_layer_cut_is_arditis_int_of_80_percent(n_layers, last):
    """Arditi et al. prune layer >= int(0.8 * L): 24 of 30 and 25 of 32 go (layer < 0.8 * L
    would keep 25 of 32, exactly where a late-layer carrier would sit)."""
    from rgeom.interventions import layer_cut

    assert layer_cut(n_layers) == last + 1
    dirs = {(layer, -1): [1.0] for layer in range(n_layers)}
    keys = select_candidates(dirs, n_layers, {})
    assert max(layer for layer, _ in keys) == last
    assert len(keys) == last + 1
