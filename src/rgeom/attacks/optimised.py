"""Test cases of the methods that optimise against the source model: GCG-transfer, AutoDAN.

Each takes minutes to hours per behaviour, so each finished behaviour is one shard of the
output (:func:`rgeom.io.keyed_shards`) and a rerun after a kill attacks only the behaviours
still missing. Every behaviour is seeded from ``(seed, behaviour id)`` alone, so a resumed
run writes the same bytes as an undisturbed one.

The attack engines (:mod:`rgeom.attacks.gcg`, :mod:`rgeom.attacks.autodan`) import torch;
they are imported inside the functions that run them, so that the model-free attack stages
can import this module without it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rgeom.attacks.behaviours import select_behaviours, target_for
from rgeom.attacks.cases import case_row, cases_table
from rgeom.attacks.templates import load_templates
from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.io import Shards, keyed_shards
from rgeom.judges.refusal import classify
from rgeom.models import encode_chat
from rgeom.schemas import TEST_CASE_SCHEMA

if TYPE_CHECKING:
    from rgeom.attacks.autodan import AutoDANSearch
    from rgeom.attacks.gcg import GCGResult, GCGSettings

log = logging.getLogger(__name__)

DEFAULT_INIT_SUFFIX = schema_default("attacks.gcg.init_suffix")


@dataclass(frozen=True)
class AttackJob:
    """One optimising attack's job, the same for GCG-transfer and AutoDAN.

    ``behaviours`` are the rows a seeded subset is picked from, ``targets`` their targets
    by behaviour id (:func:`~rgeom.attacks.behaviours.load_gcg_targets`); ``params`` is the
    method's config section and ``seed`` the run's; ``source_model`` names the model in each
    test case. The cases are sharded into ``out``, resumed when ``fingerprint`` matches, with
    ``meta`` as the shards' provenance.
    """

    behaviours: Sequence[Mapping[str, Any]]
    targets: Mapping[str, str]
    params: Mapping[str, Any]
    seed: int
    source_model: str
    out: str | Path
    fingerprint: Mapping[str, Any]
    meta: Mapping[str, Any]


# --- GCG ----------------------------------------------------------------------------


def _gcg_settings(params: Mapping[str, Any], section: str) -> GCGSettings:
    """The :func:`rgeom.attacks.gcg.gcg` settings an ``attacks.gcg``-like config section
    (``section``: ``"attacks.gcg"`` or ``"attacks.adaptive"``) sets, its defaults where absent."""
    from rgeom.attacks.gcg import GCGSettings

    def value(key: str) -> Any:
        return params[key] if key in params else schema_default(f"{section}.{key}")

    return GCGSettings(
        steps=int(value("steps")),
        search_width=int(value("search_width")),
        topk=int(value("topk")),
        batch_size=value("batch_size"),
        init_suffix=value("init_suffix") or DEFAULT_INIT_SUFFIX,
        screen_dtype=value("screen_dtype"),
        rescore_top=int(value("rescore_top")),
    )


def behaviour_seed(seed: int, behaviour_id: str) -> int:
    """GCG's sampling seed for one behaviour, derived from the run's seed and its id.

    One seed per behaviour rather than one random stream for the whole run: a behaviour's
    suffix then depends neither on how many behaviours were attacked before it (a run
    resumed from shards equals an undisturbed one) nor on which others are attacked.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00gcg\x00{behaviour_id}".encode()).digest()
    # 63 bits: any value torch.Generator.manual_seed accepts.
    return int.from_bytes(digest[:8], "little") >> 1


class GCGRunner:
    """GCG on one behaviour at a time, each with its own :func:`behaviour_seed`."""

    def __init__(
        self, model, tokenizer, params: Mapping[str, Any], seed: int, section: str = "attacks.gcg"
    ):
        from rgeom.attacks.gcg import _vocab_size, ascii_token_ids

        self.model, self.tokenizer, self.seed = model, tokenizer, int(seed)
        self.settings = _gcg_settings(params, section)
        # The allowed tokens decode the whole vocabulary: once per stage, not per behaviour.
        self.allowed = ascii_token_ids(tokenizer, _vocab_size(model))

    def __call__(self, behaviour: Mapping[str, Any], target: str) -> GCGResult:
        from rgeom.attacks.gcg import gcg

        (result,) = gcg(
            self.model,
            self.tokenizer,
            [behaviour["message"]],
            [target],
            self.settings,
            seed=behaviour_seed(self.seed, behaviour["prompt_id"]),
            allowed_tokens=self.allowed,
        )
        return result


def _gcg_transfer_case(
    attack: GCGRunner, behaviour: Mapping[str, Any], target: str, source_model: str
) -> dict[str, Any]:
    """GCG on one behaviour as its GCG-transfer test case, the text round trip re-checked."""
    res = attack(behaviour, target)
    text = res.user_text
    roundtrip = encode_chat(attack.tokenizer, text).ids == res.prompt_ids
    log.info(
        "GCG %s: loss %.3f -> %.3f%s",
        behaviour["prompt_id"],
        res.initial_loss,
        res.loss,
        "" if roundtrip else " (text re-encodes to other ids)",
    )
    return case_row(
        {**behaviour, "target": target},
        "GCG-transfer",
        0,
        text,
        source_model,
        suffix=res.suffix_text,
        loss=res.loss,
        initial_loss=res.initial_loss,
        ids_roundtrip=roundtrip,
    )


def gcg_transfer_cases(
    model,
    tokenizer,
    job: AttackJob,
    where: str = "attacks.gcg",
    chunk: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], Shards | None]:
    """One GCG suffix per behaviour (a seeded subset), optimised on the source model.

    Each behaviour is one shard of ``job.out`` (rgeom.io.keyed_shards): a behaviour is hours of
    GCG at HarmBench's 500 steps x 512 candidates on a large model, so a kill loses at most
    the one in progress. A fixed design choice, not a setting: a larger shard would only lose
    more. Returns the test cases and the shards, to be finished once ``job.out`` is written.

    ``chunk=(k, n)`` attacks only every n-th chosen behaviour from the k-th (one SLURM job of
    n; :func:`rgeom.attacks.stages.attack_merge` puts the n parts back in file order).
    Round-robin rather than contiguous: the long contextual behaviours sit together in
    HarmBench's file, and would otherwise all land in one job. Each behaviour keeps its own
    seed, so the merged test cases equal one unchunked job's.
    """
    chosen = select_behaviours(job.behaviours, job.params.get("n_behaviors"), job.seed)
    if not chosen:
        raise RgeomError(f"{where}: no harmful behaviours to attack")
    if chunk is not None:
        chosen = chosen[chunk[0] :: chunk[1]]
        if not chosen:  # more jobs than behaviours: this one has nothing to do
            return [], None
    # Every target is checked before the first shard, so a bad one fails the job at once.
    tgts = [target_for(b, job.targets, where) for b in chosen]
    attack = GCGRunner(model, tokenizer, job.params, job.seed)

    def one(index: int) -> tuple[pa.Table, None]:
        case = _gcg_transfer_case(attack, chosen[index], tgts[index], job.source_model)
        return cases_table([case]), None

    tables, _, shards = keyed_shards(
        job.out,
        {**job.fingerprint, "targets": tgts},
        [b["prompt_id"] for b in chosen],
        TEST_CASE_SCHEMA,
        one,
        job.meta,
        desc="GCG behaviours",
    )
    return pa.concat_tables(tables).to_pylist(), shards


# --- AutoDAN -------------------------------------------------------------------------


def refused_or_degenerate(text: str) -> bool:
    """AutoDAN's early-stop test: the embedded judge's negation of a jailbreak, neither
    refused nor degenerate (an empty or looping reply is no jailbreak)."""
    verdict = classify(text)
    return verdict.refused or verdict.degenerate


def _autodan_case(
    model,
    tokenizer,
    behaviour: Mapping[str, Any],
    target: str,
    search: AutoDANSearch,
    source_model: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """AutoDAN on one behaviour: its test case and its loss history for the provenance."""
    from rgeom.attacks.autodan import autodan

    (res,) = autodan(model, tokenizer, [behaviour], [target], search)
    log.info(
        "AutoDAN %s: loss %.3f -> %.3f in %d generations%s",
        behaviour["prompt_id"],
        res.initial_loss,
        res.loss,
        res.generations_run,
        " (stopped early: not refused)" if res.stopped_early else "",
    )
    case = case_row(
        {**behaviour, "target": target},
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
    return case, history


def autodan_cases(
    model,
    tokenizer,
    job: AttackJob,
    prototypes: str | None = None,
    where: str = "attacks.autodan",
) -> tuple[list[dict[str, Any]], dict[str, Any], Shards]:
    """One evolved jailbreak per behaviour (a seeded subset), optimised on the source model.

    ``prototypes`` is a templates JSONL (the same format and ``{behavior}`` check as the
    Templates method); None uses rgeom's own ``autodan_prototypes.jsonl``. Each behaviour is
    one shard of ``job.out``, as for GCG-transfer; AutoDAN seeds each behaviour from its id
    (rgeom.attacks.autodan.behaviour_rng), so the order of the shards changes nothing.
    Returns the test cases, per behaviour the loss history for the file's provenance (kept
    in each shard's metadata), and the shards, to be finished once ``job.out`` is written.
    """
    from rgeom.attacks.autodan import PROTOTYPES_FILE, AutoDANSearch, AutoDANSettings

    settings = AutoDANSettings.from_params(job.params, where)
    chosen = select_behaviours(job.behaviours, job.params.get("n_behaviors"), job.seed)
    if not chosen:
        raise RgeomError(f"{where}: no harmful behaviours to attack")
    protos = [p["template"] for p in load_templates(prototypes or PROTOTYPES_FILE)]
    tgts = [target_for(b, job.targets, where) for b in chosen]
    search = AutoDANSearch(protos, settings, job.seed, refused=refused_or_degenerate)

    def one(index: int) -> tuple[pa.Table, dict[str, Any]]:
        case, history = _autodan_case(
            model, tokenizer, chosen[index], tgts[index], search, job.source_model
        )
        return cases_table([case]), history

    tables, histories, shards = keyed_shards(
        job.out,
        {**job.fingerprint, "targets": tgts, "prototypes": protos},
        [b["prompt_id"] for b in chosen],
        TEST_CASE_SCHEMA,
        one,
        job.meta,
        desc="AutoDAN behaviours",
    )
    history = {b["prompt_id"]: h for b, h in zip(chosen, histories, strict=True)}
    record = {"settings": vars(settings), "prototypes": str(prototypes or PROTOTYPES_FILE)}
    return pa.concat_tables(tables).to_pylist(), {**record, "behaviours": history}, shards
