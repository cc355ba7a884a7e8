"""Direction and validation prompts must not be training behaviours.

The carrier search reads refusal off the ``dir_*`` prompts and selects the carrier on the
``val_*`` ones. If either holds a behaviour one arm was trained on, that arm's geometry is
measured on its own training data and the other arm's is not: the comparison is biased for
one arm only. Arditi et al.'s harmful validation split is HarmBench's val behaviours, which
HarmBench's R2D2 pool also trains on, so the reference splits collide exactly there.

The check compares normalised prompt text (case, punctuation and spacing ignored), because
the files name the same behaviour with different id schemes (``harmful_val-00003`` vs a
HarmBench ``BehaviorID``). It runs with config validation and reads only local files: a hub
set, or a file that is not there yet, is left to the data stage.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rgeom.data.formats import resolve_path
from rgeom.data.loaders import load_set
from rgeom.errors import RgeomError
from rgeom.prompts import read_prompt_set

MEASURED_SETS = ("dir_harmful", "dir_harmless", "val_harmful", "val_harmless")
_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space: the same behaviour from two
    files compares equal whatever their quoting, punctuation or line endings."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _set_rows(name: str, spec: Mapping[str, Any], shared_dir: str, seed: int):
    """``[(id, text)]`` of a configured set as the data stage would load it (limit, offset
    and split applied), or None where it cannot be read here (hub, missing file)."""
    if spec.get("format") == "hf":
        return None
    if (
        spec.get("format") not in (None, "builtin")
        and not resolve_path(spec["path"], shared_dir).exists()
    ):
        return None
    table = load_set(spec, shared_dir, seed).to_pydict()
    return list(zip(table["prompt_id"], table["text"], strict=True))


def _pool_rows(path: Path) -> Iterable[tuple[str, str]]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                yield row.get("BehaviorID") or "", row.get("Behavior") or ""
    else:
        table = read_prompt_set(path, required=("prompt_id", "text")).to_pydict()
        yield from zip(table["prompt_id"], table["text"], strict=True)


def training_behaviours(cfg: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``{normalised text: (source, id)}`` of every behaviour either arm trains on: the
    ``train_harmful`` set (the SFT arm's refusals, and R2D2's pool when
    ``r2d2.behaviours`` is null) and the R2D2 pool files."""
    data = cfg["data"]
    shared_dir, seed = data.get("shared_dir", "."), int(cfg.get("seed", 0))
    out: dict[str, tuple[str, str]] = {}
    spec = data["sets"].get("train_harmful")
    for pid, text in (spec and _set_rows("train_harmful", spec, shared_dir, seed)) or []:
        out.setdefault(normalise(text), ("train_harmful", pid))
    if "r2d2" in cfg.get("arms", []):
        for rel in _as_list((cfg.get("r2d2") or {}).get("behaviours")):
            path = resolve_path(rel, shared_dir)
            if not path.exists():
                continue
            for bid, text in _pool_rows(path):
                out.setdefault(normalise(text), (f"r2d2 {path.name}", bid))
    return out


def check_contamination(cfg: Mapping[str, Any], source: str = "config") -> None:
    """One :class:`RgeomError` naming every direction / validation prompt that is also a
    training behaviour of either arm (with both ids), or nothing."""
    trained = training_behaviours(cfg)
    if not trained:
        return
    data = cfg["data"]
    shared_dir, seed = data.get("shared_dir", "."), int(cfg.get("seed", 0))
    hits = []
    for name in MEASURED_SETS:
        spec = data["sets"].get(name)
        for pid, text in (spec and _set_rows(name, spec, shared_dir, seed)) or []:
            found = trained.get(normalise(text))
            if found:
                hits.append(f"{name} {pid!r} = {found[0]} {found[1]!r}")
    if hits:
        shown = "; ".join(hits[:8]) + (f"; and {len(hits) - 8} more" if len(hits) > 8 else "")
        raise RgeomError(
            f"{source}: key data.sets: {len(hits)} direction/validation prompt(s) are training "
            f"behaviours of an arm, which biases that arm's carrier search: {shown}. Choose "
            "dir_*/val_* sets disjoint from train_harmful and r2d2.behaviours"
        )
