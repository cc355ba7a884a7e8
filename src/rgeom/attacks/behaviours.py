"""The behaviours an attack targets and the affirmative targets GCG and AutoDAN aim for."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rgeom.data import prompt_text, read_prompts
from rgeom.errors import RgeomError


def read_behaviours(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompt set (PROMPT_SCHEMA) as behaviours, with their user message."""
    if not Path(path).exists():
        raise RgeomError(f"missing file: {path}")
    rows = read_prompts(path).to_pylist()
    if not rows:
        raise RgeomError(f"{path}: the behaviour set is empty")
    for r in rows:
        r["message"] = prompt_text(r["text"], r["context"])
    return rows


def select_behaviours(
    behaviours: Sequence[Mapping[str, Any]], n: int | None, seed: int
) -> list[Mapping[str, Any]]:
    """``n`` harmful behaviours drawn by ``seed`` (all when ``n`` is None), in file order.

    Each id gets a hashed rank, so a behaviour's membership does not depend on the order of
    the file and adding behaviours keeps earlier draws where it can.
    """
    harmful = [b for b in behaviours if b["label"] == "harmful"]
    if n is None or n >= len(harmful):
        return harmful

    def rank(b: Mapping[str, Any]) -> bytes:
        return hashlib.sha256(f"{seed}\x00{b['prompt_id']}".encode()).digest()

    keep = {b["prompt_id"] for b in sorted(harmful, key=rank)[:n]}
    return [b for b in harmful if b["prompt_id"] in keep]


def load_gcg_targets(path: str | Path | None) -> dict[str, str]:
    """Affirmative targets by behaviour id from a HarmBench targets JSON.

    ``{BehaviorID: "Sure, here is ..."}`` (harmbench_targets_text.json) or
    ``{BehaviorID: [targets, ...]}`` (the adversarial-training files; the first is used).
    """
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RgeomError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RgeomError(f"{path}: not a JSON targets file ({exc})") from None
    if not isinstance(data, dict):
        raise RgeomError(f"{path}: expected an object {{BehaviorID: target}}")
    out = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, str) or not value.strip():
            raise RgeomError(f"{path}: behaviour {key!r} has no target text")
        out[str(key)] = value
    return out


def target_for(behaviour: Mapping[str, Any], targets: Mapping[str, str], where: str) -> str:
    """The GCG target of a behaviour: the targets file first, then the set's target column."""
    target = targets.get(behaviour["prompt_id"]) or behaviour.get("target")
    if not target:
        raise RgeomError(
            f"{where}: behaviour {behaviour['prompt_id']!r} has no GCG target (neither in the "
            "set's target column nor in attacks.gcg.targets)"
        )
    return target
