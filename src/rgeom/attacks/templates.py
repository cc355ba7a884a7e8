"""The Templates method: HarmBench-style jailbreak templates wrapped around each behaviour.

The ``{behavior}`` slot and the JSONL format are shared with AutoDAN's prototypes
(:mod:`rgeom.attacks.autodan`), which evolve from templates of the same kind.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgeom.attacks.cases import case_row
from rgeom.errors import RgeomError

TEMPLATES_FILE = Path(__file__).resolve().with_name("templates.jsonl")
SLOT = "{behavior}"


def load_templates(path: str | Path | None = None) -> list[dict[str, str]]:
    """Jailbreak templates from a JSONL file (rgeom's own set by default).

    Each line: ``{"template_id": ..., "template": "... {behavior} ..."}``; ``family`` is
    optional. A template without the ``{behavior}`` slot is an error naming file and row.
    """
    path = Path(path) if path else TEMPLATES_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RgeomError(f"missing file: {path}") from None
    except UnicodeDecodeError as exc:
        raise RgeomError(f"{path} is not UTF-8 ({exc})") from None
    out: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RgeomError(f"{path}: row {i} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("template"), str):
            raise RgeomError(f"{path}: row {i} has no string field 'template'")
        tid = str(obj.get("template_id") or f"template_{i}")
        if SLOT not in obj["template"]:
            # The British spelling used in rgeom's prose is the likeliest slip.
            hint = (
                " (it has {behaviour}: the slot is spelled {behavior}, as in HarmBench)"
                if "{behaviour}" in obj["template"]
                else ""
            )
            raise RgeomError(
                f"{path}: row {i} (template {tid!r}) has no {SLOT} slot for the behaviour{hint}"
            )
        if tid in seen:
            raise RgeomError(
                f"{path}: row {i}: duplicate template_id {tid!r} (first at row {seen[tid]})"
            )
        seen[tid] = i
        out.append({"template_id": tid, "template": obj["template"]})
    if not out:
        raise RgeomError(f"{path}: no templates")
    return out


def fill_template(template: str, message: str) -> str:
    # str.replace, not str.format: templates may contain other braces.
    return template.replace(SLOT, message)


def template_cases(
    behaviours: Sequence[Mapping[str, Any]],
    templates: Sequence[Mapping[str, str]],
    per_behavior: int,
    seed: int,
    source_model: str,
    where: str = "attacks.templates",
) -> list[dict[str, Any]]:
    """``per_behavior`` distinct templates per harmful behaviour, drawn by ``seed``.

    The draw for a behaviour depends only on the seed and its id, so adding or removing
    other behaviours never changes its test cases.
    """
    if per_behavior < 1:
        raise RgeomError(f"{where}: per_behavior must be >= 1, got {per_behavior}")
    if per_behavior > len(templates):
        raise RgeomError(
            f"{where}: per_behavior={per_behavior} exceeds the {len(templates)} templates"
        )
    cases = []
    for b in behaviours:
        if b["label"] != "harmful":
            continue
        rng = np.random.default_rng([int(seed), zlib.crc32(b["prompt_id"].encode())])
        picks = rng.choice(len(templates), size=per_behavior, replace=False)
        for k, j in enumerate(sorted(int(p) for p in picks)):
            t = templates[j]
            cases.append(
                case_row(
                    b,
                    "Templates",
                    k,
                    fill_template(t["template"], b["message"]),
                    source_model,
                    template_id=t["template_id"],
                )
            )
    return cases
