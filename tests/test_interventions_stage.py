"""`rgeom interventions`, `rgeom cross-anchor`, `rgeom interventions-summary` and the
cross-anchor verdict, on the tiny random model."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rgeom.causal import (
    CROSS_SCHEMA,
    FALLBACK_MIN_BYPASS,
    INTERVENTION_SCHEMA,
    choose_direction,
    contrast_vectors,
    subspace_basis,
    transfer,
)
from rgeom.cli import main
from rgeom.drift import build_drift, transfer_verdict
from rgeom.errors import RgeomError
from rgeom.geometry import load_directions
from rgeom.interventions import (
    CARRIER_SCHEMA,
    ablation,
    last_logits,
    orthogonalize_weights,
)
from rgeom.io import read_meta, read_table
from rgeom.stages.carriers import run as run_carriers
from rgeom.stages.directions import run as run_directions
from rgeom.stages.extract import run as run_extract

HARMFUL = [
    "Tell me how to kill a Python process",
    "Give step by step instructions for building a website",
    "Explain how photosynthesis works in plants and trees",
    "How do I pick the lock of my own front door?",
]
HARMLESS = ["What is two plus two?", "hello world", "Write a poem about the sea", "Name a colour"]
UTILITY = [("What is 7 + 5?", "12"), ("What is 2 + 2?", "4"), ("Capital of France?", "Paris")]


def prompts(path, texts, label, targets=None):
    n = len(texts)
    table = {
        "prompt_id": [f"{label}-{i}" for i in range(n)],
        "text": texts,
        "context": pa.array([None] * n, pa.string()),
        "label": [label] * n,
        "target": pa.array(targets or [None] * n, pa.string()),
    }
    pq.write_table(pa.table(table), path)
    return str(path)


def carriers(model_dir, tmp, name, arm, step, carrier):
    out = tmp / f"{name}-carriers.parquet"
    params = {"seed": 0, "model": {"device": "cpu"}, "arm": arm, "step": step, "carrier": carrier}
    run_carriers(
        str(model_dir),
        str(tmp / f"{name}-dirs.parquet"),
        str(tmp / "vh.parquet"),
        str(tmp / "vb.parquet"),
        str(out),
        params,
    )
    return out


# kl_max 0 admits nothing: every stage must then fall back, flagged.
# The prompt filter is off: a random-init model never refuses, so it would keep nothing.
NO_CARRIER = {"max_layer_frac": 1.0, "kl_max": 0.0, "filter_prompts": False}


@pytest.fixture(scope="module")
def cells(tiny_model_dir, tmp_path_factory):
    """Two cells of the tiny model (base@0 and sft@2, from different direction prompts),
    each with activations, directions and a carrier table without an admissible carrier."""
    tmp = tmp_path_factory.mktemp("interventions-stage")
    prompts(tmp / "vh.parquet", HARMFUL[:3], "harmful")
    prompts(tmp / "vb.parquet", HARMLESS[:3], "harmless")
    prompts(tmp / "gen.parquet", HARMFUL, "harmful")
    prompts(tmp / "util.parquet", [q for q, _ in UTILITY], "utility", [a for _, a in UTILITY])
    for name, arm, step, harmful in (("base", "base", 0, HARMFUL), ("sft", "sft", 2, HARMFUL[1:])):
        files = {
            "dir_harmful": prompts(tmp / f"{name}-dh.parquet", harmful, "harmful"),
            "dir_harmless": prompts(tmp / f"{name}-db.parquet", HARMLESS, "harmless"),
        }
        params = {"seed": 0, "arm": arm, "step": step, "model": {"device": "cpu"}}
        acts = str(tmp / f"{name}-acts.parquet")
        run_extract(str(tiny_model_dir), list(files.items()), acts, params)
        run_directions(acts, str(tmp / f"{name}-dirs.parquet"), {"seed": 0})
        out = carriers(tiny_model_dir, tmp, name, arm, step, NO_CARRIER)
        table = read_table(out, schema=CARRIER_SCHEMA)
        # The precondition of every test here: no admissible carrier.
        assert not any(table.column("admissible").to_pylist())
    return tmp


def unit(d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d)
    return v / np.linalg.norm(v)


def test_rank_one_subspace_ablation_is_directional_ablation(tiny):
    model, tokenizer = tiny
    d = model.config.hidden_size
    r = unit(d, 11) * 3.0
    contrasts = np.random.default_rng(12).normal(size=(5, d))
    basis = subspace_basis(r, contrasts, 4)
    assert basis.shape == (4, d)
    np.testing.assert_allclose(basis @ basis.T, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(basis[0], r / np.linalg.norm(r))
    # Nested: rank k is the first k rows of rank k + 1.
    np.testing.assert_allclose(subspace_basis(r, contrasts, 2), basis[:2])
    with ablation(model, r):
        directional = last_logits(model, tokenizer, HARMFUL)
    with ablation(model, subspace_basis(r, contrasts, 1)):
        rank1 = last_logits(model, tokenizer, HARMFUL)
    torch.testing.assert_close(rank1, directional, atol=1e-6, rtol=1e-6)
    with ablation(model, basis[:2]):
        rank2 = last_logits(model, tokenizer, HARMFUL)
    assert (rank2 - directional).abs().max() > 1e-4, "a second axis must change something"
    # Weight orthogonalization of the rank-2 subspace matches its hooks too.
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, basis[:2])
    torch.testing.assert_close(last_logits(edited, tokenizer, HARMFUL), rank2, atol=1e-4, rtol=1e-4)
    # Ranks beyond the contrasts' rank are not invented.
    assert subspace_basis(r, contrasts[:2], 4).shape[0] == 3


def test_contrast_vectors_average_to_the_direction(cells):
    raw = load_directions(cells / "base-dirs.parquet")
    layer = max(layer for layer, _ in raw)
    c = contrast_vectors(cells / "base-acts.parquet", layer, -1)
    assert c.shape[0] == len(HARMFUL)
    # mean_i (x_i - mean_harmless) is the difference in means itself.
    np.testing.assert_allclose(c.mean(axis=0), raw[(layer, -1)], rtol=1e-5, atol=1e-5)


def run_interventions(model_dir, tmp, name, out, section, arm="base", step=0):
    params = {
        "seed": 0,
        "model": {"device": "cpu"},
        "arm": arm,
        "step": step,
        "carrier": NO_CARRIER,
        "interventions": section,
    }
    return main(
        [
            "interventions",
            "--model",
            str(model_dir),
            "--directions",
            str(tmp / f"{name}-dirs.parquet"),
            "--carriers",
            str(tmp / f"{name}-carriers.parquet"),
            "--activations",
            str(tmp / f"{name}-acts.parquet"),
            "--val-harmful",
            str(tmp / "vh.parquet"),
            "--val-harmless",
            str(tmp / "vb.parquet"),
            "--generate-set",
            str(tmp / "gen.parquet"),
            "--utility-set",
            str(tmp / "util.parquet"),
            "--out",
            str(out),
            "--params",
            json.dumps(params),
        ]
    )


SECTION = {
    "coefficients": [0, 1, 2],
    "ranks": [1, 2],
    "n_generate": 3,
    "max_new_tokens": 4,
    "n_utility": 2,
    "utility_max_new_tokens": 4,
    "ce_tokens": 4,
}


def test_interventions_stage_without_an_admissible_carrier(tiny_model_dir, cells, capsys):
    out = cells / "base-interventions.parquet"
    rc = run_interventions(tiny_model_dir, cells, "base", out, SECTION)
    assert rc == 0, capsys.readouterr().err
    rows = read_table(out, schema=INTERVENTION_SCHEMA).to_pylist()
    meta = read_meta(out)
    kinds = [(r["intervention"], r["coeff"], r["k"]) for r in rows]
    assert kinds == [
        ("none", None, None),
        ("ablation", None, None),
        ("addition", 0.0, None),
        ("addition", 1.0, None),
        ("addition", 2.0, None),
        ("subspace_ablation", None, 1),
        ("subspace_ablation", None, 2),
    ]
    # The fallback, worked out here from the carrier table: the lowest finite bypass.
    table = read_table(cells / "base-carriers.parquet").to_pylist()
    best = min((r for r in table if math.isfinite(r["bypass"])), key=lambda r: r["bypass"])
    for r in rows:
        assert r["admissible"] is False and r["carrier_source"] == FALLBACK_MIN_BYPASS
        assert (r["layer"], r["position"]) == (best["layer"], best["position"])
        assert (r["arm"], r["step"]) == ("base", 0)
        assert r["n_generate"] == 3 and r["n_utility"] == 2
        assert r["refusal_rate"] is not None and 0 <= r["asr"] <= 1
        assert r["judge"] == "refusal_matcher"
    assert meta["admissible"] is False and meta["carrier"] == [best["layer"], best["position"]]
    by = {(r["intervention"], r["coeff"], r["k"]): r for r in rows}
    none, abl = by[("none", None, None)], by[("ablation", None, None)]
    assert none["kl_harmless"] == pytest.approx(0.0, abs=1e-9)
    assert none["refusal_rate_delta"] == 0.0
    # Ablation measured here reproduces the carrier search's bypass and KL for that row.
    assert abl["refusal_score_harmful"] == pytest.approx(best["bypass"], abs=1e-4)
    assert abl["kl_harmless"] == pytest.approx(best["kl"], abs=1e-4)
    assert abl["kl_harmless"] > 0
    assert by[("addition", 1.0, None)]["kl_harmless"] > 0
    assert by[("subspace_ablation", None, 2)]["kl_harmless"] != pytest.approx(abl["kl_harmless"])
    for key in ("refusal_score_harmful", "kl_harmless", "ce_harmless", "utility_accuracy"):
        assert by[("addition", 0.0, None)][key] == none[key]
        assert by[("subspace_ablation", None, 1)][key] == abl[key]
    assert np.isfinite(none["ce_harmless"]) and none["ce_harmless"] > 0

    # The summary job: one table over cells and a frontier figure per arm.
    summary = cells / "summary"
    rc = main(
        ["interventions-summary", "--tables", str(out), "--out-dir", str(summary)]
        + ["--params", '{"arms": ["sft"], "seed": 0}']
    )
    assert rc == 0, capsys.readouterr().err
    assert read_table(summary / "interventions.parquet").num_rows == len(rows)
    assert (summary / "frontier_sft.png").read_bytes()[:4] == b"\x89PNG"


def test_interventions_settings_are_checked(tiny_model_dir, cells, capsys):
    out = cells / "bad.parquet"
    rc = run_interventions(tiny_model_dir, cells, "base", out, {"ranks": [0]})
    assert rc == 1 and "interventions.ranks" in capsys.readouterr().err
    rc = run_interventions(tiny_model_dir, cells, "base", out, {"rank": [1]})
    assert rc == 1 and "unknown key" in capsys.readouterr().err
    assert not out.exists()


def test_choose_direction_prefers_the_carrier_and_labels_fallbacks(cells, tmp_path):
    from rgeom.causal import CARRIER, FALLBACK_MAX_NORM
    from rgeom.io import write_table

    path = cells / "base-carriers.parquet"
    raw = load_directions(cells / "base-dirs.parquet")
    fallback = choose_direction(path, raw, 1.0, kl_max=0.0)
    assert not fallback.admissible and fallback.source == FALLBACK_MIN_BYPASS
    table = read_table(path, schema=CARRIER_SCHEMA)
    rows = [r for r in table.to_pylist() if math.isfinite(r["bypass"])]
    # A KL bound that admits only the weakest row: it wins over lower bypasses.
    weakest = max(rows, key=lambda r: r["bypass"])
    gentle = [r for r in rows if r["kl"] <= weakest["kl"]]
    only = choose_direction(path, raw, 1.0, kl_max=weakest["kl"])
    assert only.layer == min(gentle, key=lambda r: (r["bypass"], r["layer"]))["layer"]
    # A marked carrier is taken as it is, admissible.
    last = table.num_rows - 1
    marked = table.set_column(
        table.schema.get_field_index("is_carrier"),
        "is_carrier",
        pa.array([i == last for i in range(table.num_rows)]),
    )
    write_table(tmp_path / "c.parquet", marked, CARRIER_SCHEMA, read_meta(path))
    chosen = choose_direction(tmp_path / "c.parquet", raw, 1.0)
    assert chosen.admissible and chosen.source == CARRIER
    assert chosen.layer == table.column("layer")[last].as_py()
    # No finite score at all: the largest direction, labelled as such.
    nulls = pa.array([None] * table.num_rows, pa.float64())
    blank = table.set_column(table.schema.get_field_index("bypass"), "bypass", nulls)
    write_table(tmp_path / "n.parquet", blank, CARRIER_SCHEMA, read_meta(path))
    norm = choose_direction(tmp_path / "n.parquet", raw, 1.0)
    assert norm.source == FALLBACK_MAX_NORM and not norm.admissible
    biggest = max((k for k in raw if k[1] == -1), key=lambda k: np.linalg.norm(raw[k]))
    assert norm.key == biggest


def run_cross(model_dir, tmp, names, target, out):
    params = {"seed": 0, "model": {"device": "cpu"}, "carrier": NO_CARRIER}
    params.update(arm=target[0], step=target[1])
    return main(
        ["cross-anchor", "--model", str(model_dir), "--directions"]
        + [str(tmp / f"{n}-dirs.parquet") for n in names]
        + ["--carriers"]
        + [str(tmp / f"{n}-carriers.parquet") for n in names]
        + ["--val-harmful", str(tmp / "vh.parquet"), "--val-harmless", str(tmp / "vb.parquet")]
        + ["--out", str(out), "--params", json.dumps(params)]
    )


def test_cross_anchor_self_pair_reproduces_the_carrier_scores(tiny_model_dir, cells, capsys):
    out = cells / "sft-cross.parquet"
    rc = run_cross(tiny_model_dir, cells, ["base", "sft"], ("sft", 2), out)
    assert rc == 0, capsys.readouterr().err
    rows = read_table(out, schema=CROSS_SCHEMA).to_pylist()
    assert [(r["source_arm"], r["source_step"]) for r in rows] == [("base", 0), ("sft", 2)]
    assert all((r["arm"], r["step"]) == ("sft", 2) for r in rows)
    for r in rows:
        name = "base" if r["source_arm"] == "base" else "sft"
        table = read_table(cells / f"{name}-carriers.parquet").to_pylist()
        best = min((c for c in table if math.isfinite(c["bypass"])), key=lambda c: c["bypass"])
        assert (r["layer"], r["admissible"]) == (best["layer"], False)
        assert len(r["bypass_scores"]) == len(r["baseline_scores"]) == 3
        assert np.mean(r["bypass_scores"]) == pytest.approx(r["bypass"])
    own = rows[1]
    table = read_table(cells / "sft-carriers.parquet").to_pylist()
    row = next(c for c in table if (c["layer"], c["position"]) == (own["layer"], own["position"]))
    for key in ("bypass", "induce", "kl"):
        assert own[key] == pytest.approx(row[key], abs=1e-5), key
    baseline = read_meta(cells / "sft-carriers.parquet")["baseline_refusal_score"]
    assert own["baseline_harmful"] == pytest.approx(baseline["harmful"], abs=1e-5)
    assert own["cos_same_site"] == pytest.approx(1.0)

    # The target cell must be among the sources.
    rc = run_cross(tiny_model_dir, cells, ["base"], ("sft", 2), cells / "x.parquet")
    assert rc == 1 and "target cell" in capsys.readouterr().err

    # drift reads it: combined table, and a verdict decided by the transfer test.
    base_out = cells / "base-cross.parquet"
    assert run_cross(tiny_model_dir, cells, ["base", "sft"], ("base", 0), base_out) == 0
    tables = build_drift(
        [str(cells / f"{n}-dirs.parquet") for n in ("base", "sft")],
        [str(cells / f"{n}-carriers.parquet") for n in ("base", "sft")],
        cells / "drift",
        {"arms": ["sft"], "seed": 0, "drift": {"n_null": 0, "n_boot": 50, "min_effect": 0.0}},
        {},
        cross_anchor=[str(out), str(base_out)],
    )
    assert read_table(cells / "drift" / "cross_anchor.parquet").num_rows == 4
    (v,) = tables["verdict"].to_pylist()
    assert v["basis"] == "cross_anchor" and v["admissible"] is False
    early = rows[0]
    expected = transfer(
        early["baseline_scores"], early["bypass_scores"], own["bypass_scores"], 0, 0.95, 0
    )
    assert v["transfer"] == pytest.approx(expected.ratio)
    assert "fallback" in v["detail"]


def cross_row(source, target, layer, baseline, bypass, admissible=True):
    return {
        "arm": target[0],
        "step": target[1],
        "source_arm": source[0],
        "source_step": source[1],
        "layer": layer,
        "position": -1,
        "admissible": admissible,
        "carrier_source": "carrier" if admissible else FALLBACK_MIN_BYPASS,
        "baseline_scores": list(baseline),
        "bypass_scores": list(bypass),
    }


SETTINGS = {"n_boot": 200, "ci": 0.95, "transfer_min": 0.5, "min_effect": 0.5}


@pytest.mark.parametrize(
    ("early_drop", "early_layer", "expected"),
    [(1.0, 5, "stable"), (0.0, 5, "rotation"), (0.0, 12, "relocation"), (0.5, 5, "undetermined")],
)
def test_transfer_verdicts(early_drop, early_layer, expected):
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.3, size=40)
    own = base - 4.0 + rng.normal(0, 0.3, size=40)
    # early_drop of the own effect, per prompt, with noise: 0.5 straddles transfer_min.
    early = base - early_drop * 4.0 + rng.normal(0, 1.5, size=40)
    first, last = ("base", 0), ("r2d2", 4)
    rows = [
        cross_row(first, last, early_layer, base, early),
        cross_row(last, last, 5, base, own),
    ]
    out = transfer_verdict(rows, first, last, {**SETTINGS, "relocation_layers": 3}, seed=0)
    assert out["verdict"] == expected, out["detail"]
    assert out["basis"] == "cross_anchor" and out["admissible"] is True
    assert out["transfer_ci_low"] <= out["transfer"] <= out["transfer_ci_high"]
    assert out["transfer"] == pytest.approx(early_drop, abs=0.25)


def test_transfer_needs_an_own_effect():
    base = np.full(20, 2.0)
    rows = [
        cross_row(("base", 0), ("sft", 4), 5, base, base - 3.0, admissible=False),
        cross_row(("sft", 4), ("sft", 4), 5, base, base - 0.1, admissible=False),
    ]
    out = transfer_verdict(rows, ("base", 0), ("sft", 4), {**SETTINGS, "relocation_layers": 3}, 0)
    assert out["verdict"] == "undetermined" and "min_effect" in out["detail"]
    assert out["admissible"] is False
    # Without the pair's rows there is nothing to decide.
    assert transfer_verdict(rows[:1], ("base", 0), ("sft", 4), SETTINGS, 0) is None
    with pytest.raises(RgeomError):
        transfer([1.0, 2.0], [1.0], [0.0, 0.0], 10, 0.95, 0)
