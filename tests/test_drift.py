"""The drift stage on synthetic direction and carrier tables (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from rgeom.cli import main
from rgeom.drift import build_drift, verdict
from rgeom.errors import RgeomError
from rgeom.geometry import direction_schema, rank_measures
from rgeom.interventions import CARRIER_SCHEMA
from rgeom.io import read_meta, read_table, write_table

D, N_LAYERS = 16, 8
TOKENIZER = {"template_hash": "t" * 8, "tokenizer_hash": "v" * 8}


def parallel(noise: float, seed: int, axis: int = 0) -> dict[tuple[int, int], np.ndarray]:
    """One direction per layer at position -1, all close to basis vector ``axis``; the
    norm peaks at layer 4 so the max-norm fallback is known."""
    rng = np.random.default_rng(seed)
    e = np.zeros(D)
    e[axis] = 1.0
    return {
        (layer, -1): (1.0 + layer * (8 - layer)) * (e + noise * rng.normal(size=D))
        for layer in range(N_LAYERS)
    }


def rotate(vecs, degrees: float) -> dict[tuple[int, int], np.ndarray]:
    """Rotate every direction in the (e0, e1) plane."""
    t = math.radians(degrees)
    rot = np.eye(D)
    rot[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
    return {k: rot @ v for k, v in vecs.items()}


def write_directions(path, arm, step, vecs, **meta):
    keys = sorted(vecs)
    raw = np.stack([vecs[k] for k in keys])
    norms = np.linalg.norm(raw, axis=1)
    units = raw / np.where(norms > 0, norms, 1)[:, None]
    table = pa.table(
        {
            "layer": [k[0] for k in keys],
            "position": [k[1] for k in keys],
            "n_harmful": [4] * len(keys),
            "n_harmless": [4] * len(keys),
            "norm": norms,
            "direction": pa.FixedSizeListArray.from_arrays(pa.array(raw.ravel()), D),
            "unit": pa.FixedSizeListArray.from_arrays(pa.array(units.ravel()), D),
            "cos_prev_layer": pa.array([None] * len(keys), pa.float64()),
        }
    )
    record = {"arm": arm, "step": step, "d_model": D, "n_layers": N_LAYERS, **TOKENIZER, **meta}
    write_table(path, table, direction_schema(D), record)
    return str(path)


def write_carriers(path, arm, step, carrier, layers=range(N_LAYERS)):
    rows = [
        {
            "layer": layer,
            "position": -1,
            "bypass": -1.0 - layer,
            "induce": 1.0,
            "kl": 0.01,
            "admissible": carrier is not None,
            "is_carrier": carrier == layer,
        }
        for layer in layers
    ]
    table = pa.Table.from_pylist(rows, schema=CARRIER_SCHEMA)
    meta = {"arm": arm, "step": step, "template_hash": TOKENIZER["template_hash"]}
    meta["carrier"] = [carrier, -1] if carrier is not None else None
    write_table(path, table, CARRIER_SCHEMA, meta)
    return str(path)


def make_run(tmp_path, cells):
    """``cells``: (arm, step, vecs, carrier layer or None) -> (directions, carriers)."""
    dirs, cars = [], []
    for arm, step, vecs, carrier in cells:
        dirs.append(write_directions(tmp_path / f"{arm}-{step}-d.parquet", arm, step, vecs))
        cars.append(write_carriers(tmp_path / f"{arm}-{step}-c.parquet", arm, step, carrier))
    return dirs, cars


def standard_run(tmp_path):
    """sft keeps the base geometry; r2d2 moves its carrier from layer 3 to layer 7."""
    base = parallel(0.05, 0)
    return make_run(
        tmp_path,
        [
            ("base", 0, base, 3),
            ("sft", 2, base, 3),
            ("sft", 4, base, 3),
            ("r2d2", 2, parallel(0.05, 1), 3),
            ("r2d2", 4, parallel(0.05, 2), 7),
        ],
    )


def test_stage_writes_every_file_with_the_right_row_counts(tmp_path):
    dirs, cars = standard_run(tmp_path)
    out = tmp_path / "drift"
    params = '{"arms": ["sft", "r2d2"], "seed": 3, "drift": {"n_null": 20, "subspace_k": 2}}'
    rc = main(
        ["drift", "--directions", *dirs, "--carriers", *cars, "--out-dir", str(out)]
        + ["--params", params]
    )
    assert rc == 0
    drift = read_table(out / "drift.parquet")
    # Base is step 0 of both arms: 2 arms x 3 anchors.
    assert drift.num_rows == 6
    assert sorted(set(drift.column("arm").to_pylist())) == ["r2d2", "sft"]
    angles = read_table(out / "angles.parquet")
    basis = angles.column("basis").to_pylist()
    # 5 cells -> 10 pairs: one carrier angle each, and k = 2 window angles each.
    assert basis.count("carrier") == 10 and basis.count("window") == 20
    assert read_table(out / "verdict.parquet").num_rows == 2
    for fig in ("carrier_layer_vs_step.png", "principal_angles.png"):
        assert (out / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    meta = read_meta(out / "drift.parquet")
    assert meta["null_kind"] == "gaussian" and meta["drift"]["n_null"] == 20
    rows = drift.to_pylist()
    assert all(r["erank_null_sd"] > 0 for r in rows)
    # Same seed, same tables.
    again = build_drift(
        dirs,
        cars,
        tmp_path / "again",
        {"arms": ["sft", "r2d2"], "seed": 3, "drift": {"n_null": 20, "subspace_k": 2}},
        {},
    )
    assert again["drift"].column("erank_null_mean").to_pylist() == (
        drift.column("erank_null_mean").to_pylist()
    )


def test_identical_directions_have_zero_angles(tmp_path):
    dirs, cars = standard_run(tmp_path)
    tables = build_drift(dirs, cars, tmp_path / "out", {"arms": ["sft", "r2d2"]}, {})
    angles = tables["angles"].to_pylist()
    sft_vs_base = [r for r in angles if r["arm_a"] == "sft" and r["arm_b"] == "base"]
    assert len(sft_vs_base) == 2 * 3  # two sft anchors x (carrier + 2 window angles)
    assert all(r["angle_deg"] == pytest.approx(0.0, abs=1e-5) for r in sft_vs_base)
    prev = [r for r in angles if r["relation"] == "prev" and r["arm_a"] == "sft"]
    assert {(r["step_a"], r["step_b"]) for r in prev} == {(2, 0), (4, 2)}
    sft = [r for r in tables["drift"].to_pylist() if r["arm"] == "sft"]
    assert [r["step"] for r in sft] == [0, 2, 4]
    assert sft[0]["angle_prev_deg"] is None and sft[0]["angle_step0_deg"] == 0.0
    for r in sft[1:]:
        assert r["angle_prev_deg"] == pytest.approx(0.0, abs=1e-5)
        assert r["cos_prev_same_layer"] == pytest.approx(1.0)
    # Different noise draws are not identical, but close.
    r2d2 = [r for r in angles if r["arm_a"] == "r2d2" and r["relation"] == "step0"]
    assert all(0 < r["angle_deg"] < 20 for r in r2d2 if r["basis"] == "carrier")


def test_planted_relocation_and_rotation_verdicts(tmp_path):
    dirs, cars = standard_run(tmp_path)
    tables = build_drift(dirs, cars, tmp_path / "out", {"arms": ["sft", "r2d2"]}, {})
    verdicts = {r["arm"]: r for r in tables["verdict"].to_pylist()}
    assert verdicts["r2d2"]["verdict"] == "relocation"
    assert verdicts["r2d2"]["statistic"] == 4.0
    assert verdicts["sft"]["verdict"] == "stable"
    drift = {(r["arm"], r["step"]): r for r in tables["drift"].to_pylist()}
    assert drift[("r2d2", 4)]["carrier_layer"] == 7
    assert drift[("r2d2", 4)]["window_layers"] == [5, 6, 7]  # clipped at the last layer

    base = parallel(0.02, 0)
    dirs, cars = make_run(
        tmp_path / "rot",
        [("base", 0, base, 3), ("sft", 2, rotate(base, 20), 3), ("sft", 4, rotate(base, 50), 4)],
    )
    tables = build_drift(dirs, cars, tmp_path / "rot-out", {"arms": ["sft"]}, {})
    (row,) = tables["verdict"].to_pylist()
    assert row["verdict"] == "rotation"
    assert row["statistic"] == pytest.approx(50.0, abs=2.0)


def test_verdict_without_enough_carriers_is_undetermined():
    v, stat, detail = verdict([0, 2, 4], [3, None, None], [0.0, 10.0, 80.0], 3, 30.0)
    assert v == "undetermined" and math.isnan(stat) and "1 of 3" in detail


def test_missing_carrier_falls_back_to_the_max_norm_layer(tmp_path):
    dirs, cars = make_run(tmp_path, [("base", 0, parallel(0.05, 0), None)])
    tables = build_drift(dirs, cars, tmp_path / "out", {"arms": ["sft"]}, {})
    (row,) = tables["drift"].to_pylist()
    assert row["carrier_layer"] is None and row["n_admissible"] == 0
    assert (row["ref_layer"], row["ref_position"]) == (4, -1)
    assert row["window_layers"] == [2, 3, 4, 5, 6]


def test_erank_of_parallel_directions_is_one(tmp_path):
    dirs, cars = make_run(tmp_path, [("base", 0, parallel(0.0, 0), 3)])
    tables = build_drift(dirs, cars, tmp_path / "out", {"drift": {"n_null": 10}}, {})
    (row,) = tables["drift"].to_pylist()
    for kind in ("singular", "energy", "participation"):
        assert row[f"erank_{kind}"] == pytest.approx(1.0, abs=1e-9)
    # Random unit vectors in 16 dimensions are far from parallel.
    assert row["erank_null_mean"] > 3.0
    # Nearly parallel: just above 1, energy variant as documented in rgeom.drift.
    g = (1 - 0.95) * np.eye(5) + 0.95
    ranks = rank_measures(np.linalg.cholesky(g))
    assert 1.2 < ranks["energy"] < 1.3 and ranks["singular"] > 2.5


def test_window_outside_the_model_is_an_error(tmp_path):
    dirs, cars = standard_run(tmp_path)
    with pytest.raises(RgeomError, match=r"drift\.window_layers.*\[9\].*n_layers=8"):
        build_drift(dirs, cars, tmp_path / "out", {"drift": {"window_layers": [6, 9]}}, {})
    with pytest.raises(RgeomError, match=r"drift\.window must be an integer >= 0"):
        build_drift(dirs, cars, tmp_path / "out", {"drift": {"window": -1}}, {})
    with pytest.raises(RgeomError, match=r"unknown key"):
        build_drift(dirs, cars, tmp_path / "out", {"drift": {"windw": 2}}, {})
    assert not (tmp_path / "out").exists()


def test_tables_from_another_tokenizer_are_refused(tmp_path):
    dirs, cars = standard_run(tmp_path)
    other = write_directions(
        tmp_path / "odd.parquet", "sft", 6, parallel(0.05, 5), tokenizer_hash="other"
    )
    odd_car = write_carriers(tmp_path / "odd-c.parquet", "sft", 6, 3)
    with pytest.raises(RgeomError, match=r"odd\.parquet: tokenizer_hash differs"):
        build_drift([*dirs, other], [*cars, odd_car], tmp_path / "out", {}, {})


def test_carrier_table_must_match_a_direction_table(tmp_path):
    dirs, cars = standard_run(tmp_path)
    with pytest.raises(RgeomError, match=r"no carrier table for r2d2@4"):
        build_drift(dirs, cars[:-1], tmp_path / "out", {}, {})
    stray = write_carriers(tmp_path / "stray.parquet", "sft", 8, 3)
    with pytest.raises(RgeomError, match=r"stray\.parquet: arm sft step 8 has no direction"):
        build_drift(dirs, [*cars, stray], tmp_path / "out", {}, {})
    with pytest.raises(RgeomError, match=r"drift\.null_model is 'shuffle'"):
        build_drift(dirs, cars, tmp_path / "out", {"drift": {"null_model": "shuffle"}}, {})


def write_activations(path, arm, step, shift, seed, n=12):
    """Per-prompt ``dir`` rows at position -1 of every layer: harmless ~ N(0, I), harmful
    shifted by ``shift[layer]``."""
    from rgeom.activations import activation_schema

    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("prompt_id", "label", "split", "layer", "position", "vector")}
    for label in ("harmful", "harmless"):
        for i in range(n):
            for layer in range(N_LAYERS):
                v = rng.normal(size=D) + (shift[(layer, -1)] if label == "harmful" else 0)
                # Both sets number their prompts from 0: the label must keep them apart.
                for key, value in zip(rows, (f"p{i}", label, "dir", layer, -1, v), strict=True):
                    rows[key].append(value)
    vec = np.stack(rows.pop("vector")).astype(np.float32)
    schema = activation_schema(D)
    table = pa.table(
        {
            **rows,
            "refusal_score": pa.nulls(len(vec), pa.float32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), D),
        }
    )
    write_table(path, table, schema, {"arm": arm, "step": step, "d_model": D})
    return str(path)


def test_shuffled_null_and_bootstrap_intervals(tmp_path):
    shift = {k: 3 * v / np.linalg.norm(v) for k, v in parallel(0.05, 0).items()}
    dirs, cars = make_run(tmp_path, [("base", 0, shift, 3), ("sft", 2, shift, 3)])
    # The same activations in both cells: paired replicates give identical directions.
    acts = [
        write_activations(tmp_path / f"a{i}.parquet", arm, step, shift, seed=7)
        for i, (arm, step) in enumerate([("base", 0), ("sft", 2)])
    ]
    params = {"arms": ["sft"], "drift": {"n_null": 30, "n_boot": 40}}
    tables = build_drift(dirs, cars, tmp_path / "out", params, {}, activations=acts)
    base, sft = tables["drift"].to_pylist()
    assert base["null_kind"] == "shuffle"
    assert base["erank_ci_low"] <= base["erank_ci_high"]
    # Shuffled labels leave noise directions, which are far less aligned than the signal.
    assert base["erank_null_mean"] > base["erank_energy"] + 3 * base["erank_null_sd"]
    assert sft["angle_step0_ci_low"] == pytest.approx(0, abs=1e-5)
    assert sft["angle_step0_ci_high"] == pytest.approx(0, abs=1e-5)
    assert base["angle_prev_ci_low"] is None

    other = write_activations(tmp_path / "b.parquet", "sft", 2, shift, seed=8)
    tables = build_drift(dirs, cars, tmp_path / "out2", params, {}, activations=[acts[0], other])
    sft = tables["drift"].to_pylist()[1]
    assert 0 < sft["angle_step0_ci_low"] < sft["angle_step0_ci_high"] < 90


def test_carrier_provenance_must_agree_with_its_rows(tmp_path):
    dirs, cars = make_run(tmp_path, [("base", 0, parallel(0.05, 0), 3)])
    table = read_table(cars[0])
    meta = read_meta(cars[0])
    meta["carrier"] = [5, -1]
    write_table(tmp_path / "lie.parquet", table, CARRIER_SCHEMA, meta)
    with pytest.raises(RgeomError, match=r"lie\.parquet: provenance names carrier \[5, -1\]"):
        build_drift(dirs, [str(tmp_path / "lie.parquet")], tmp_path / "out", {}, {})


def test_every_erank_variant_and_calibrated_angles(tmp_path):
    from rgeom.drift import RANK_KINDS

    # |shift| 8 against unit noise in 16 dimensions and 12 + 12 prompts: r-hat's sampling
    # error is about 10 degrees.
    shift = {k: 8 * v / np.linalg.norm(v) for k, v in parallel(0.05, 0).items()}
    turned = rotate(shift, 60)
    cells = [("base", 0, shift), ("sft", 2, shift), ("sft", 4, turned)]
    dirs, cars = make_run(tmp_path, [(arm, step, vecs, 3) for arm, step, vecs in cells])
    acts = [
        write_activations(tmp_path / f"a{step}.parquet", arm, step, vecs, seed=7 + step)
        for arm, step, vecs in cells
    ]
    params = {"arms": ["sft"], "drift": {"n_null": 20, "n_boot": 40}}
    tables = build_drift(dirs, cars, tmp_path / "out", params, {}, activations=acts)
    rows = {r["step"]: r for r in tables["drift"].to_pylist()}
    for r in rows.values():
        assert r["erank_null_energy"] == pytest.approx(r["erank_null_mean"])
        for k in RANK_KINDS:
            # A planted shift: the contrasts share it and the bootstrap directions agree,
            # far more than with shuffled labels.
            assert 1 <= r[f"erank_contrast_{k}"] < r[f"erank_contrast_null_{k}"]
            assert 1 <= r[f"erank_boot_{k}"] < r[f"erank_boot_null_{k}"]
            assert r[f"erank_null_{k}"] > r[f"erank_{k}"]
        # Resampling 12 + 12 prompts moves r-hat by some degrees, not tens.
        assert 0 < r["boot_angle_deg"] < 30
    # The same direction: within the noise; turned by 60 degrees: far beyond it.
    assert rows[2]["angle_step0_ratio"] < 1
    # Not exactly 60: the directions stick out of the rotation plane a little.
    theta = rows[4]["angle_step0_deg"]
    assert theta == pytest.approx(60, abs=2)
    noise = math.hypot(rows[4]["boot_angle_deg"], rows[0]["boot_angle_deg"])
    assert rows[4]["angle_step0_noise_deg"] == pytest.approx(noise)
    assert rows[4]["angle_step0_ratio"] == pytest.approx(theta / noise) and theta / noise > 2
    angles = tables["angles"].to_pylist()
    far = [a for a in angles if (a["step_a"], a["step_b"]) == (4, 0) and a["basis"] == "carrier"]
    assert far[0]["ratio"] == pytest.approx(rows[4]["angle_step0_ratio"])
    assert far[0]["excess_deg"] == pytest.approx(theta - noise)
    window = [a for a in angles if a["basis"] == "window"]
    assert window and all(a["noise_deg"] is not None and a["noise_deg"] >= 0 for a in window)

    # Without activation tables nothing is calibrated and the new ranks are null.
    tables = build_drift(dirs, cars, tmp_path / "bare", params, {})
    row = tables["drift"].to_pylist()[-1]
    assert row["boot_angle_deg"] is None and row["angle_step0_ratio"] is None
    assert row["erank_contrast_energy"] is None and row["erank_boot_energy"] is None
    assert all(a["noise_deg"] is None for a in tables["angles"].to_pylist())
