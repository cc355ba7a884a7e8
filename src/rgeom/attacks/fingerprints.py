"""What a resumable attack stage's per-behaviour shards depend on (:func:`rgeom.io.keyed_shards`).

A rerun after a kill keeps the shards only when this fingerprint matches, so a resumed run
writes the same bytes as an undisturbed one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rgeom.io import file_sha256, files_fingerprint


def resume_fingerprint(
    stage: str,
    behaviours_path: str | Path,
    params: Mapping[str, Any],
    seed: int,
    meta: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """What a per-behaviour shard of an optimising stage depends on (the method adds the
    targets it resolved; :func:`rgeom.io.keyed_shards` adds the behaviour ids).

    ``meta`` carries the config hash of the parameters the job consumed (model dtype and
    device included) and the code version, so any change to them discards the shards, as
    for generation; the source model's files are fingerprinted by name, size and time.
    """
    return {
        "stage": stage,
        "behaviours": {"path": str(behaviours_path), "sha256": file_sha256(behaviours_path)},
        "model": files_fingerprint(meta["model"]) if meta.get("model") else None,
        "params": params,
        "seed": int(seed),
        "meta": meta,
        **extra,
    }
