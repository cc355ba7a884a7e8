"""R2D2's behaviours with their affirmative targets, and the pool's test cases built from them.

The behaviours come from HarmBench's CSV plus targets JSON files, or from prompt tables with a
``target`` column; :class:`PoolEntry` is one persistent test case (behaviour, target, suffix).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rgeom.errors import RgeomError


@dataclass(frozen=True)
class R2D2Behaviour:
    """A training behaviour and its affirmative targets (HarmBench gives 12 per behaviour)."""

    behaviour_id: str
    behaviour: str
    targets: tuple[str, ...]
    context: str = ""
    tags: tuple[str, ...] = ()

    @property
    def contextual(self) -> bool:
        return bool(self.context.strip()) or "context" in self.tags


#: Separates several files in one ``--extra`` value (the stage's extras are NAME=PATH).
PATH_LIST_SEP = ","


def split_paths(value: str | Sequence[str] | None) -> list[str]:
    """``a.csv,b.csv`` (or a list) as a list of paths; empty for None or ``""``."""
    if not value:
        return []
    parts = value.split(PATH_LIST_SEP) if isinstance(value, str) else list(value)
    return [str(p) for p in parts if str(p).strip()]


def load_r2d2_targets(targets_json: str | Path | Sequence[str | Path]) -> dict[str, list[str]]:
    """``{BehaviorID: [targets]}`` merged from one or more targets JSON files.

    A file maps BehaviorID to a list of targets (``adv_training_targets.json``) or to one
    target string (``harmbench_targets_text.json``). An id in several files keeps the first
    file's targets, the order the config lists them in.
    """
    paths = [targets_json] if isinstance(targets_json, str | Path) else list(targets_json)
    merged: dict[str, list[str]] = {}
    for path in paths:
        try:
            found = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RgeomError(f"cannot read the R2D2 targets {path}: {exc}") from exc
        for bid, targets in found.items():
            merged.setdefault(bid, [targets] if isinstance(targets, str) else list(targets))
    return merged


def load_harmbench_behaviours(
    behaviours_csv: str | Path,
    targets_json: str | Path | Sequence[str | Path] | dict[str, list[str]],
    exclude: Iterable[str] = (),
) -> list[R2D2Behaviour]:
    """HarmBench's R2D2 behaviours (``adv_training_behaviors.csv``) with their targets.

    ``targets_json``: one or more targets files (see :func:`load_r2d2_targets`) or their merged
    dict. Contextual rows are kept here and dropped by :class:`R2D2Pool`, so the two filters
    can never disagree; a contextual row without targets is kept with none (the pool never
    draws it). A non-contextual row without targets is an error naming every such id, unless
    it is in ``exclude``.
    """
    targets = targets_json if isinstance(targets_json, dict) else load_r2d2_targets(targets_json)
    skip = set(exclude)
    out, missing = [], []
    with open(behaviours_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            bid = row["BehaviorID"]
            if bid in skip:
                continue
            tags = tuple(t.strip() for t in (row.get("Tags") or "").split(",") if t.strip())
            context = (row.get("ContextString") or "").replace("\r\n", "\n")
            found = tuple(targets.get(bid) or ())
            b = R2D2Behaviour(bid, row["Behavior"], found, context, tags)
            if not found and not b.contextual:
                missing.append(bid)
            out.append(b)
    if missing:
        raise RgeomError(
            f"{behaviours_csv}: no targets for behaviour(s) {', '.join(map(repr, missing))} "
            "in the R2D2 targets files (add them, or list them in r2d2.exclude)"
        )
    return out


def behaviours_from_pairs(rows: Iterable[tuple[str, str, str]]) -> list[R2D2Behaviour]:
    """Behaviours with one target each, from (id, behaviour, target) rows.

    For datasets with a single ``target`` column (AdvBench, JBB, the builtin harmful set).
    """
    return [R2D2Behaviour(bid, text, (target,) if target else ()) for bid, text, target in rows]


def behaviours_from_prompt_table(path: str | Path) -> list[R2D2Behaviour]:
    """Behaviours from a prompt table (``rgeom.data`` format) with its ``target`` column."""
    from rgeom.prompts import read_prompt_set

    table = read_prompt_set(path).to_pydict()
    return [
        R2D2Behaviour(pid, text, (target,) if target else (), context or "")
        for pid, text, target, context in zip(
            table["prompt_id"], table["text"], table["target"], table["context"], strict=True
        )
    ]


def load_behaviours(extra: dict[str, str], exclude: Iterable[str] = ()) -> list[R2D2Behaviour]:
    """R2D2 behaviours named by the train stage's extra inputs, in file order, ids deduped.

    ``r2d2_behaviours``: one or more files separated by ``,`` (the reference pool is
    ``adv_training_behaviors.csv`` plus HarmBench val), each a prompt table (.parquet,
    targets in its ``target`` column) or a HarmBench behaviours CSV; CSVs need
    ``r2d2_targets``, one or more targets JSON files merged. A behaviour id in several files
    is kept once (first file wins) and must name the same behaviour; ids in ``exclude`` are
    left out. Contextual behaviours are dropped by the pool, at init and reset alike.
    """
    paths = split_paths(extra.get("r2d2_behaviours"))
    if not paths:
        raise RgeomError("the r2d2 arm needs the extra input r2d2_behaviours=PATH[,PATH...]")
    skip = set(exclude)
    targets = None
    seen: dict[str, R2D2Behaviour] = {}
    for path in paths:
        if str(path).endswith(".csv"):
            if targets is None:
                target_files = split_paths(extra.get("r2d2_targets"))
                if not target_files:
                    raise RgeomError(
                        f"r2d2_behaviours={path} is a CSV: pass r2d2_targets=JSON[,JSON...] too"
                    )
                targets = load_r2d2_targets(target_files)
            rows = load_harmbench_behaviours(path, targets, skip)
        else:
            rows = [b for b in behaviours_from_prompt_table(path) if b.behaviour_id not in skip]
        for b in rows:
            first = seen.setdefault(b.behaviour_id, b)
            if first.behaviour != b.behaviour:
                raise RgeomError(
                    f"R2D2 behaviour id {b.behaviour_id!r} names different behaviours in "
                    f"the files {', '.join(paths)}"
                )
    return list(seen.values())


@dataclass
class PoolEntry:
    behaviour_id: str
    behaviour: str
    target: str
    suffix_ids: list[int]
    loss: float | None = None  # GCG target loss after the last refresh
    refreshes: int = 0
