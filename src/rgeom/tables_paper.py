"""The numbers the paper reports, set beside the run's in the summary's tables and figures.

Where the run uses the paper's anchors (:data:`PAPER_ANCHORS`) the behaviour and geometry
tables gain ``paper:`` columns with the numbers of :data:`PAPER_REFERENCE`; for any other
anchors they are left out, as a step-12 number has no paper counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

PAPER_ANCHORS = (0, 50, 100, 250, 500)
_TRAINED = PAPER_ANCHORS[1:]


@dataclass(frozen=True)
class Ref:
    """A number the paper reports: a point (low == high), a range, or an approximation."""

    low: float
    high: float | None = None
    approx: bool = False

    def text(self) -> str:
        if self.high is not None and self.high != self.low:
            return f"{self.low:.3f}–{self.high:.3f}"
        return f"≈{self.low:.2f}" if self.approx else f"{self.low:.3f}"


# The paper's numbers (arXiv 2604.27019), keyed by the run's column and (arm, anchor); the
# one place they live. Mapping decisions where the paper's text leaves them open:
# - HarmBench ASR is set beside the run's pooled aggregate over fixed-source methods
#   (``harmbench.asr``; with attacks its header is POOLED_ASR_HEADER, and the paper column's
#   header names it): the paper gives one ASR per anchor, not one per method.
# - SFT's "0.505-0.588" is a range over its trained anchors without a per-anchor split, so
#   every trained SFT anchor shows the range.
# - R2D2's XSTest any-refusal "1.000 -> 0.664 -> 0.228" has three values for four trained
#   anchors. 0.664 and 0.228 go to 250 and 500, where R2D2's ASR leaves 0 (0.035, 0.250);
#   1.000 goes to 100, the last anchor of the zero-ASR phase, and 50 stays blank rather
#   than repeating a number the paper does not state for it.
# - R2D2's step 50 "remains closed under both adaptive GCG and AutoDAN" (v2 abstract): no
#   number, so ≈0 beside adaptive_gcg.asr and adaptive_autodan.asr at (r2d2, 50).
# - The effective rank "≈1.24" is the paper's reading of the refusal direction across
#   adjacent layers, not tied to an arm or anchor; it matches the ``energy`` variant
#   (rgeom.drift's docstring), so it stands beside ``erank_energy`` on every row.
PAPER_REFERENCE: dict[str, dict[tuple[str, int], Ref]] = {
    "harmbench.asr": {
        ("r2d2", 50): Ref(0.0),
        ("r2d2", 100): Ref(0.0),
        ("r2d2", 250): Ref(0.035),
        ("r2d2", 500): Ref(0.250),
        **{("sft", s): Ref(0.505, 0.588) for s in _TRAINED},
    },
    "xstest.xstest_any_refusal": {
        ("r2d2", 100): Ref(1.0),
        ("r2d2", 250): Ref(0.664),
        ("r2d2", 500): Ref(0.228),
    },
    "adaptive_gcg.asr": {
        ("r2d2", 50): Ref(0.0, approx=True),
        ("r2d2", 250): Ref(0.415),
        ("r2d2", 500): Ref(0.613),
    },
    "adaptive_autodan.asr": {("r2d2", 50): Ref(0.0, approx=True)},
    "erank_energy": {
        (a, s): Ref(1.24, approx=True) for a in ("sft", "r2d2") for s in PAPER_ANCHORS
    },
}


def is_paper_config(params: Mapping[str, Any]) -> bool:
    anchors = params.get("anchors")
    return anchors is not None and tuple(int(a) for a in anchors) == PAPER_ANCHORS


def paper_value(column: str, arm: str, step: int) -> Ref | None:
    return PAPER_REFERENCE.get(column, {}).get((arm, int(step)))


def with_paper_column(frame: pl.DataFrame, column: str, name: str) -> pl.DataFrame:
    """``frame`` plus a text column ``name``: the paper's number for ``column`` at each
    row's (arm, step), null where it reports none."""
    return frame.with_columns(
        pl.struct(["arm", "step"])
        .map_elements(
            lambda r: v.text() if (v := paper_value(column, r["arm"], r["step"])) else None,
            return_dtype=pl.String,
        )
        .alias(name)
    )
