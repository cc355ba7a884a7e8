"""The workflow's stages, one module each, and the registry ``rgeom``'s CLI is built from.

``rgeom.stages.<stage>`` is the ``rgeom <stage>`` subcommand (underscores become dashes):
its ``COMMAND`` is the subcommand's help, example and arguments, and its ``run`` the entry
point, called with the parsed arguments as keywords. A stage unpacks ``params`` (the JSON
Snakemake passes), seeds everything, loads what it needs and calls into the module that owns
the logic; the glue every stage shares is in :mod:`rgeom.stages._common`.

Nothing here imports a stage: the CLI imports each module for its ``COMMAND``, and a stage
module imports torch only inside ``run``, so building the parser never does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from rgeom.tools import check_config  # noqa: F401 - re-exported for tests/test_models.py

#: Every stage module, in the order ``rgeom --help`` lists its subcommand.
STAGES = (
    "prepare_model",
    "prepare_data",
    "sft_data",
    "train",
    "generate",
    "judge",
    "metrics",
    "validate_judge",
    "utility_shift",
    "extract",
    "train_log",
    "directions",
    "prompt_filter",
    "summary",
    "carriers",
    "drift",
    "interventions",
    "cross_anchor",
    "interventions_summary",
    "attack",
    "attack_merge",
    "test_cases",
    "adaptive_gcg",
    "adaptive_autodan",
    "adaptive_generate",
    "adaptive_judge",
    "adaptive_metrics",
    "record_config",
)

#: One ``add_argument`` call: its flags and its keyword arguments.
Arg = tuple[tuple[str, ...], dict[str, Any]]


@dataclass(frozen=True)
class StageCommand:
    """One ``rgeom`` subcommand as ``--help`` shows it (tool commands use it too)."""

    help: str
    example: str
    args: tuple[Arg, ...]


def arg(*flags: str, **kwargs: Any) -> Arg:
    """The flags and keyword arguments of one ``ArgumentParser.add_argument`` call."""
    return flags, kwargs


def command_name(stage: str) -> str:
    """The subcommand of a stage module: ``prompt_filter`` is ``rgeom prompt-filter``."""
    return stage.replace("_", "-")


def key_value(text: str) -> tuple[str, str]:
    """An argparse type: ``NAME=PATH`` as a pair (``--set``, ``--extra``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    key, value = text.split("=", 1)
    return key, value
