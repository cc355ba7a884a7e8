"""Training arms. ``train_arm`` runs one arm and exports a checkpoint at every anchor."""

from rgeom.train.runner import train_arm

__all__ = ["train_arm"]
