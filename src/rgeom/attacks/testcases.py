"""Attack test cases: built once against a source model, replayed against every checkpoint.

HarmBench's protocol, at the scale the config asks for:

* **fixed-source** methods (``DirectRequest``, ``Templates``, ``GCG-transfer``,
  ``AutoDAN``) are built
  once, against the source model (by default the step-0 base model), and the very same user
  messages are replayed unchanged against every checkpoint of both arms. A change in ASR
  across anchors is then a change in the model, never in the attack;
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import (
    Shards,
    file_sha256,
    files_fingerprint,
    keyed_shards,
    read_table,
    write_table,
)
from rgeom.schemas import (  # noqa: F401 (re-exported: the stages import them here)
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
TEMPLATES_FILE = Path(__file__).resolve().with_name("templates.jsonl")
SLOT = "{behavior}"
DEFAULT_INIT_SUFFIX = " ".join(["!"] * 20)

# The columns a user-supplied test-case file must have; the rest are filled in.
REQUIRED_COLUMNS = ("behavior_id", "method", "test_case", "source_model")
ADAPTIVE_BENCHMARK = "adaptive_gcg"


# --- behaviours ---------------------------------------------------------------------


def read_behaviours(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompt set (PROMPT_SCHEMA) as behaviours, with their user message."""
    from rgeom.data import prompt_text, read_prompts

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


def load_targets(path: str | Path | None) -> dict[str, str]:
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


def _case(behaviour: Mapping[str, Any], method: str, k: int, text: str, source: str, **extra):
    return {
        "test_case_id": f"{method}/{behaviour['prompt_id']}/{k}",
        "behavior_id": behaviour["prompt_id"],
        "method": method,
        "test_case": text,
        "source_model": source,
        "behavior": behaviour["text"],
        "context": behaviour["context"],
        "category": behaviour["category"],
        "label": behaviour["label"],
        "target": behaviour.get("target"),
        **extra,
    }


# --- DirectRequest --------------------------------------------------------------------


def direct_request_cases(
    behaviours: Sequence[Mapping[str, Any]], source_model: str
) -> list[dict[str, Any]]:
    """The behaviour itself, one test case each (contextual: context, separator, behaviour).

    Every row of the set is kept, harmful or not, so DirectRequest replaces the plain prompts.
    """
    return [_case(b, "DirectRequest", 0, b["message"], source_model) for b in behaviours]


# --- Templates ----------------------------------------------------------------------


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
                _case(
                    b,
                    "Templates",
                    k,
                    fill_template(t["template"], b["message"]),
                    source_model,
                    template_id=t["template_id"],
                )
            )
    return cases


# --- GCG ----------------------------------------------------------------------------


def _gcg_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "steps": int(params.get("steps", 500)),
        "search_width": int(params.get("search_width", 512)),
        "topk": int(params.get("topk", 256)),
        "batch_size": params.get("batch_size"),
        "init_suffix": params.get("init_suffix") or DEFAULT_INIT_SUFFIX,
        "screen_dtype": params.get("screen_dtype"),
        "rescore_top": int(params.get("rescore_top", 8)),
    }


def behaviour_seed(seed: int, behaviour_id: str) -> int:
    """GCG's sampling seed for one behaviour, derived from the run's seed and its id.

    One seed per behaviour rather than one random stream for the whole run: a behaviour's
    suffix then depends neither on how many behaviours were attacked before it (a run
    resumed from shards equals an undisturbed one) nor on which others are attacked.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00gcg\x00{behaviour_id}".encode()).digest()
    # 63 bits: any value torch.Generator.manual_seed accepts.
    return int.from_bytes(digest[:8], "little") >> 1


class _GCGRunner:
    """GCG on one behaviour at a time, each with its own :func:`behaviour_seed`."""

    def __init__(self, model, tokenizer, params: Mapping[str, Any], seed: int):
        from rgeom.attacks.gcg import _vocab_size, ascii_token_ids

        self.model, self.tokenizer, self.seed = model, tokenizer, int(seed)
        self.settings = _gcg_settings(params)
        # The allowed tokens decode the whole vocabulary: once per stage, not per behaviour.
        self.allowed = ascii_token_ids(tokenizer, _vocab_size(model))

    def __call__(self, behaviour: Mapping[str, Any], target: str):
        from rgeom.attacks.gcg import gcg

        s = self.settings
        (result,) = gcg(
            self.model,
            self.tokenizer,
            [behaviour["message"]],
            [target],
            steps=s["steps"],
            search_width=s["search_width"],
            topk=s["topk"],
            batch_size=s["batch_size"],
            seed=behaviour_seed(self.seed, behaviour["prompt_id"]),
            allowed_tokens=self.allowed,
            init_suffix=s["init_suffix"],
            screen_dtype=s["screen_dtype"],
            rescore_top=s["rescore_top"],
        )
        return result


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


def gcg_transfer_cases(
    model,
    tokenizer,
    behaviours: Sequence[Mapping[str, Any]],
    targets: Mapping[str, str],
    params: Mapping[str, Any],
    seed: int,
    source_model: str,
    out: str | Path,
    fingerprint: Mapping[str, Any],
    meta: Mapping[str, Any],
    where: str = "attacks.gcg",
    chunk: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], Shards | None]:
    """One GCG suffix per behaviour (a seeded subset), optimised on the source model.

    Each behaviour is one shard of ``out`` (rgeom.io.keyed_shards): a behaviour is hours of
    GCG at HarmBench's 500 steps x 512 candidates on a large model, so a kill loses at most
    the one in progress. A fixed design choice, not a setting: a larger shard would only lose
    more. Returns the test cases and the shards, to be finished once ``out`` is written.

    ``chunk=(k, n)`` attacks only every n-th chosen behaviour from the k-th (one SLURM job of
    n; :func:`rgeom.attacks.stages.attack_merge` puts the n parts back in file order).
    Round-robin rather than contiguous: the long contextual behaviours sit together in
    HarmBench's file, and would otherwise all land in one job. Each behaviour keeps its own
    seed, so the merged test cases equal one unchunked job's.
    """
    from rgeom.models import encode_chat

    chosen = select_behaviours(behaviours, params.get("n_behaviors"), seed)
    if not chosen:
        raise RgeomError(f"{where}: no harmful behaviours to attack")
    if chunk is not None:
        chosen = chosen[chunk[0] :: chunk[1]]
        if not chosen:  # more jobs than behaviours: this one has nothing to do
            return [], None
    # Every target is checked before the first shard, so a bad one fails the job at once.
    tgts = [target_for(b, targets, where) for b in chosen]
    attack = _GCGRunner(model, tokenizer, params, seed)

    def one(index: int) -> tuple[pa.Table, None]:
        b, tgt = chosen[index], tgts[index]
        res = attack(b, tgt)
        text = res.user_text
        roundtrip = encode_chat(tokenizer, text).ids == res.prompt_ids
        log.info(
            "GCG %s: loss %.3f -> %.3f%s",
            b["prompt_id"],
            res.initial_loss,
            res.loss,
            "" if roundtrip else " (text re-encodes to other ids)",
        )
        case = _case(
            {**b, "target": tgt},
            "GCG-transfer",
            0,
            text,
            source_model,
            suffix=res.suffix_text,
            loss=res.loss,
            initial_loss=res.initial_loss,
            ids_roundtrip=roundtrip,
        )
        return _test_case_table([case]), None

    tables, _, shards = keyed_shards(
        out,
        {**fingerprint, "targets": tgts},
        [b["prompt_id"] for b in chosen],
        TEST_CASE_SCHEMA,
        one,
        meta,
        desc="GCG behaviours",
    )
    return pa.concat_tables(tables).to_pylist(), shards


# --- AutoDAN -------------------------------------------------------------------------


def autodan_cases(
    model,
    tokenizer,
    behaviours: Sequence[Mapping[str, Any]],
    targets: Mapping[str, str],
    params: Mapping[str, Any],
    seed: int,
    source_model: str,
    out: str | Path,
    fingerprint: Mapping[str, Any],
    meta: Mapping[str, Any],
    prototypes: str | None = None,
    where: str = "attacks.autodan",
) -> tuple[list[dict[str, Any]], dict[str, Any], Shards]:
    """One evolved jailbreak per behaviour (a seeded subset), optimised on the source model.

    ``prototypes`` is a templates JSONL (the same format and ``{behavior}`` check as the
    Templates method); None uses rgeom's own ``autodan_prototypes.jsonl``. Each behaviour is
    one shard of ``out``, as for GCG-transfer; AutoDAN seeds each behaviour from its id
    (rgeom.attacks.autodan.behaviour_rng), so the order of the shards changes nothing.
    Returns the test cases, per behaviour the loss history for the file's provenance (kept
    in each shard's metadata), and the shards, to be finished once ``out`` is written.
    """
    from rgeom.attacks.autodan import PROTOTYPES_FILE, AutoDANSettings, autodan
    from rgeom.judges.refusal import classify

    settings = AutoDANSettings.from_params(params, where)
    chosen = select_behaviours(behaviours, params.get("n_behaviors"), seed)
    if not chosen:
        raise RgeomError(f"{where}: no harmful behaviours to attack")
    protos = load_templates(prototypes or PROTOTYPES_FILE)
    tgts = [target_for(b, targets, where) for b in chosen]

    def refused(text: str) -> bool:
        # The early stop's success test is the embedded judge's: neither refused nor
        # degenerate (an empty or looping reply is no jailbreak).
        verdict = classify(text)
        return verdict.refused or verdict.degenerate

    def one(index: int) -> tuple[pa.Table, dict[str, Any]]:
        b, tgt = chosen[index], tgts[index]
        (res,) = autodan(
            model,
            tokenizer,
            [b],
            [tgt],
            [p["template"] for p in protos],
            settings,
            seed,
            refused=refused,
        )
        log.info(
            "AutoDAN %s: loss %.3f -> %.3f in %d generations%s",
            b["prompt_id"],
            res.initial_loss,
            res.loss,
            res.generations_run,
            " (stopped early: not refused)" if res.stopped_early else "",
        )
        case = _case(
            {**b, "target": tgt},
            "AutoDAN",
            0,
            res.user_text,
            source_model,
            loss=res.loss,
            initial_loss=res.initial_loss,
        )
        history = {
            "losses_per_generation": res.losses_per_generation,
            "generations_run": res.generations_run,
            "stopped_early": res.stopped_early,
            "template": res.template,
        }
        return _test_case_table([case]), history

    tables, histories, shards = keyed_shards(
        out,
        {**fingerprint, "targets": tgts, "prototypes": [p["template"] for p in protos]},
        [b["prompt_id"] for b in chosen],
        TEST_CASE_SCHEMA,
        one,
        meta,
        desc="AutoDAN behaviours",
    )
    history = {b["prompt_id"]: h for b, h in zip(chosen, histories, strict=True)}
    record = {"settings": vars(settings), "prototypes": str(prototypes or PROTOTYPES_FILE)}
    return pa.concat_tables(tables).to_pylist(), {**record, "behaviours": history}, shards


# --- one method, then the combined file ----------------------------------------------


def _test_case_table(cases: Sequence[Mapping[str, Any]]) -> pa.Table:
    rows = [{name: c.get(name) for name in TEST_CASE_SCHEMA.names} for c in cases]
    return pa.Table.from_pylist(rows, schema=TEST_CASE_SCHEMA)


def build_method(
    method: str,
    behaviours_path: str,
    out: str,
    params: Mapping[str, Any],
    seed: int,
    source_model: str,
    meta: Mapping[str, Any],
    model=None,
    tokenizer=None,
    templates: str | None = None,
    targets: str | None = None,
    chunk: tuple[int, int] | None = None,
) -> pa.Table:
    """Write the test cases of one fixed-source method to ``out``.

    ``chunk=(k, n)`` (GCG-transfer only) writes the k-th of n parts of its behaviours.

    ``params`` is the ``attacks`` config section; ``model``/``tokenizer`` are needed only
    by the methods that optimise (GCG-transfer, AutoDAN). For AutoDAN, ``templates`` is
    its prototypes file (None: rgeom's own). The optimising methods resume from the
    per-behaviour shards in ``<out>.parts/`` that a killed run left, when the fingerprint
    (behaviour file hash, targets, source model files, parameters, seed, provenance) matches.
    """
    behaviours = read_behaviours(behaviours_path)
    extra: dict[str, Any] = {}
    shards: Shards | None = None
    resume = {"behaviours_path": behaviours_path, "params": params, "seed": seed, "meta": meta}
    if method == "DirectRequest":
        cases = direct_request_cases(behaviours, source_model)
    elif method == "Templates":
        section = params.get("templates", {})
        cases = template_cases(
            select_behaviours(behaviours, section.get("n_behaviors"), seed),
            load_templates(templates),
            int(section.get("per_behavior", 3)),
            seed,
            source_model,
        )
    elif method == "GCG-transfer":
        if model is None:
            raise RgeomError("GCG-transfer needs a source model (--model)")
        cases, shards = gcg_transfer_cases(
            model,
            tokenizer,
            behaviours,
            load_targets(targets),
            params.get("gcg", {}),
            seed,
            source_model,
            out=out,
            fingerprint=resume_fingerprint(method, source_model=source_model, **resume),
            meta=meta,
            chunk=chunk,
        )
        if chunk is not None:
            extra["chunk"] = list(chunk)
    elif method == "AutoDAN":
        if model is None:
            raise RgeomError("AutoDAN needs a source model (--model)")
        cases, extra["autodan"], shards = autodan_cases(
            model,
            tokenizer,
            behaviours,
            load_targets(targets),
            params.get("autodan", {}),
            seed,
            source_model,
            out=out,
            fingerprint=resume_fingerprint(method, source_model=source_model, **resume),
            meta=meta,
            prototypes=templates,
        )
    else:
        raise RgeomError(f"attack method {method!r} is unknown; choose one of {list(METHODS)}")
    if chunk is not None and method != "GCG-transfer":
        raise RgeomError(f"attack method {method!r} is not split into chunks (GCG-transfer is)")
    table = _test_case_table(cases)
    record = {
        **meta,
        "method": method,
        "behaviours": str(behaviours_path),
        "source_model": source_model,
        "templates": str(templates or TEMPLATES_FILE) if method == "Templates" else None,
        "targets": targets,
        **extra,
    }
    write_table(out, table, TEST_CASE_SCHEMA, record)
    if shards is not None:
        shards.finish()
    log.info("wrote %d %s test cases to %s", table.num_rows, method, out)
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
        filled = _case(by_id[bid], row["method"], i, row["test_case"], row["source_model"])
        # A user file without ids gets ones that name it, so they never collide with ours.
        filled["test_case_id"] = f"{path.name}#{i}"
        filled.update(
            {k: v for k, v in row.items() if k in TEST_CASE_SCHEMA.names and v is not None}
        )
        out.append(filled)
    return _test_case_table(out)


def combine_test_cases(
    parts: Sequence[str], behaviours_path: str, out: str, meta: Mapping[str, Any]
) -> pa.Table:
    """Merge per-method (and user) test-case files into the file the benchmark replays."""
    behaviours = read_behaviours(behaviours_path)
    tables = [read_test_cases(p, behaviours) for p in parts]
    table = pa.concat_tables(tables) if tables else _test_case_table([])
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


def is_test_case_table(table: pa.Table) -> bool:
    return "test_case" in table.column_names and "method" in table.column_names


# --- adaptive GCG ---------------------------------------------------------------------


def adaptive_gcg_search(
    model,
    tokenizer,
    behaviours_path: str,
    out: str,
    params: Mapping[str, Any],
    seed: int,
    arm: str,
    step: int,
    meta: Mapping[str, Any],
    targets: str | None = None,
) -> pa.Table:
    """GCG against this checkpoint on a seeded subset of behaviours: the suffixes.

    ``params`` is ``attacks.adaptive``. The subset depends only on the seed, so every anchor
    is attacked on the same behaviours. Writes ADAPTIVE_CASES_SCHEMA with the exact token ids
    GCG optimised; :func:`adaptive_completions` generates from them (no text round trip).
    Generation settings are not an input: a new ``generate.max_new_tokens`` reruns the
    completions, never the search.

    Each behaviour's GCG result is one shard of ``out`` (as for GCG-transfer), so a killed
    job resumes at the behaviour it was attacking.
    """
    where = "attacks.adaptive"
    behaviours = read_behaviours(behaviours_path)
    chosen = select_behaviours(behaviours, params.get("n_behaviors", 2), seed)
    if not chosen:
        raise RgeomError(f"{behaviours_path}: no harmful behaviours for {where}")
    by_id = load_targets(targets)
    tgts = [target_for(b, by_id, where) for b in chosen]
    attack = _GCGRunner(model, tokenizer, params, seed)

    def one(index: int) -> tuple[pa.Table, None]:
        b = chosen[index]
        r = attack(b, tgts[index])
        log.info("adaptive GCG %s: loss %.3f -> %.3f", b["prompt_id"], r.initial_loss, r.loss)
        row = {
            "behavior_id": b["prompt_id"],
            "suffix": r.suffix_text,
            "test_case": r.user_text,
            "loss": r.loss,
            "initial_loss": r.initial_loss,
            "prompt_ids": r.prompt_ids,
        }
        return pa.Table.from_pylist([row], schema=ADAPTIVE_SHARD_SCHEMA), None

    fingerprint = resume_fingerprint(
        "adaptive_gcg", behaviours_path, params, seed, meta, arm=arm, step=step, targets=tgts
    )
    parts, _, shards = keyed_shards(
        out,
        fingerprint,
        [b["prompt_id"] for b in chosen],
        ADAPTIVE_SHARD_SCHEMA,
        one,
        meta,
        desc="adaptive GCG behaviours",
    )
    results = pa.concat_tables(parts).to_pydict()
    n = len(chosen)
    table = pa.table(
        {
            "arm": [arm] * n,
            "step": [step] * n,
            "behavior_id": [b["prompt_id"] for b in chosen],
            "category": [b["category"] for b in chosen],
            "target": tgts,
            "suffix": results["suffix"],
            "test_case": results["test_case"],
            "loss": results["loss"],
            "initial_loss": results["initial_loss"],
            "prompt_ids": results["prompt_ids"],
        },
        schema=ADAPTIVE_CASES_SCHEMA,
    )
    record = {**meta, "benchmark": ADAPTIVE_BENCHMARK, "targets": targets}
    write_table(out, table, ADAPTIVE_CASES_SCHEMA, record)
    shards.finish()
    return table


ADAPTIVE_AUTODAN_BENCHMARK = "adaptive_autodan"
ADAPTIVE_METHODS = {"gcg": ADAPTIVE_BENCHMARK, "autodan": ADAPTIVE_AUTODAN_BENCHMARK}


def adaptive_autodan_search(
    model,
    tokenizer,
    behaviours_path: str,
    out: str,
    params: Mapping[str, Any],
    autodan: Mapping[str, Any],
    seed: int,
    arm: str,
    step: int,
    meta: Mapping[str, Any],
    targets: str | None = None,
    prototypes: str | None = None,
) -> pa.Table:
    """AutoDAN against this checkpoint on the adaptive subset: the evolved jailbreaks.

    The paper reports that step 50 "remains closed under both adaptive GCG and AutoDAN":
    this is the AutoDAN half, evolved against the checkpoint itself rather than replayed
    from the source model. ``params`` is ``attacks.adaptive`` (its ``n_behaviors`` picks the
    same seeded subset as adaptive GCG); ``autodan`` is ``attacks.autodan`` (population,
    generations, ...). ``suffix`` holds the evolved template, ``test_case`` the user
    message. The search's early stop generates ``attacks.autodan.early_stop_tokens`` tokens
    of its own, so ``generate.max_new_tokens`` (the completions :func:`adaptive_completions`
    writes) is no input here. Writes ADAPTIVE_CASES_SCHEMA, each behaviour one resumable
    shard, as for AutoDAN.
    """
    where = "attacks.adaptive (autodan)"
    behaviours = read_behaviours(behaviours_path)
    section = {**autodan, "n_behaviors": params.get("n_behaviors", 2)}
    fingerprint = resume_fingerprint(
        "adaptive_autodan", behaviours_path, section, seed, meta, arm=arm, step=step
    )
    cases, record, shards = autodan_cases(
        model,
        tokenizer,
        behaviours,
        load_targets(targets),
        section,
        seed,
        str(meta.get("model") or "checkpoint"),
        out=out,
        fingerprint=fingerprint,
        meta=meta,
        prototypes=prototypes,
        where=where,
    )
    history = record["behaviours"]
    n = len(cases)
    table = pa.table(
        {
            "arm": [arm] * n,
            "step": [step] * n,
            "behavior_id": [c["behavior_id"] for c in cases],
            "category": [c["category"] for c in cases],
            "target": [c["target"] for c in cases],
            "suffix": [history[c["behavior_id"]]["template"] for c in cases],
            "test_case": [c["test_case"] for c in cases],
            "loss": [c["loss"] for c in cases],
            "initial_loss": [c["initial_loss"] for c in cases],
            "prompt_ids": [None] * n,
        },
        schema=ADAPTIVE_CASES_SCHEMA,
    )
    record = {
        **meta,
        "benchmark": ADAPTIVE_AUTODAN_BENCHMARK,
        "targets": targets,
        "autodan": record,
    }
    write_table(out, table, ADAPTIVE_CASES_SCHEMA, record)
    shards.finish()
    return table


def adaptive_completions(
    model,
    tokenizer,
    cases: str,
    out: str,
    generate: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> pa.Table:
    """Greedy completions of an adaptive search's test cases (ADAPTIVE_CASES_SCHEMA):
    from GCG's exact ids where the search kept them, else from the test case through the
    chat template. Writes ADAPTIVE_COMPLETION_SCHEMA; the provenance is the search's (its
    benchmark, targets, AutoDAN history) with this stage's laid over it."""
    from rgeom.generation import generate_from_ids
    from rgeom.io import read_meta
    from rgeom.models import encode_chat

    if not Path(cases).exists():
        raise RgeomError(f"missing file: {cases}")
    table = read_table(cases, ADAPTIVE_CASES_SCHEMA)
    ids = table.column("prompt_ids").to_pylist()
    texts = table.column("test_case").to_pylist()
    encoded = [
        i if i is not None else encode_chat(tokenizer, t).ids
        for i, t in zip(ids, texts, strict=True)
    ]
    completions, _, _ = generate_from_ids(
        model,
        tokenizer,
        encoded,
        batch_size=int(generate.get("batch_size", 16)),
        max_new_tokens=int(generate.get("max_new_tokens", 48)),
    )
    found = table.select([n for n in ADAPTIVE_COMPLETION_SCHEMA.names if n != "completion"])
    done = found.append_column(
        ADAPTIVE_COMPLETION_SCHEMA.field("completion"), pa.array(completions, pa.string())
    )
    source = {k: v for k, v in (read_meta(cases) or {}).items() if k != "num_rows"}
    record = {**source, **meta, "cases": str(cases)}
    write_table(out, done, ADAPTIVE_COMPLETION_SCHEMA, record)
    return done


def judge_adaptive(
    completions: str,
    out: str,
    metrics_out: str | None,
    judge: Mapping[str, Any],
    seed: int,
    meta: Mapping[str, Any],
    prompts: str | None = None,
    benchmark: str = ADAPTIVE_BENCHMARK,
    loader=None,
) -> pa.Table:
    """Label adaptive-attack completions with the configured judge; write ADAPTIVE_SCHEMA
    and, with ``metrics_out``, the ASR (:func:`adaptive_metrics_table`).

    The labels come from :func:`rgeom.judges.label_completions`, the judge stage's own path:
    with ``judge.harmbench: harmbench_classifier`` the classifier decides success (reading
    the original behaviour and context from ``prompts``), else the embedded matcher. The
    workflow computes the metrics in a job of its own, so ``judge.bootstrap`` never reruns
    a judge model.
    """
    from rgeom.judges import JUDGE_NAME, attack_success, bootstrap_count, label_completions

    n_boot = bootstrap_count(dict(judge)) if metrics_out is not None else None
    if not Path(completions).exists():
        raise RgeomError(f"missing file: {completions}")
    table = read_table(completions, ADAPTIVE_COMPLETION_SCHEMA)
    steps = set(table.column("step").to_pylist())
    arms = set(table.column("arm").to_pylist())
    if len(steps) != 1 or len(arms) != 1:
        raise RgeomError(f"{completions}: expected one (arm, step), got {arms} x {steps}")
    arm, step = arms.pop(), int(steps.pop())
    generations = as_generations(table, benchmark)
    labels, judges = label_completions(generations, completions, dict(judge), prompts, loader)
    success = [bool(s) for s in attack_success(labels)]
    cols = labels.to_pydict()
    labelled = table.select(ADAPTIVE_COMPLETION_SCHEMA.names)
    for field, values in (
        ("judge", cols["judge"]),
        ("refusal", cols["refusal"]),
        ("refused", cols["refused"]),
        ("degenerate", cols["degenerate"]),
        # A copyright behaviour the classifier leaves out counts as no success here and is
        # left out of the ASR.
        ("success", success),
        ("verdict", cols["verdict"]),
        ("excluded", cols["excluded"]),
    ):
        field = ADAPTIVE_SCHEMA.field(field)
        labelled = labelled.append_column(field, pa.array(values, field.type))
    name = "+".join([judge.get("name", JUDGE_NAME), *judges])
    record = {**meta, "arm": arm, "step": step, "benchmark": benchmark, "judge": name}
    record["source"] = str(completions)
    write_table(out, labelled, ADAPTIVE_SCHEMA, record)
    if n_boot is not None:
        adaptive_metrics_table(out, metrics_out, n_boot, seed, {})
    return labelled


def as_generations(table: pa.Table, benchmark: str) -> pa.Table:
    """Adaptive completions (ADAPTIVE_COMPLETION_SCHEMA) as the generation columns a judge
    reads: each behaviour a harmful prompt whose test case is the prompt."""
    n = table.num_rows
    return pa.table(
        {
            "prompt_id": table.column("behavior_id"),
            "label": ["harmful"] * n,
            "category": table.column("category"),
            "prompt": table.column("test_case"),
            "target": table.column("target"),
            "completion": table.column("completion"),
            "arm": table.column("arm"),
            "step": table.column("step"),
            "benchmark": [benchmark] * n,
        }
    )


ADAPTIVE_METRICS = ("asr", "n_classifier_invalid", "n_copyright_excluded")


def adaptive_metrics_table(
    labelled: str, out: str, bootstrap: int, seed: int, meta: Mapping[str, Any]
) -> pa.Table:
    """The ASR of judged adaptive-attack completions (ADAPTIVE_SCHEMA) as a metrics table.

    The judges' METRIC_SCHEMA (``benchmark``, metric ``asr`` and, with the classifier, its
    ``n_`` counts), so the summary shows ``{benchmark}.asr`` like any benchmark metric. One
    test case per behaviour: the per-behaviour mean is the success. The labels' metadata
    (benchmark, judge) carries over; ``meta`` is laid over it.
    """
    from rgeom.io import read_meta
    from rgeom.judges import METRIC_SCHEMA, bootstrap_count, compute_metrics

    bootstrap = bootstrap_count({"bootstrap": bootstrap})
    if not Path(labelled).exists():
        raise RgeomError(f"missing file: {labelled}")
    table = read_table(labelled, ADAPTIVE_SCHEMA)
    source = {k: v for k, v in (read_meta(labelled) or {}).items() if k != "num_rows"}
    benchmark = source.get("benchmark") or ADAPTIVE_BENCHMARK
    n = table.num_rows
    # The label columns compute_metrics reads, as the judge's label table has them.
    labels = pa.table(
        {
            "prompt_id": table.column("behavior_id"),
            "label": ["harmful"] * n,
            "category": table.column("category"),
            "judge": table.column("judge"),
            "refusal": table.column("refusal"),
            "refused": table.column("refused"),
            "degenerate": table.column("degenerate"),
            "verdict": table.column("verdict"),
            "excluded": table.column("excluded"),
            "arm": table.column("arm"),
            "step": table.column("step"),
            "benchmark": [benchmark] * n,
            "has_target": [False] * n,
            "correct": pa.nulls(n, pa.bool_()),
        }
    )
    metrics = compute_metrics(labels, bootstrap, seed)
    keep = pa.array([m in ADAPTIVE_METRICS for m in metrics.column("metric").to_pylist()])
    metrics = metrics.filter(keep)
    record = {**source, **meta, "bootstrap": bootstrap, "labels": str(labelled)}
    write_table(out, metrics, METRIC_SCHEMA, record)
    by_metric = dict(zip(*metrics.select(["metric", "value"]).to_pydict().values(), strict=True))
    arm, step = source.get("arm"), source.get("step")
    log.info(
        "%s %s step %s: ASR %s over %d behaviours (%s)",
        benchmark,
        arm,
        step,
        by_metric.get("asr"),
        n,
        source.get("judge"),
    )
    return metrics
