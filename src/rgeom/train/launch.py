"""DeepSpeed configs for ``train.zero_stage`` and the launcher environment they need."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from rgeom.errors import RgeomError

# Repository-relative: the workflow runs from the repository root and passes the path on.
DEEPSPEED_DIR = "workflow/deepspeed"


def deepspeed_config_path(zero_stage: int, offload: bool = False) -> str | None:
    """The DeepSpeed config for ``train.zero_stage`` / ``train.offload``; None without ZeRO."""
    if zero_stage == 0:
        return None
    if zero_stage not in (2, 3):
        raise RgeomError(f"train.zero_stage must be 0, 2 or 3, got {zero_stage}")
    return f"{DEEPSPEED_DIR}/zero{zero_stage}{'_offload' if offload else ''}.json"


def check_deepspeed_config(path: str | None, stage: int, expected: str) -> str:
    """``path``, once its ZeRO settings are checked against ``train.zero_stage``."""
    if not path:
        raise RgeomError(
            f"train.zero_stage is {stage} but no DeepSpeed config was given "
            f"(pass --extra deepspeed={expected})"
        )
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RgeomError(f"cannot read the DeepSpeed config {path}: {exc}") from exc
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != stage:
        raise RgeomError(
            f"{path} sets ZeRO stage {zero.get('stage')} but train.zero_stage is {stage}"
        )
    if stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        # Without it save_model writes DeepSpeed shards, not a model folder: the anchors
        # would not load with from_pretrained.
        raise RgeomError(
            f"{path}: ZeRO-3 anchors need "
            '"stage3_gather_16bit_weights_on_model_save": true in zero_optimization'
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """Launcher variables for a process started without a launcher (a world of one)."""
    # Without launcher variables DeepSpeed falls back to MPI discovery and fails on a
    # missing mpi4py; a single process is a world of one.
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
