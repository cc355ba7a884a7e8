"""Training arms. ``train_arm`` runs one arm and exports a checkpoint at every anchor.

``train_arm`` is imported on first use: the runner imports torch, and the package's
torch-free modules (``rgeom.train.train_log``, which the ``train_log`` rule runs in the
analysis environment) must import without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train_arm"]


def __getattr__(name: str) -> Any:
    if name == "train_arm":
        from rgeom.train.runner import train_arm

        return train_arm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
