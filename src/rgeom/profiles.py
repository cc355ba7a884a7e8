"""Check Snakemake profiles against the workflow's rules.

Snakemake silently ignores a ``set-resources`` (or ``set-threads``) entry whose key is not
a rule name, so a typo or a renamed rule would quietly drop a job's GPU or memory request.
:func:`check_profile` turns that into one :class:`RgeomError` naming the unknown rule.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from rgeom.errors import RgeomError

RULE_RE = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.MULTILINE)
RULE_KEYED = ("set-resources", "set-threads")


def rule_names(rules_dir: str | os.PathLike) -> set[str]:
    """Every rule (and checkpoint) declared in ``rules_dir/*.smk``."""
    rules_dir = Path(rules_dir)
    files = sorted(rules_dir.glob("*.smk"))
    if not files:
        raise RgeomError(f"no *.smk rule files in {rules_dir}")
    names: set[str] = set()
    for path in files:
        names.update(RULE_RE.findall(path.read_text(encoding="utf-8")))
    return names


def check_profile(profile_path: str | os.PathLike, rules_dir: str | os.PathLike) -> list[str]:
    """The rule names a profile configures, after checking each is a rule of the workflow.

    ``profile_path`` is a profile's ``config.yaml`` (or the profile directory holding it).
    """
    path = Path(profile_path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.exists():
        raise RgeomError(f"profile not found: {path}")
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RgeomError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(profile, dict):
        raise RgeomError(f"{path}: the top level must be a mapping of keys")
    known = rule_names(rules_dir)
    checked: list[str] = []
    for section in RULE_KEYED:
        entries = profile.get(section) or {}
        if not isinstance(entries, dict):
            raise RgeomError(f"{path}: key {section} must map rule names to settings")
        for rule in entries:
            if rule not in known:
                raise RgeomError(
                    f"{path}: key {section}.{rule}: {rule!r} is not a rule of the workflow "
                    f"(rules: {', '.join(sorted(known))})"
                )
            checked.append(rule)
    return checked
