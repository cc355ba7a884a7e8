"""The glue every stage shares: seeding, parameters with the schema's defaults, the model
load and the provenance fields common to every output."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rgeom.config import setting
from rgeom.errors import RgeomError
from rgeom.io import config_hash, provenance
from rgeom.stage_params import MODEL_RESULT_KEYS

#: The fields naming a cell (training arm and step) in a table's provenance.
CELL_KEYS = ("arm", "step")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. A stage that has not imported torch yet does not pay
    for the import here (2-3 s): torch is seeded the moment its package has executed,
    before any code can draw from its generator, which leaves the state eager seeding
    leaves."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            spec = importlib.util.find_spec("torch")
        except ImportError:
            return
        if spec is None:
            return
        if type(spec.loader) is importlib.machinery.SourceFileLoader:
            for finder in sys.meta_path:
                if isinstance(finder, _SeedTorchOnImport):
                    finder.seed = seed
                    return
            sys.meta_path.insert(0, _SeedTorchOnImport(seed))
            return
        import torch
    torch.manual_seed(seed)


class _SeedTorchOnImport(importlib.abc.MetaPathFinder):
    """Hands torch's own spec back with a loader that calls ``torch.manual_seed`` right
    after the package executes; finds nothing else, and leaves ``sys.meta_path`` then."""

    def __init__(self, seed: int):
        self.seed = seed

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _SeedingLoader(spec.loader.name, spec.loader.path, self.seed)
        return spec


class _SeedingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, name: str, path: str, seed: int):
        super().__init__(name, path)
        self.seed = seed

    def exec_module(self, module) -> None:
        super().exec_module(module)
        module.manual_seed(self.seed)


def seed_stage(params: Mapping[str, Any]) -> int:
    """Seed everything with the stage's seed (``seed`` in ``params``); return it."""
    seed = int(setting(params, "seed"))
    seed_everything(seed)
    return seed


def stage_meta(params: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """The provenance of a stage's output: the hash of its parameters, its seed, ``fields``."""
    return provenance(config_hash=config_hash(params), seed=params.get("seed"), **fields)


def cell_fields(params: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> dict:
    """The cell (``arm``, ``step``) a job's output belongs to: as ``--params`` names it,
    else as the provenance ``source`` of the table it reads records it."""
    source = source or {}
    return {key: params.get(key, source.get(key)) for key in CELL_KEYS}


def recorded(source: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """``keys`` of a read table's provenance ``source``, carried into the output's."""
    return {key: source.get(key) for key in keys}


def model_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """How every stage loads the model: ``model.dtype``, ``.device``, ``.trust_remote_code``."""
    return {key: setting(params, f"model.{key}") for key in MODEL_RESULT_KEYS}


def load_model_and_tokenizer(model_dir: str, params: Mapping[str, Any]):
    """The model in ``model_dir`` and its tokenizer, loaded as :func:`model_settings` says."""
    from rgeom.models import load_model, load_tokenizer, resolve_device

    settings = model_settings(params)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=settings["trust_remote_code"])
    model = load_model(
        model_dir,
        dtype=settings["dtype"],
        device=resolve_device(settings["device"]),
        trust_remote_code=settings["trust_remote_code"],
    )
    return model, tokenizer


def paired(labels: Sequence[str], out: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(labels[i], out[i])``: the metrics stages write one table per judged table."""
    if len(labels) != len(out):
        raise RgeomError(f"--labels names {len(labels)} files but --out {len(out)}")
    return zip(labels, out, strict=True)
