"""Refusal directions and the geometry of the subspaces they span.

The candidate refusal direction at (layer, position) is the difference in means between
harmful and harmless activations (Arditi et al. 2024). Means are accumulated in float64
while streaming the activation table one row group at a time, so a large extraction never
has to fit in memory.

Arditi et al.'s prompt filter (``carrier.filter_prompts``) keeps the harmful prompts the
model refuses (baseline refusal score > 0) and the harmless ones it answers (< 0). rgeom
decides it once, on the source model (step 0), and every cell of both arms reuses those
prompt ids (:func:`prompt_filter_table`): drift then compares directions and carrier scores
over the same prompts. A set the source model starves (fewer than ``min_prompts`` kept, e.g.
a model that barely refuses before safety training) is kept whole and flagged ``starved``:
the filter cannot tell refusal from compliance in a model that does neither.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rgeom.errors import RgeomError
from rgeom.io import file_sha256, read_meta, read_table, write_table
from rgeom.schemas import DIRECTION_SCHEMA, PROMPT_FILTER_SCHEMA, direction_schema

log = logging.getLogger(__name__)

HARMFUL, HARMLESS = "harmful", "harmless"
DIRECTION_SPLIT = "dir"
# Copied from the activation table so that later stages can check what they combine.
CARRIED_META = (
    "d_model",
    "n_layers",
    "layers",
    "suffix_len",
    "hook_point",
    "dtype",
    "template_hash",
    "tokenizer_hash",
    "prompt_sets",
)
#: The activation-table columns the direction means read.
MEAN_COLUMNS = ("label", "split", "layer", "position", "vector")


def diff_in_means(harmful, harmless) -> np.ndarray:
    """mean(harmful) - mean(harmless) over rows, in float64. Accepts arrays or tensors."""
    a = _as_2d(harmful, "harmful")
    b = _as_2d(harmless, "harmless")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"width mismatch: harmful {a.shape[1]} vs harmless {b.shape[1]}")
    return a.mean(axis=0) - b.mean(axis=0)


def _as_2d(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {arr.shape}")
    return arr


def filter_by_baseline(
    harmful_scores: np.ndarray,
    harmless_scores: np.ndarray,
    min_prompts: int,
    sets: str = "validation prompts",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Arditi et al.'s prompt filter: keep harmful prompts the unedited model refuses
    (baseline refusal score > 0) and harmless ones it answers (< 0), so that directions and
    scores measure a change of behaviour rather than prompts that never showed it.

    Returns the kept indices of each set and the kept / total counts; raises
    :class:`RgeomError` naming those counts (and ``sets``, the prompts filtered) when either
    set keeps fewer than ``min_prompts``. Here rather than in rgeom.carrier_search, which
    imports torch, so that the direction stage needs no torch.
    """
    keep_h = np.flatnonzero(np.asarray(harmful_scores) > 0)
    keep_b = np.flatnonzero(np.asarray(harmless_scores) < 0)
    record = {
        "enabled": True,
        "min_prompts": int(min_prompts),
        "harmful_kept": len(keep_h),
        "harmful_total": len(harmful_scores),
        "harmless_kept": len(keep_b),
        "harmless_total": len(harmless_scores),
    }
    if len(keep_h) < min_prompts or len(keep_b) < min_prompts:
        raise RgeomError(
            f"too few prompts left after filtering: harmful {len(keep_h)}/{len(harmful_scores)} "
            f"kept (baseline refusal score > 0), harmless {len(keep_b)}/{len(harmless_scores)} "
            f"kept (< 0) of the {sets}; carrier.min_prompts is {min_prompts}. A model that "
            "rarely refuses starves the filter: use more prompts or set "
            "carrier.filter_prompts: false"
        )
    return keep_h, keep_b, record


FILTERED_SPLITS = (DIRECTION_SPLIT, "val")
PROMPT_FILTER_RULE = "source_model_sign"


def shared_filter(
    scores: Mapping[tuple[str, str], Mapping[str, float]], min_prompts: int
) -> tuple[dict[tuple[str, str], set[str]], dict[str, Any]]:
    """The kept prompt ids of each ``(split, label)`` set from the source model's baseline
    refusal scores ``{(split, label): {prompt_id: score}}``.

    Harmful prompts are kept when their score is > 0, harmless ones when < 0 (Arditi et
    al.); a set that keeps fewer than ``min_prompts`` is kept whole and listed as
    ``starved`` rather than raising, so a source model that never refuses still gets a
    (then unfiltered) search. Returns the ids and the record for the tables' metadata.
    """
    kept: dict[tuple[str, str], set[str]] = {}
    record: dict[str, Any] = {
        "enabled": True,
        "rule": PROMPT_FILTER_RULE,
        "min_prompts": int(min_prompts),
        "sets": {},
        "starved": [],
    }
    for (split, label), by_id in sorted(scores.items()):
        name = f"{split}_{label}"
        want = (lambda v: v > 0) if label == HARMFUL else (lambda v: v < 0)
        ids = {pid for pid, v in by_id.items() if want(v)}
        starved = len(ids) < min_prompts
        if starved:
            log.warning(
                "prompt filter: %s keeps %d/%d on the source model (< min_prompts %d); "
                "the set is used unfiltered",
                name,
                len(ids),
                len(by_id),
                min_prompts,
            )
            record["starved"].append(name)
            ids = set(by_id)
        kept[(split, label)] = ids
        record["sets"][name] = {
            "kept": len(ids),
            "total": len(by_id),
            "passed_filter": len(ids) if not starved else sum(map(want, by_id.values())),
        }
    return kept, record


def prompt_filter_table(
    activations: str | Path, out: str | Path, meta: Mapping[str, Any], min_prompts: int
) -> None:
    """The shared prompt filter (:func:`shared_filter`) from the source model's activation
    table, which must carry baseline refusal scores: one row per ``dir`` and ``val`` prompt
    with its score and whether it is kept. Every cell's directions and carrier search read
    this one table."""
    activations = Path(activations)
    source = read_meta(activations)
    try:
        pf = pq.ParquetFile(activations)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{activations} is not a readable Parquet file") from exc
    if "refusal_score" not in pf.schema_arrow.names or not source.get("refusal_scores"):
        raise RgeomError(
            f"{activations}: extracted without baseline refusal scores, which the prompt "
            "filter needs; extract the source model again with carrier.filter_prompts on"
        )
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for split in FILTERED_SPLITS:
        for label, by_id in _prompt_scores(pf, activations, split).items():
            if by_id:
                scores[(split, label)] = by_id
    # The val sets may be absent (a directions-only extraction); the carrier stage then
    # finds none in the filter and says so.
    missing = [f"dir_{lab}" for lab in (HARMFUL, HARMLESS) if (DIRECTION_SPLIT, lab) not in scores]
    if missing:
        raise RgeomError(f"{activations}: no prompts of {', '.join(missing)} to filter")
    kept, record = shared_filter(scores, min_prompts)
    rows = [
        (pid, split, label, value, pid in kept[(split, label)])
        for (split, label), by_id in sorted(scores.items())
        for pid, value in by_id.items()
    ]
    table = pa.table(
        {name: [r[i] for r in rows] for i, name in enumerate(PROMPT_FILTER_SCHEMA.names)}
    )
    full = dict(meta)
    full.update(
        prompt_filter=record,
        activations={"path": str(activations), "sha256": file_sha256(activations)},
        source_arm=source.get("arm"),
        source_step=source.get("step"),
    )
    write_table(out, table, PROMPT_FILTER_SCHEMA, full)


def load_prompt_filter(
    path: str | Path, split: str
) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, Any]]:
    """``({label: kept ids}, {label: all ids}, record)`` of one split of a prompt-filter
    table, the record with this split's kept / total counts in the old flat form too."""
    table = read_table(path, schema=PROMPT_FILTER_SCHEMA).to_pydict()
    kept: dict[str, set[str]] = {HARMFUL: set(), HARMLESS: set()}
    every: dict[str, set[str]] = {HARMFUL: set(), HARMLESS: set()}
    for pid, sp, label, keep in zip(
        table["prompt_id"], table["split"], table["label"], table["kept"], strict=True
    ):
        if sp == split and label in every:
            every[label].add(pid)
            if keep:
                kept[label].add(pid)
    if not every[HARMFUL] or not every[HARMLESS]:
        raise RgeomError(f"{path}: no {split!r} prompts of both labels in the prompt filter")
    meta = read_meta(path)
    record = dict(meta.get("prompt_filter") or {})
    record.update(
        source={"path": str(path), "arm": meta.get("source_arm"), "step": meta.get("source_step")},
        harmful_kept=len(kept[HARMFUL]),
        harmful_total=len(every[HARMFUL]),
        harmless_kept=len(kept[HARMLESS]),
        harmless_total=len(every[HARMLESS]),
    )
    return kept, every, record


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return None
    return float(np.dot(a, b) / (na * nb))


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


class _MeanAccumulator:
    """Per-(layer, position, label) float64 sums and counts."""

    def __init__(self, d: int):
        self.d = d
        self.sums: dict[tuple[int, int, str], np.ndarray] = defaultdict(
            lambda: np.zeros(self.d, np.float64)
        )
        self.counts: dict[tuple[int, int, str], int] = defaultdict(int)

    def add(self, layer: np.ndarray, position: np.ndarray, label: np.ndarray, vec: np.ndarray):
        keys = np.rec.fromarrays([layer, position, label])
        uniq, inverse = np.unique(keys, return_inverse=True)
        for k, key in enumerate(uniq):
            rows = inverse == k
            key = (int(key[0]), int(key[1]), str(key[2]))
            self.sums[key] += vec[rows].sum(axis=0, dtype=np.float64)
            self.counts[key] += int(rows.sum())


def _prompt_scores(
    pf: pq.ParquetFile, activations: Path, split: str = DIRECTION_SPLIT
) -> dict[str, dict[str, float]]:
    """``{label: {prompt_id: baseline refusal score}}`` of one split's prompts, read from
    the scalar columns alone (no vectors)."""
    scores: dict[str, dict[str, float]] = {HARMFUL: {}, HARMLESS: {}}
    columns = ["prompt_id", "label", "split", "refusal_score"]
    for g in range(pf.num_row_groups):
        rg = pf.read_row_group(g, columns=columns)
        splits = rg.column("split").to_numpy(zero_copy_only=False)
        label = rg.column("label").to_numpy(zero_copy_only=False)
        keep = (splits == split) & np.isin(label, (HARMFUL, HARMLESS))
        if not keep.any():
            continue
        score_col = rg.column("refusal_score")
        if score_col.filter(pa.array(keep)).null_count:
            raise RgeomError(
                f"{activations}: {split!r} rows without a refusal_score; the prompt "
                "filter needs every such prompt scored"
            )
        pids = rg.column("prompt_id").to_numpy(zero_copy_only=False)[keep]
        values = score_col.to_numpy(zero_copy_only=False)[keep]
        for lab, pid, value in zip(label[keep], pids, values, strict=True):
            # Every row of a prompt repeats its one score: the first is as good as any.
            scores[lab].setdefault(str(pid), float(value))
    return scores


def _split_ids(pf: pq.ParquetFile, split: str) -> set[str]:
    ids: set[str] = set()
    for g in range(pf.num_row_groups):
        rg = pf.read_row_group(g, columns=["prompt_id", "split"])
        mask = rg.column("split").to_numpy(zero_copy_only=False) == split
        ids.update(map(str, rg.column("prompt_id").to_numpy(zero_copy_only=False)[mask]))
    return ids


def _open_activations(activations: Path, source: Mapping[str, Any]) -> pq.ParquetFile:
    """The activation table, checked for its row count and the columns the means need."""
    try:
        pf = pq.ParquetFile(activations)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RgeomError(f"{activations} is not a readable Parquet file") from exc
    expected = source.get("num_rows")
    if expected is not None and int(expected) != pf.metadata.num_rows:
        raise RgeomError(
            f"{activations}: holds {pf.metadata.num_rows} rows but was written with {expected}"
        )
    missing = [c for c in MEAN_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise RgeomError(f"{activations}: missing column(s) {', '.join(missing)}")
    if pf.schema_arrow.field("vector").type.list_size <= 0:
        raise RgeomError(f"{activations}: column 'vector' is not a fixed-size list")
    return pf


def _direction_prompts(
    pf: pq.ParquetFile, activations: Path, prompt_filter: str | Path
) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """The prompt filter's kept ``dir`` ids per label and its record, after checking that
    the filter was built from this table's ``dir`` prompts."""
    if "prompt_id" not in pf.schema_arrow.names:
        raise RgeomError(f"{activations}: missing column prompt_id, which the filter needs")
    kept, every, record = load_prompt_filter(prompt_filter, DIRECTION_SPLIT)
    here = _split_ids(pf, DIRECTION_SPLIT)
    if here != every[HARMFUL] | every[HARMLESS]:
        raise RgeomError(
            f"{activations}: its {DIRECTION_SPLIT!r} prompts differ from those of the "
            f"prompt filter {prompt_filter}; both must come from the same prompt sets"
        )
    log.info(
        "prompt filter %s: harmful %d/%d, harmless %d/%d kept",
        prompt_filter,
        record["harmful_kept"],
        record["harmful_total"],
        record["harmless_kept"],
        record["harmless_total"],
    )
    return kept, record


def _accumulate_means(pf: pq.ParquetFile, kept_ids: dict[str, set[str]] | None) -> _MeanAccumulator:
    """Sums and counts of the ``dir`` rows (those ``kept_ids`` keeps, if given), streamed
    one row group at a time."""
    columns = [*MEAN_COLUMNS, "prompt_id"] if kept_ids is not None else list(MEAN_COLUMNS)
    acc = _MeanAccumulator(pf.schema_arrow.field("vector").type.list_size)
    for g in range(pf.num_row_groups):
        rg = pf.read_row_group(g, columns=columns)
        split = rg.column("split").to_numpy(zero_copy_only=False)
        label = rg.column("label").to_numpy(zero_copy_only=False)
        keep = (split == DIRECTION_SPLIT) & np.isin(label, (HARMFUL, HARMLESS))
        if kept_ids is not None:
            # Per label: a harmful and a harmless prompt may share an id.
            pids = rg.column("prompt_id").to_numpy(zero_copy_only=False)
            keep &= ((label == HARMFUL) & np.isin(pids, list(kept_ids[HARMFUL]))) | (
                (label == HARMLESS) & np.isin(pids, list(kept_ids[HARMLESS]))
            )
        if not keep.any():
            continue
        acc.add(
            rg.column("layer").to_numpy()[keep],
            rg.column("position").to_numpy()[keep],
            label[keep].astype(str),
            _vectors(rg.column("vector"))[keep],
        )
    return acc


def _direction_rows(acc: _MeanAccumulator, activations: Path) -> dict[str, list]:
    """One row per (layer, position): the mean difference, its norm and unit vector, and
    the cosine to the previous captured layer's."""
    cells = sorted({(layer, pos) for layer, pos, _ in acc.counts})
    if not cells:
        raise RgeomError(
            f"{activations}: no rows with split == {DIRECTION_SPLIT!r} and label "
            f"{HARMFUL!r}/{HARMLESS!r}"
        )
    rows: dict[str, list] = defaultdict(list)
    previous: dict[int, np.ndarray] = {}
    for layer, pos in cells:
        n_h = acc.counts.get((layer, pos, HARMFUL), 0)
        n_b = acc.counts.get((layer, pos, HARMLESS), 0)
        if n_h == 0 or n_b == 0:
            raise RgeomError(
                f"{activations}: layer {layer} position {pos} has {n_h} harmful and {n_b} "
                f"harmless {DIRECTION_SPLIT!r} rows; both are needed"
            )
        r = acc.sums[(layer, pos, HARMFUL)] / n_h - acc.sums[(layer, pos, HARMLESS)] / n_b
        norm = float(np.linalg.norm(r))
        rows["layer"].append(layer)
        rows["position"].append(pos)
        rows["n_harmful"].append(n_h)
        rows["n_harmless"].append(n_b)
        rows["norm"].append(norm)
        rows["direction"].append(r)
        # A zero difference has no direction; its unit vector stays zero.
        rows["unit"].append(r / norm if norm > 0 else np.zeros_like(r))
        # cells are sorted by layer, so `previous` holds the last captured layer before this.
        rows["cos_prev_layer"].append(cosine(previous[pos], r) if pos in previous else None)
        previous[pos] = r
    return rows


def diff_in_means_table(
    activations: str | Path,
    out: str | Path,
    meta: Mapping[str, Any],
    prompt_filter: str | Path | None = None,
) -> None:
    """One candidate direction per (layer, position) from the ``dir`` split of an
    activation table, with its norm and the cosine to the previous captured layer.

    ``prompt_filter`` (a :func:`prompt_filter_table`, built once on the source model) keeps
    only its kept ``dir`` prompts, the same ones in every cell; its kept / total counts go
    in the metadata (``prompt_filter``).
    """
    activations = Path(activations)
    source = read_meta(activations)
    pf = _open_activations(activations, source)
    d = pf.schema_arrow.field("vector").type.list_size
    prompt_record: dict[str, Any] = {"enabled": False}
    kept_ids: dict[str, set[str]] | None = None
    if prompt_filter is not None:
        kept_ids, prompt_record = _direction_prompts(pf, activations, prompt_filter)
    rows = _direction_rows(_accumulate_means(pf, kept_ids), activations)
    schema = direction_schema(d)
    table = pa.table(
        {
            name: (
                pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(rows[name])), d)
                if name in ("direction", "unit")
                else pa.array(rows[name], schema.field(name).type)
            )
            for name in schema.names
        }
    )
    record = dict(meta)
    record.update({k: source[k] for k in CARRIED_META if k in source})
    record["activations"] = {"path": str(activations), "sha256": file_sha256(activations)}
    record["prompt_filter"] = prompt_record
    write_table(out, table, schema, record)
    log.info("wrote %d directions to %s", len(rows["layer"]), out)


def load_directions(path: str | Path, unit: bool = False) -> dict[tuple[int, int], np.ndarray]:
    """``{(layer, position): direction}`` from a direction table (raw r unless ``unit``)."""
    table = read_table(path, schema=DIRECTION_SCHEMA)
    column = "unit" if unit else "direction"
    if column not in table.column_names:
        raise RgeomError(f"{path}: missing column {column!r}")
    # A copy: arrow buffers are read-only, and callers may edit or hand these to torch.
    vecs = _vectors(table.column(column)).copy()
    return {
        (int(layer), int(pos)): vecs[i]
        for i, (layer, pos) in enumerate(
            zip(
                table.column("layer").to_pylist(), table.column("position").to_pylist(), strict=True
            )
        )
    }


def _singular_values(X, gram: bool = False) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.size == 0:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {X.shape}")
    if gram:
        # Eigenvalues of the smaller Gram matrix: far cheaper than an SVD of a wide stack,
        # but values below ~1e-8 of the largest are rounding (fine for null draws only).
        G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
        s = np.sqrt(np.clip(np.linalg.eigvalsh(G), 0, None))[::-1]
    else:
        s = np.linalg.svd(X, compute_uv=False)
    if not np.isfinite(s).all() or s.sum() == 0:
        raise ValueError("the matrix is zero or not finite; its rank measures are undefined")
    return s


def _entropy_rank(weights: np.ndarray) -> float:
    p = weights / weights.sum()
    p = p[p > 0]  # 0 log 0 = 0
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(X, kind: str = "singular", center: bool = False) -> float:
    """Effective rank of the rows of ``X`` ([n, d]).

    ``kind="singular"``: exp of the Shannon entropy of sigma / sum(sigma) (Roy & Vetterli
    2007). ``kind="energy"``: the same on sigma^2, i.e. on explained variance.
    ``kind="participation"``: the participation ratio (sum sigma^2)^2 / sum sigma^4.
    All three are 1 for rank-1 data and k for k equal singular values. ``center`` subtracts
    the row mean first, measuring the spread of a point cloud rather than its span.
    """
    X = _as_2d(X, "X")
    if center:
        X = X - X.mean(axis=0)
    return _rank_from_singular(_singular_values(X), kind)


def _rank_from_singular(s: np.ndarray, kind: str) -> float:
    if kind == "singular":
        return _entropy_rank(s)
    if kind == "energy":
        return _entropy_rank(s**2)
    if kind == "participation":
        e = s**2
        return float(e.sum() ** 2 / (e**2).sum())
    raise ValueError(f"unknown effective-rank kind {kind!r}")


def rank_measures(X, center: bool = False, fast: bool = False) -> dict[str, float]:
    """All three effective-rank measures of ``X`` from one decomposition. ``fast`` takes the
    singular values from the smaller Gram matrix (exact to ~1e-8 relative), for null draws
    where thousands of wide stacks are ranked."""
    X = _as_2d(X, "X")
    if center:
        X = X - X.mean(axis=0)
    s = _singular_values(X, gram=fast)
    return {kind: _rank_from_singular(s, kind) for kind in ("singular", "energy", "participation")}


def principal_angles(A, B) -> np.ndarray:
    """Principal angles in degrees, ascending, between the column spans of A [d, k] and
    B [d, m] (a 1-D input is one column). There are min(rank A, rank B) of them."""
    from scipy.linalg import subspace_angles

    a = _columns(A, "A")
    b = _columns(B, "B")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"ambient dimension mismatch: A has {a.shape[0]} rows, B {b.shape[0]}")
    # scipy returns radians in descending order.
    return np.sort(np.degrees(subspace_angles(a, b)))


def _columns(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty [d, k] matrix, got shape {arr.shape}")
    return arr
