"""Judge generation tables: per-response refusal labels and per-benchmark metrics.

The only judge implemented here is the string/feature matcher
(:mod:`rgeom.judges.refusal`, name ``refusal_matcher``). Its ``asr`` is a stand-in for
HarmBench's classifier ASR and ``strongreject_nonrefusal`` a stand-in for the StrongREJECT
rubric score; both carry the judge name in every metrics row so they are never mistaken
for the real thing.

The labels are :mod:`rgeom.judges.labels`, the metrics :mod:`rgeom.judges.aggregate`, and
the two stages that write them :mod:`rgeom.judges.stage`; this package re-exports the names
other modules use.
"""

from __future__ import annotations

from rgeom.judges.aggregate import compute_metrics
from rgeom.judges.labels import (
    JUDGES,
    LABELS,
    MODEL_JUDGE_COLUMNS,
    REQUIRED_COLUMNS,
    attack_success,
    label_completions,
    label_table,
)
from rgeom.judges.metrics import agreement, check_answer
from rgeom.judges.refusal import JUDGE_NAME, JUDGE_VERSION, classify, prefix_refusal
from rgeom.judges.stage import (
    BUILTIN_RATES_SOURCE,
    bootstrap_count,
    copyright_left_out,
    judge_table,
    metrics_table,
)
from rgeom.schemas import LABEL_SCHEMA, METRIC_SCHEMA

__all__ = [
    "BUILTIN_RATES_SOURCE",
    "JUDGES",
    "JUDGE_NAME",
    "JUDGE_VERSION",
    "LABELS",
    "LABEL_SCHEMA",
    "METRIC_SCHEMA",
    "MODEL_JUDGE_COLUMNS",
    "REQUIRED_COLUMNS",
    "agreement",
    "attack_success",
    "bootstrap_count",
    "check_answer",
    "classify",
    "compute_metrics",
    "copyright_left_out",
    "judge_table",
    "label_completions",
    "label_table",
    "metrics_table",
    "prefix_refusal",
]
