"""rgeom.drift's verdict per arm: relocation, rotation, stable or undetermined, from the
geometry (:func:`verdict`) or, where cross-anchor tables allow, from the transfer test
(:func:`transfer_verdict`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from rgeom.drift_cells import Cell


def verdict(
    steps: Sequence[int],
    carrier_layers: Sequence[int | None],
    angles_step0: Sequence[float | None],
    relocation_layers: int,
    rotation_deg: float,
) -> tuple[str, float, str]:
    """relocation / rotation / stable / undetermined for one arm's anchor sequence.

    Relocation: the carrier layer differs by more than ``relocation_layers`` between any two
    anchors that have a carrier. Rotation: it stays, but the reference direction of some
    anchor is more than ``rotation_deg`` from step 0's. Undetermined: fewer than two
    anchors have a carrier, so a relocation cannot be told from a missing search result.
    """
    found = [
        (s, layer) for s, layer in zip(steps, carrier_layers, strict=True) if layer is not None
    ]
    trail = ", ".join(
        f"{s}:{'-' if layer is None else layer}"
        for s, layer in zip(steps, carrier_layers, strict=True)
    )
    if len(found) < 2:
        return (
            "undetermined",
            math.nan,
            f"carrier found at {len(found)} of {len(steps)} anchors (step:layer {trail})",
        )
    layers = [layer for _, layer in found]
    shift = max(layers) - min(layers)
    if shift > relocation_layers:
        return (
            "relocation",
            float(shift),
            f"carrier layer moved by {shift} > {relocation_layers} (step:layer {trail})",
        )
    finite = [a for a in angles_step0 if a is not None and math.isfinite(a)]
    worst = max(finite) if finite else math.nan
    if finite and worst > rotation_deg:
        return (
            "rotation",
            worst,
            f"max angle to step 0 {worst:.1f} deg > {rotation_deg:g} (step:layer {trail})",
        )
    return (
        "stable",
        worst,
        f"shift {shift} <= {relocation_layers} layers, max angle to step 0 {worst:.1f} deg "
        f"(step:layer {trail})",
    )


def transfer_verdict(
    cross_rows: Sequence[Mapping[str, Any]],
    first: tuple[str, int],
    last: tuple[str, int],
    settings: Mapping[str, Any],
    seed: int,
) -> dict[str, Any] | None:
    """The reorganization verdict from the cross-anchor transfer test, or None without the
    rows it needs (b = ``last`` with its own direction and with ``first``'s).

    With T the share of the last anchor's own bypass effect (its direction ablated, mean
    refusal-score drop on the harmful validation prompts) that the first anchor's direction
    achieves at the last anchor, and [lo, hi] its paired prompt-bootstrap interval (the
    point estimate where there is none): undetermined when the own effect is below
    ``min_effect`` log-odds (nothing to transfer) or the interval straddles
    ``transfer_min``; stable when lo >= ``transfer_min`` (step 0's direction still
    mediates refusal); otherwise reorganized: relocation when the two directions' layers
    differ by more than ``relocation_layers``, else rotation.
    """
    from rgeom.causal import transfer

    target = [r for r in cross_rows if (r["arm"], r["step"]) == last]
    early = next((r for r in target if (r["source_arm"], r["source_step"]) == first), None)
    own = next((r for r in target if (r["source_arm"], r["source_step"]) == last), None)
    if early is None or own is None:
        return None
    admissible = bool(early["admissible"] and own["admissible"])
    out: dict[str, Any] = {"basis": "cross_anchor", "admissible": admissible}
    trail = (
        f"step {first[1]} L{early['layer']} ({early['carrier_source']}) -> step {last[1]} "
        f"L{own['layer']} ({own['carrier_source']})"
    )
    if first == last:
        return {**out, "verdict": "undetermined", "statistic": math.nan,
                "detail": f"one anchor only ({trail})"}  # fmt: skip
    t = transfer(
        own["baseline_scores"],
        early["bypass_scores"],
        own["bypass_scores"],
        int(settings["n_boot"]),
        float(settings["ci"]),
        seed,
    )
    out.update(transfer=t.ratio, transfer_ci_low=t.ci_low, transfer_ci_high=t.ci_high)
    ci = "" if t.ci_low is None else f" [{t.ci_low:.2f}, {t.ci_high:.2f}]"
    flag = "" if admissible else "; fallback direction(s), no admissible carrier"
    desc = (
        f"transfer {t.ratio:.2f}{ci} (early effect {t.effect_early:.2f} / own effect "
        f"{t.effect_own:.2f} log-odds; {trail}{flag})"
    )
    min_effect, tmin = float(settings["min_effect"]), float(settings["transfer_min"])
    if not t.effect_own >= min_effect:
        v, why = "undetermined", f"own effect < min_effect {min_effect:g}: nothing to transfer"
    else:
        lo, hi = (t.ratio, t.ratio) if t.ci_low is None else (t.ci_low, t.ci_high)
        shift = abs(int(own["layer"]) - int(early["layer"]))
        if lo >= tmin:
            v, why = "stable", f"step {first[1]}'s direction still works (>= {tmin:g})"
        elif hi < tmin:
            v = "relocation" if shift > int(settings["relocation_layers"]) else "rotation"
            why = f"step {first[1]}'s direction no longer works (< {tmin:g}); layer shift {shift}"
        else:
            v, why = "undetermined", f"interval straddles transfer_min {tmin:g}"
    return {**out, "verdict": v, "statistic": t.ratio, "detail": f"{why}: {desc}"}


def arm_verdict(
    arm: str,
    seq: Sequence[Cell],
    step0_angles: Sequence[float | None],
    cross: pa.Table | None,
    settings: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:
    """verdict.parquet's row of one arm (anchors ``seq``): the transfer test's verdict where
    the cross-anchor rows decide it (the geometry's in its detail), else the geometry's."""
    v, statistic, detail = verdict(
        [c.step for c in seq],
        [c.carrier[0] if c.carrier else None for c in seq],
        step0_angles,
        settings["relocation_layers"],
        float(settings["rotation_deg"]),
    )
    row = {"arm": arm, "verdict": v, "statistic": statistic, "detail": detail}
    row["basis"] = "geometry"
    decided = None
    if cross is not None:
        decided = transfer_verdict(
            cross.to_pylist(),
            (seq[0].arm, seq[0].step),
            (seq[-1].arm, seq[-1].step),
            settings,
            seed,
        )
    if decided is not None:
        row.update(decided)
        row["detail"] = f"{row['detail']}; geometry: {v} ({detail})"
    return row
