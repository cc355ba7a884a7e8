"""How the refusal geometry moves across training anchors and between arms (issue #5).

Inputs are, per measured cell (arm, step), the direction table (``rgeom directions``), the
carrier table (``rgeom carriers``) and optionally the activation table, used for the
label-shuffled null. Step 0 is the base model, written once with arm ``base`` and treated as
step 0 of every arm.

Per cell the *reference* (layer, position) is the carrier found by the causal search, or,
where no candidate was admissible, the layer with the largest direction norm at position -1.
Around it sits a window of ``2 * window + 1`` adjacent layers (clipped to the captured
layers) whose unit directions are stacked for the effective rank and the top-k subspace.

Effective rank of the window stack
----------------------------------
Three variants come from :func:`rgeom.geometry.rank_measures`; all are 1 for parallel rows.
For ``n`` unit rows with pairwise cosine ``c`` the squared singular values are
``1 + (n - 1) c`` once and ``1 - c`` (n - 1 times), so for n = 5 and c = 0.95:

* ``energy`` (exp entropy of sigma^2 / sum sigma^2, i.e. of the explained-variance
  fractions) = 1.25,
* ``participation`` ((sum sigma^2)^2 / sum sigma^4) = 1.09,
* ``singular`` (Roy & Vetterli: exp entropy of sigma / sum sigma) = 2.73.

The "erank ~ 1.24, just above 1" reading of nearly parallel directions across adjacent
layers matches the ``energy`` variant (c ~ 0.95 over five layers): the noise directions
each carry a variance share of order (1 - c) / n, and sigma^2-entropy weighs them by that
share, so the value stays below 1.5 down to c = 0.9. ``singular`` weighs them by sigma, i.e. by
sqrt(1 - c), and inflates quickly (3.23 at c = 0.9, still 1.89 at c = 0.99);
``participation`` is the most forgiving (1.18 at c = 0.9). ``rank_kind`` (default
``energy``) picks the variant of ``erank_null_mean`` / ``_sd`` and the bootstrap interval;
all three observed values and all three shuffled-null means are written.

Two more stacks, each with all three variants and a label-shuffled null (activation tables
needed):

* ``erank_contrast_*``: the per-prompt contrast vectors at the reference, harmful x_i minus
  the harmless mean ([n_harmful, d]). Their mean is r, but each also carries its prompt's
  own deviation, so this measures how spread the prompts are around the shared direction;
  it grows with the prompt noise and the prompt count, not only with how many directions
  refusal uses. Null: the same with the labels permuted (group sizes kept).
* ``erank_boot_*``: the ``n_boot`` prompt-bootstrap replicates of the unit reference
  direction r-hat stacked ([n_boot, d]). It is the estimation noise of r-hat: it tends to 1
  as the prompt count grows, whatever the model does. Null: as many unit r-hats, each from
  a label permutation.

Neither is the paper's "~1.24": (2) is a property of the prompt set's spread, (3) of the
sample size. Only (1), the window stack with ``energy``, asks the paper's question ("how
many directions do adjacent layers use?") and gives ~1.24 for nearly parallel layers.

Angle calibration
-----------------
Each cell's bootstrap-noise angle (``boot_angle_deg``) is the ``ci`` quantile, over the prompt
bootstrap replicates, of the angle between a replicate's unit reference direction and the
full-sample one (per index of the top-k window basis likewise, for ``window`` angles). An
angle between cells a and b is calibrated against the pair's noise angle
sqrt(noise_a^2 + noise_b^2) (independent small estimation errors add in quadrature):
``ratio`` = angle / noise (> 1: more than resampling the prompts moves either direction)
and ``excess_deg`` = angle - noise, in ``angles.parquet`` for every principal angle and in
``drift.parquet`` for the prev / step0 angles.

Null baseline
-------------
``null_model: shuffle`` permutes the harmful/harmless labels of the per-prompt activations
(``split == "dir"``) and recomputes the window's difference-in-means directions, so the null
keeps the residual stream's own layer-to-layer correlation; only the label signal is gone.
``null_model: gaussian`` stacks i.i.d. Gaussian unit vectors of the same shape, whose erank is
close to the window size; it is the fallback when no activation tables are given.

Outputs
-------
``drift.parquet``: one row per (arm, step), the base row repeated as step 0 of each arm.
``angle_prev_deg`` / ``angle_step0_deg`` are principal angles (0..90, sign-blind) between
the reference directions; ``cos_prev_same_layer`` is the signed cosine at this cell's
reference (layer, position) against the previous anchor. ``*_ci_*`` are prompt-bootstrap
percentile intervals (paired across cells; null without activation tables).
``angles.parquet``: every pair of distinct cells (base once), ``basis`` carrier (k = 1) or
window (top-k), one row per principal angle. ``verdict.parquet``: one row per arm, see
:func:`verdict`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom.config import section_with_defaults, setting
from rgeom.drift_angles import AnchorLinks, angle_table, drift_rows
from rgeom.drift_cells import (
    BASE_ARM,
    SHARED_META,
    Cell,
    arms_of,
    place_window,
    read_cells,
    sequence,
)
from rgeom.drift_figures import draw_figures, plot_angle_matrix, plot_carrier_layers
from rgeom.drift_stats import RANK_KINDS, CellStats, calibrate, measure_cell
from rgeom.drift_verdict import arm_verdict, transfer_verdict, verdict
from rgeom.errors import RgeomError
from rgeom.io import write_table
from rgeom.plotstyle import figure_formats
from rgeom.schemas import ANGLES_SCHEMA, CROSS_SCHEMA, DRIFT_SCHEMA, VERDICT_SCHEMA

# The stage's names, several of them re-exported from the drift_* modules for importers.
__all__ = [
    "ANGLES_SCHEMA",
    "BASE_ARM",
    "DRIFT_SCHEMA",
    "NULL_KINDS",
    "RANK_KINDS",
    "SHARED_META",
    "VERDICT_SCHEMA",
    "Cell",
    "build_drift",
    "calibrate",
    "plot_angle_matrix",
    "plot_carrier_layers",
    "read_cells",
    "transfer_verdict",
    "verdict",
]

log = logging.getLogger(__name__)

NULL_KINDS = ("auto", "shuffle", "gaussian")


def _settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``drift`` section with the schema's defaults, range-checked."""
    section = params.get("drift") or {}
    s = section_with_defaults("drift", section)
    if "rotation_deg" not in section:
        # The recorded settings have always said 30.0 (the schema: 30); keep the files' bytes.
        s["rotation_deg"] = float(s["rotation_deg"])
    if not isinstance(s["ci"], int | float) or not 0 < s["ci"] < 1:
        raise RgeomError(f"drift.ci must be in (0, 1), got {s['ci']!r}")
    for key in ("window", "n_null", "n_boot", "relocation_layers", "subspace_k"):
        v, least = s[key], 1 if key == "subspace_k" else 0
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise RgeomError(f"drift.{key} must be an integer >= {least}, got {v!r}")
    for key in ("transfer_min", "min_effect"):
        if not isinstance(s[key], int | float) or isinstance(s[key], bool) or s[key] < 0:
            raise RgeomError(f"drift.{key} must be a number >= 0, got {s[key]!r}")
    if not isinstance(s["rotation_deg"], int | float) or not 0 <= s["rotation_deg"] <= 90:
        raise RgeomError(f"drift.rotation_deg must be in [0, 90], got {s['rotation_deg']!r}")
    if s["rank_kind"] not in RANK_KINDS:
        raise RgeomError(f"drift.rank_kind: {s['rank_kind']!r} is not one of {RANK_KINDS}")
    if s["null_model"] not in NULL_KINDS:
        raise RgeomError(f"drift.null_model: {s['null_model']!r} is not one of {NULL_KINDS}")
    return s


def _cross_anchor(paths: Sequence[str | Path], cells: Sequence[Cell]) -> pa.Table:
    """Every cross-anchor table in one; each must target a cell with directions."""
    from rgeom.causal import read_cross_anchor

    cross = read_cross_anchor(paths)
    labels = {(c.arm, c.step) for c in cells}
    stray = sorted(
        {(a, s) for a, s in zip(cross["arm"].to_pylist(), cross["step"].to_pylist(), strict=True)}
        - labels
    )
    if stray:
        raise RgeomError(f"drift: cross-anchor tables for cells without directions: {stray}")
    return cross


def _null_kind(settings: Mapping[str, Any], cells: Sequence[Cell]) -> str:
    """The null the run uses: shuffle, gaussian, or none (``n_null`` 0)."""
    null = settings["null_model"]
    if null == "auto":
        null = "shuffle" if all(c.activations is not None for c in cells) else "gaussian"
    if null == "shuffle":
        lacking = [c.label for c in cells if c.activations is None]
        if lacking:
            raise RgeomError(f"drift.null_model is 'shuffle' but no activation table for {lacking}")
    if settings["n_null"] == 0:
        null = "none"
    return null


def _measure(
    cells: Sequence[Cell], settings: Mapping[str, Any], null: str, seed: int, n_layers: int
) -> dict[str, CellStats]:
    """Every cell's window and statistics, by label."""
    measured: dict[str, CellStats] = {}
    kind = settings["rank_kind"]
    for cell in cells:
        place_window(cell, settings, n_layers)
        stats = measured[cell.label] = measure_cell(cell, settings, null, seed)
        log.info(
            "%s: reference L%d p%d, window %s, erank_%s %.3f (null %s)",
            cell.label,
            cell.ref[0],
            cell.ref[1],
            cell.window,
            kind,
            stats.row[f"erank_{kind}"],
            stats.row["erank_null_mean"],
        )
    return measured


def _table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    # .get: the contrast and bootstrap-stack ranks exist only with activation tables.
    return pa.table({name: [row.get(name) for row in rows] for name in schema.names}, schema=schema)


def build_drift(
    directions: Sequence[str | Path],
    carriers: Sequence[str | Path],
    out_dir: str | Path,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    activations: Sequence[str | Path] | None = None,
    cross_anchor: Sequence[str | Path] | None = None,
) -> dict[str, pa.Table]:
    """Write drift.parquet, angles.parquet, verdict.parquet and figures/ under ``out_dir``;
    with ``cross_anchor`` tables also cross_anchor.parquet (all of them in one), and the
    verdict comes from the transfer test (:func:`transfer_verdict`) where it can."""
    settings = _settings(params)
    cells, shared = read_cells(directions, carriers, activations)
    cross = _cross_anchor(cross_anchor, cells) if cross_anchor else None
    n_layers = int(shared["n_layers"])
    arms = arms_of(params, cells)
    null = _null_kind(settings, cells)
    seed = int(setting(params, "seed"))
    measured = _measure(cells, settings, null, seed, n_layers)

    links = AnchorLinks.of(arms, cells)
    angle_rows, carrier_angle = angle_table(cells, links, measured)
    level = float(settings["ci"])
    by_arm = {
        arm: drift_rows(arm, cells, links, measured, carrier_angle, null, level) for arm in arms
    }
    verdicts = [
        arm_verdict(
            arm,
            sequence(arm, cells),
            [row["angle_step0_deg"] for row in by_arm[arm]],
            cross,
            settings,
            seed,
        )
        for arm in arms
    ]
    tables = {
        "drift": _table([row for arm in arms for row in by_arm[arm]], DRIFT_SCHEMA),
        "angles": pa.table(angle_rows, schema=ANGLES_SCHEMA),
        "verdict": _table(verdicts, VERDICT_SCHEMA),
    }
    record = {
        **meta,
        "arms": arms,
        "drift": settings,
        "null_kind": null,
        **{k: shared[k] for k in SHARED_META if k in shared},
        "inputs": {
            "directions": [str(c.directions_path) for c in cells],
            "carriers": [str(p) for p in carriers],
            "activations": [str(p) for p in activations or []],
            "cross_anchor": [str(p) for p in cross_anchor or []],
        },
    }
    out = Path(out_dir)
    for name, schema in (
        ("drift", DRIFT_SCHEMA),
        ("angles", ANGLES_SCHEMA),
        ("verdict", VERDICT_SCHEMA),
    ):
        write_table(out / f"{name}.parquet", tables[name], schema, record)
    if cross is not None:
        tables["cross_anchor"] = cross
        write_table(out / "cross_anchor.parquet", cross, CROSS_SCHEMA, record)

    formats = figure_formats(params)
    draw_figures(
        tables["drift"], arms, n_layers, cells, carrier_angle, measured, out / "figures", formats
    )
    return tables
