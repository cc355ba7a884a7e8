"""Attack test cases: built once against a source model, replayed against every checkpoint.

HarmBench's protocol, at the scale the config asks for:

* **fixed-source** methods (``DirectRequest``, ``Templates``, ``GCG-transfer``,
  ``AutoDAN``) are built once, against the source model (by default the step-0 base
  model), and the very same user messages are replayed unchanged against every checkpoint
  of both arms. A change in ASR across anchors is then a change in the model, never in the
  attack;
* **adaptive GCG** re-optimises suffixes against each checkpoint itself, on a small subset of
  behaviours (:func:`adaptive_gcg_search`), because a fixed-source suffix says little about a
  model that was trained against GCG (R2D2).

Every method writes rows of :data:`TEST_CASE_SCHEMA`; :func:`combine_test_cases` merges them
(plus any user-supplied test-case files) into the one file the benchmark's generate step
reads, after checking every behaviour id against the behaviour set.

``test_case`` is the complete user message. A contextual behaviour (a row with ``context``)
is ``context + "\\n\\n---\\n\\n" + behaviour``, as HarmBench formats it; templates and GCG
suffixes wrap that whole message.

The optimising methods (GCG-transfer, AutoDAN, adaptive GCG) take minutes to hours per
behaviour, so each finished behaviour is written as a shard (:func:`rgeom.io.keyed_shards`)
and a rerun after a kill attacks only the behaviours still missing. Every behaviour is
seeded from ``(seed, behaviour id)`` alone, so a resumed run writes the same bytes as an
undisturbed one.

GCG-transfer test cases are stored and replayed as text, as HarmBench does. GCG keeps only
candidates whose ``message + " " + suffix`` re-encodes to the optimised ids, so replay gives
the optimised prompt; ``ids_roundtrip`` re-checks it per test case (a warm start or a user
file could still break it).

This module builds one method's file (:func:`build_method`) and merges the files; the parts
live beside it: the behaviours and targets (:mod:`~rgeom.attacks.behaviours`), the rows
(:mod:`~rgeom.attacks.cases`), Templates (:mod:`~rgeom.attacks.templates`), GCG-transfer
and AutoDAN (:mod:`~rgeom.attacks.optimised`), the adaptive attacks
(:mod:`~rgeom.attacks.adaptive`, :mod:`~rgeom.attacks.judging`). Their names stay
importable from here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

# Everything below is re-exported: the attack stages and the tests import these names here.
from rgeom.attacks.adaptive import (  # noqa: F401
    ADAPTIVE_AUTODAN_BENCHMARK,
    ADAPTIVE_BENCHMARK,
    ADAPTIVE_METHODS,
    AdaptiveJob,
    adaptive_autodan_search,
    adaptive_completions,
    adaptive_gcg_search,
)
from rgeom.attacks.behaviours import (  # noqa: F401
    load_gcg_targets,
    read_behaviours,
    select_behaviours,
    target_for,
)
from rgeom.attacks.cases import (  # noqa: F401
    REQUIRED_COLUMNS,
    case_row,
    cases_table,
    is_test_case_table,
)
from rgeom.attacks.fingerprints import resume_fingerprint
from rgeom.attacks.judging import (  # noqa: F401
    ADAPTIVE_METRICS,
    adaptive_metrics_table,
    as_generations,
    judge_adaptive,
)
from rgeom.attacks.optimised import (  # noqa: F401
    DEFAULT_INIT_SUFFIX,
    AttackJob,
    autodan_cases,
    behaviour_seed,
    gcg_transfer_cases,
)
from rgeom.attacks.templates import (  # noqa: F401
    SLOT,
    TEMPLATES_FILE,
    fill_template,
    load_templates,
    template_cases,
)
from rgeom.config import section_with_defaults
from rgeom.errors import RgeomError
from rgeom.io import Shards, read_table, write_table
from rgeom.schemas import (  # noqa: F401
    ADAPTIVE_CASES_SCHEMA,
    ADAPTIVE_COMPLETION_SCHEMA,
    ADAPTIVE_SCHEMA,
    ADAPTIVE_SHARD_SCHEMA,
    TEST_CASE_SCHEMA,
)

log = logging.getLogger(__name__)

METHODS = ("DirectRequest", "Templates", "GCG-transfer", "AutoDAN")
# Methods that optimise against the source model, so the stage must load it.
MODEL_METHODS = ("GCG-transfer", "AutoDAN")


def direct_request_cases(
    behaviours: Sequence[Mapping[str, Any]], source_model: str
) -> list[dict[str, Any]]:
    """The behaviour itself, one test case each (contextual: context, separator, behaviour).

    Every row of the set is kept, harmful or not, so DirectRequest replaces the plain prompts.
    """
    return [case_row(b, "DirectRequest", 0, b["message"], source_model) for b in behaviours]


# --- one method, then the combined file ----------------------------------------------


@dataclass(frozen=True)
class MethodJob:
    """One fixed-source method's test-case file: which method, from what, written where.

    ``params`` is the ``attacks`` config section. ``templates`` is the Templates method's
    templates file, or AutoDAN's prototypes (None: rgeom's own); ``targets`` the HarmBench
    targets JSON (None: the behaviours' own). ``chunk=(k, n)`` (GCG-transfer only) writes
    the k-th of n parts of its behaviours.
    """

    method: str
    behaviours_path: str
    out: str
    params: Mapping[str, Any]
    seed: int
    source_model: str
    meta: Mapping[str, Any]
    templates: str | None = None
    targets: str | None = None
    chunk: tuple[int, int] | None = None


def _method_cases(
    job: MethodJob, behaviours: Sequence[Mapping[str, Any]], model, tokenizer
) -> tuple[list[dict[str, Any]], dict[str, Any], Shards | None]:
    """One method's test cases, its extra provenance, and the shards an optimising method
    leaves to be finished once the table is written."""
    if job.method == "DirectRequest":
        return direct_request_cases(behaviours, job.source_model), {}, None
    if job.method == "Templates":
        section = section_with_defaults("attacks.templates", job.params.get("templates"))
        cases = template_cases(
            select_behaviours(behaviours, section["n_behaviors"], job.seed),
            load_templates(job.templates),
            int(section["per_behavior"]),
            job.seed,
            job.source_model,
        )
        return cases, {}, None
    if job.method not in MODEL_METHODS:
        raise RgeomError(f"attack method {job.method!r} is unknown; choose one of {list(METHODS)}")
    if model is None:
        raise RgeomError(f"{job.method} needs a source model (--model)")
    targets = load_gcg_targets(job.targets)
    fingerprint = resume_fingerprint(
        job.method,
        source_model=job.source_model,
        behaviours_path=job.behaviours_path,
        params=job.params,
        seed=job.seed,
        meta=job.meta,
    )
    key = "gcg" if job.method == "GCG-transfer" else "autodan"
    attack = AttackJob(
        behaviours=behaviours,
        targets=targets,
        params=job.params.get(key, {}),
        seed=job.seed,
        source_model=job.source_model,
        out=job.out,
        fingerprint=fingerprint,
        meta=job.meta,
    )
    if job.method == "GCG-transfer":
        cases, shards = gcg_transfer_cases(model, tokenizer, attack, chunk=job.chunk)
        return cases, ({} if job.chunk is None else {"chunk": list(job.chunk)}), shards
    cases, history, shards = autodan_cases(model, tokenizer, attack, prototypes=job.templates)
    return cases, {"autodan": history}, shards


def build_method(job: MethodJob, model=None, tokenizer=None) -> pa.Table:
    """Write the test cases of one fixed-source method to ``job.out``.

    ``model``/``tokenizer`` are needed only by the methods that optimise (GCG-transfer,
    AutoDAN). The optimising methods resume from the per-behaviour shards in
    ``<out>.parts/`` that a killed run left, when the fingerprint (behaviour file hash,
    targets, source model files, parameters, seed, provenance) matches.
    """
    behaviours = read_behaviours(job.behaviours_path)
    cases, extra, shards = _method_cases(job, behaviours, model, tokenizer)
    method = job.method
    if job.chunk is not None and method != "GCG-transfer":
        raise RgeomError(f"attack method {method!r} is not split into chunks (GCG-transfer is)")
    table = cases_table(cases)
    record = {
        **job.meta,
        "method": method,
        "behaviours": str(job.behaviours_path),
        "source_model": job.source_model,
        "templates": str(job.templates or TEMPLATES_FILE) if method == "Templates" else None,
        "targets": job.targets,
        **extra,
    }
    write_table(job.out, table, TEST_CASE_SCHEMA, record)
    if shards is not None:
        shards.finish()
    log.info("wrote %d %s test cases to %s", table.num_rows, method, job.out)
    return table


def read_test_cases(path: str | Path, behaviours: Sequence[Mapping[str, Any]]) -> pa.Table:
    """A test-case file checked against the behaviour set, missing columns filled in.

    Each behaviour id must be in the set; the first that is not is an error naming the file
    and the row.
    """
    path = Path(path)
    if not path.exists():
        raise RgeomError(f"missing file: {path}")
    table = read_table(path)
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            raise RgeomError(f"{path}: missing column {name!r} (test-case file)")
    by_id = {b["prompt_id"]: b for b in behaviours}
    cases = table.to_pylist()
    out = []
    for i, row in enumerate(cases):
        bid = row.get("behavior_id")
        if bid not in by_id:
            raise RgeomError(
                f"{path}: row {i}: behaviour id {bid!r} is not in the behaviour set "
                f"({len(by_id)} behaviours)"
            )
        for name in ("method", "test_case", "source_model"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise RgeomError(f"{path}: row {i}: {name!r} is empty")
        filled = case_row(by_id[bid], row["method"], i, row["test_case"], row["source_model"])
        # A user file without ids gets ones that name it, so they never collide with ours.
        filled["test_case_id"] = f"{path.name}#{i}"
        filled.update(
            {k: v for k, v in row.items() if k in TEST_CASE_SCHEMA.names and v is not None}
        )
        out.append(filled)
    return cases_table(out)


def combine_test_cases(
    parts: Sequence[str], behaviours_path: str, out: str, meta: Mapping[str, Any]
) -> pa.Table:
    """Merge per-method (and user) test-case files into the file the benchmark replays."""
    behaviours = read_behaviours(behaviours_path)
    tables = [read_test_cases(p, behaviours) for p in parts]
    table = pa.concat_tables(tables) if tables else cases_table([])
    seen: dict[str, str] = {}
    for part, t in zip(parts, tables, strict=True):
        for i, tid in enumerate(t.column("test_case_id").to_pylist()):
            if tid in seen:
                raise RgeomError(
                    f"{part}: row {i}: test_case_id {tid!r} already comes from {seen[tid]}"
                )
            seen[tid] = part
    counts = {m: 0 for m in dict.fromkeys(table.column("method").to_pylist())}
    for m in table.column("method").to_pylist():
        counts[m] += 1
    write_table(
        out,
        table,
        TEST_CASE_SCHEMA,
        {**meta, "parts": list(parts), "behaviours": str(behaviours_path), "methods": counts},
    )
    log.info("wrote %d test cases (%s) to %s", table.num_rows, counts, out)
    return table
