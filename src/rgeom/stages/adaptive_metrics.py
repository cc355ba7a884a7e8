"""``rgeom adaptive-metrics``: the ASR of judged adaptive attacks, with its bootstrap CI."""

from __future__ import annotations

from typing import Any

from rgeom.config import setting
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import paired, stage_meta

COMMAND = StageCommand(
    help="The ASR of judged adaptive attacks, with its bootstrap CI.",
    example="rgeom adaptive-metrics --labels results/sft/step-000010/adaptive_gcg.parquet \\\n"
    "    --out results/sft/step-000010/adaptive_gcg_metrics.parquet",
    args=(
        arg("--labels", nargs="+", required=True, help="rgeom adaptive-judge's"),
        arg("--out", nargs="+", required=True, help="one metrics table each"),
    ),
)


def run(labels: list[str], out: list[str], params: dict[str, Any]) -> None:
    """Each judged adaptive attack's ASR with its bootstrap CI, ``labels[i]`` -> ``out[i]``."""
    from rgeom.attacks.testcases import adaptive_metrics_table
    from rgeom.judges import bootstrap_count

    pairs = paired(labels, out)
    n_boot = bootstrap_count(params.get("judge", {}))
    for src, dst in pairs:
        adaptive_metrics_table(src, dst, n_boot, int(setting(params, "seed")), stage_meta(params))
