"""The rank-k refusal subspace of a cell's direction (issue #5).

Rank-k subspace: r-hat followed by the top k - 1 right singular vectors of the per-prompt
contrast vectors ``x_i - mean_harmless`` (the ``dir`` harmful prompts' activations at the
carrier site, from the activation table) with their r-hat component removed. The subspaces
are nested, rank 1 is exactly directional ablation, and each further axis is the direction
along which individual harmful prompts differ most from the harmless mean beyond r: what a
refusal representation spread over more than one direction would add. (The top-k SVD of
the carrier window's unit directions was the alternative; adjacent layers' directions are
nearly parallel, so their second and later axes are mostly noise and a 2-layer window
cannot give k > 2.) Ranks above the contrasts' rank are skipped and listed in the metadata.

Torch-free: the carrier search (:mod:`rgeom.interventions`) and the interventions stage
(:mod:`rgeom.causal`) both use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rgeom.errors import RgeomError
from rgeom.geometry import DIRECTION_SPLIT, HARMFUL, HARMLESS


def contrast_vectors(activations: str | Path, layer: int, position: int) -> np.ndarray:
    """Per-prompt contrasts ``x_i - mean_harmless`` [n_harmful, d] of the ``dir`` split at
    one (layer, position), accumulated in float64."""
    try:
        table = pq.read_table(
            activations,
            columns=["label", "vector"],
            filters=[
                ("split", "=", DIRECTION_SPLIT),
                ("layer", "=", layer),
                ("position", "=", position),
                ("label", "in", [HARMFUL, HARMLESS]),
            ],
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{activations} is not a readable activation table") from exc
    if table.num_rows == 0:
        raise RgeomError(
            f"{activations}: no {DIRECTION_SPLIT!r} rows at layer {layer} position {position}"
        )
    d = table.schema.field("vector").type.list_size
    vec = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vec = vec.astype(np.float64).reshape(-1, d)
    labels = np.asarray(table.column("label").to_pylist())
    if not (labels == HARMFUL).any() or not (labels == HARMLESS).any():
        raise RgeomError(f"{activations}: needs both harmful and harmless rows at layer {layer}")
    return vec[labels == HARMFUL] - vec[labels == HARMLESS].mean(axis=0)


def subspace_basis(direction, contrasts: np.ndarray | None, k: int) -> np.ndarray:
    """Orthonormal rows [k', d], k' <= k: r-hat, then the top k - 1 right singular vectors
    of ``contrasts`` with their r-hat component removed (see the module docstring)."""
    r = np.asarray(direction, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(r)
    if not norm > 0:
        raise RgeomError("subspace_basis: the direction is zero")
    r_hat = r / norm
    rows = [r_hat]
    if k > 1 and contrasts is not None and len(contrasts):
        c = np.asarray(contrasts, dtype=np.float64)
        c = c - np.outer(c @ r_hat, r_hat)
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        scale = max(float(np.linalg.norm(contrasts, axis=1).max()), 1e-300)
        keep = s > 1e-8 * scale
        for v in vt[keep][: k - 1]:
            # Re-orthogonalise against r-hat: the SVD leaves rounding residue along it.
            v = v - (v @ r_hat) * r_hat
            rows.append(v / np.linalg.norm(v))
    return np.stack(rows)
