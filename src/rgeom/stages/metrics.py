"""``rgeom metrics``: each judged cell's metrics with bootstrap CIs."""

from __future__ import annotations

from typing import Any

from rgeom.config import setting
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import paired, stage_meta

COMMAND = StageCommand(
    help="Metrics with bootstrap CIs from judged labels (judge.bootstrap resamples).",
    example="rgeom metrics --labels results/sft/step-000010/judgements/xstest.parquet \\\n"
    "    --out results/sft/step-000010/metrics/xstest.parquet",
    args=(
        arg("--labels", nargs="+", required=True, help="rgeom judge's labels"),
        arg("--out", nargs="+", required=True, help="one metrics table each"),
    ),
)


def run(labels: list[str], out: list[str], params: dict[str, Any]) -> None:
    """Each judged cell's metrics with bootstrap CIs, ``labels[i]`` -> ``out[i]``: the cheap
    half of judging, the only one ``judge.bootstrap`` reaches."""
    from rgeom.judges import bootstrap_count, metrics_table

    pairs = paired(labels, out)
    n_boot = bootstrap_count(params.get("judge", {}))
    for src, dst in pairs:
        metrics_table(src, dst, n_boot, int(setting(params, "seed")), stage_meta(params))
