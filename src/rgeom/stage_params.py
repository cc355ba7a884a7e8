"""Which config keys a stage's results depend on.

Snakemake reruns a job when its tracked parameters change, so these functions decide which
config edits rerun which jobs. They are research decisions (does ``train.max_steps``
change a checkpoint at step 6?), so they live here, unit-tested without Snakemake
(``tests/test_stage_params.py``), and ``workflow/rules/common.smk`` only calls them.
``tests/test_caching.py`` checks the resulting rerun sets on a real workflow. Imports no
torch: Snakemake loads this while parsing the DAG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rgeom.config import schema_default

#: The model keys that change what a model computes; threads and paths do not.
MODEL_RESULT_KEYS = ("dtype", "device", "trust_remote_code")
#: Schedules whose learning rate at step t does not depend on the total number of steps.
STEP_INDEPENDENT_SCHEDULES = ("constant", "constant_with_warmup")
#: Training keys that change how often state is saved, never what is trained.
NON_RESULT_TRAIN_KEYS = ("save_every", "save_margin_s")
#: R2D2 keys naming shared files: tracked by the files' content, not by their paths.
R2D2_FILE_KEYS = ("behaviours", "targets")


def model_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` keys every model job depends on."""
    return {k: cfg["model"][k] for k in MODEL_RESULT_KEYS}


def training_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` keys a checkpoint at any step depends on.

    ``max_steps`` only matters under a decaying schedule; dropping it otherwise is what lets
    a later anchor (and a larger ``max_steps``) reuse the earlier segments.
    """
    settings = {k: v for k, v in train.items() if k not in NON_RESULT_TRAIN_KEYS}
    schedule = settings.get("lr_scheduler", schema_default("train.lr_scheduler"))
    if schedule in STEP_INDEPENDENT_SCHEDULES:
        settings.pop("max_steps", None)
    return settings


def train_params(cfg: Mapping[str, Any], arm: str, step: int) -> dict[str, Any]:
    """One training segment's parameters: the setup and its own anchor, not the others, so
    a new anchor leaves the earlier segments (and their cells) up to date. Only the r2d2 arm
    carries the ``r2d2`` section: tuning R2D2 never retrains the SFT arm. The R2D2 files'
    content is the caller's to add (it needs their digests)."""
    sections: dict[str, Any] = {
        "model": model_params(cfg),
        "train": training_settings(cfg["train"]),
        "anchors": [int(step)],
    }
    if arm == "r2d2":
        sections["r2d2"] = {k: v for k, v in cfg["r2d2"].items() if k not in R2D2_FILE_KEYS}
    return sections


def params_json(cfg: Mapping[str, Any], **sections: Any) -> str:
    """A stage's parameters as canonical JSON, the seed first among equals: the string
    Snakemake tracks, so a job reruns exactly when it changes."""
    return json.dumps({"seed": cfg["seed"], **sections}, sort_keys=True)


def as_list(value: Any) -> list[Any]:
    """A config value that may be one item, a list, or null, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --- generation and judging ---------------------------------------------------------

#: generate keys that change memory use and speed only, never a table (generation is
#: greedy; shards do not change results): left out of every tracked key.
GENERATE_PERF = ("batch_size", "shard_size")
#: judge keys that change speed and memory only, never a label: left out of tracked keys.
JUDGE_PERF = ("batch_size",)


def generate_settings(cfg: Mapping[str, Any], perf: bool = True) -> dict[str, Any]:
    gen = cfg["generate"]
    return dict(gen) if perf else {k: v for k, v in gen.items() if k not in GENERATE_PERF}


def generate_params(
    cfg: Mapping[str, Any], arm: str, step: int, benchmark: str, perf: bool = True
) -> str:
    """One generate cell's parameters; perf=False leaves out GENERATE_PERF (the key)."""
    return params_json(
        cfg,
        model=model_params(cfg),
        generate=generate_settings(cfg, perf),
        arm=arm,
        step=int(step),
        benchmark=benchmark,
    )


def judge_params(cfg: Mapping[str, Any], perf: bool = True) -> dict[str, Any]:
    """The judge section a scoring job consumes: judge.bootstrap only sizes the metrics'
    intervals (rules metrics, adaptive_metrics), so a new count reruns no judge model.
    ``perf=False`` also leaves out JUDGE_PERF: the tracked ``key`` of a scoring rule.
    """
    drop = {"bootstrap", *(() if perf else JUDGE_PERF)}
    return {k: v for k, v in cfg["judge"].items() if k not in drop}


def metrics_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics rules read labels, not completions: the bootstrap count is all they add."""
    return {"bootstrap": cfg["judge"]["bootstrap"]}


def model_judges(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """{judge name: model spec} of every model judge the config switches on."""
    judge = cfg["judge"]
    out = {}
    if judge["harmbench"] == "harmbench_classifier":
        out["harmbench_classifier"] = judge["harmbench_model"]
    if judge["xstest"] == "xstest_llm":
        out["xstest_llm"] = judge["xstest_model"]
    if judge["strongreject"] != "none":
        out[f"strongreject_{judge['strongreject']}"] = judge["strongreject_model"]
    return out


# --- data and analysis ----------------------------------------------------------------


def prepare_data_params(
    cfg: Mapping[str, Any], dataset: str, source: Mapping[str, str] | None = None
) -> str:
    """One set's spec. Tracked (``source``: the digests of its shared file), the file's
    content stands in for data.shared_dir, so moving the data folder reruns nothing."""
    sections: dict[str, Any] = {
        "spec": cfg["data"]["sets"][dataset],
        "max_prompt_tokens": cfg["data"]["max_prompt_tokens"],
    }
    if source is not None:
        sections["source"] = dict(source)
    else:
        sections["shared_dir"] = cfg["data"]["shared_dir"]
    return params_json(cfg, **sections)


def interventions_params(cfg: Mapping[str, Any], arm: str, step: int, perf: bool = True) -> str:
    return params_json(
        cfg,
        model=model_params(cfg),
        carrier=cfg.get("carrier", {}),
        interventions=cfg["interventions"],
        judge=judge_params(cfg, perf),
        arm=arm,
        step=int(step),
    )


def r2d2_files(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """The R2D2 pool's shared files: HarmBench CSVs + targets JSONs (lists, the reference
    pool reads two of each), as the config names them; [] when train_harmful's targets
    are the pool."""
    r2d2 = cfg["r2d2"]
    behaviours = as_list(r2d2["behaviours"])
    return {
        "r2d2_behaviours": behaviours,
        "r2d2_targets": as_list(r2d2["targets"]) if behaviours else [],
    }


# --- attacks --------------------------------------------------------------------------


def gcg_params(
    cfg: Mapping[str, Any], chunk: int | None = None, targets: Mapping[str, str] | None = None
) -> str:
    """GCG-transfer's parameters; a chunk job adds [k, n] and the targets file's digest.
    attacks.gcg.jobs itself is left out, so the merged table's provenance equals one
    unchunked job's."""
    attacks = cfg["attacks"]
    gcg = {k: v for k, v in attacks["gcg"].items() if k not in ("targets", "jobs")}
    sections: dict[str, Any] = {
        "model": model_params(cfg),
        "attacks": {"source_model": attacks["source_model"], "gcg": gcg},
    }
    if chunk is not None:
        sections["chunk"] = [chunk, attacks["gcg"]["jobs"]]
        sections["targets"] = dict(targets or {})
    return params_json(cfg, **sections)


def attack_params(cfg: Mapping[str, Any], method: str) -> str:
    section: dict[str, Any] = {"source_model": cfg["attacks"]["source_model"]}
    if method == "Templates":
        section["templates"] = cfg["attacks"]["templates"]
    return params_json(cfg, attacks=section)


def adaptive_params(cfg: Mapping[str, Any], arm: str, step: int, targets: Mapping[str, str]) -> str:
    """Adaptive GCG's search: no generation setting, so a new generation length reruns
    only adaptive_generate (and what reads it), never the hours of GCG."""
    adaptive = {k: v for k, v in cfg["attacks"]["adaptive"].items() if k != "enabled"}
    return params_json(
        cfg,
        model=model_params(cfg),
        attacks={"adaptive": adaptive},
        arm=arm,
        step=int(step),
        targets=dict(targets),
    )


def adaptive_autodan_params(cfg: Mapping[str, Any], arm: str, step: int) -> str:
    """Adaptive AutoDAN's search: its early stop generates attacks.autodan.early_stop_tokens
    of its own, so generate.* is no input (as for adaptive GCG)."""
    attacks = cfg["attacks"]
    return params_json(
        cfg,
        model=model_params(cfg),
        attacks={
            "adaptive": {"n_behaviors": attacks["adaptive"]["n_behaviors"]},
            "autodan": {k: v for k, v in attacks["autodan"].items() if k != "prototypes"},
        },
        arm=arm,
        step=int(step),
    )


def adaptive_generate_params(
    cfg: Mapping[str, Any], arm: str, step: int, attack: str, perf: bool = True
) -> str:
    """The adaptive completions' settings: always rgeom's HF generation (GCG's exact ids),
    so the length alone is tracked; batch_size (perf=True) only sizes batches."""
    keys = ("max_new_tokens", "batch_size") if perf else ("max_new_tokens",)
    return params_json(
        cfg,
        model=model_params(cfg),
        generate={k: cfg["generate"][k] for k in keys},
        arm=arm,
        step=int(step),
        attack=attack,
    )


def attack_autodan_params(cfg: Mapping[str, Any]) -> str:
    """AutoDAN on the source model: its settings but not the prototypes file's path (the
    file is an input, tracked by Snakemake itself)."""
    attacks = cfg["attacks"]
    return params_json(
        cfg,
        model=model_params(cfg),
        attacks={
            "source_model": attacks["source_model"],
            "autodan": {k: v for k, v in attacks["autodan"].items() if k != "prototypes"},
        },
    )


# --- the remaining stages ---------------------------------------------------------------

#: The train keys the SFT data depend on: the refusals and how the utility answers are made.
SFT_DATA_TRAIN_KEYS = ("refusals", "utility_source", "helpful_max_new_tokens")


def prepare_model_params(cfg: Mapping[str, Any]) -> str:
    return params_json(cfg, model=cfg["model"])


def sft_data_params(cfg: Mapping[str, Any], perf: bool = True) -> str:
    """The SFT set's parameters; generate.batch_size (perf=True) only sizes the batches of
    the self-distilled answers."""
    sections: dict[str, Any] = {
        "model": model_params(cfg),
        "train": {k: cfg["train"][k] for k in SFT_DATA_TRAIN_KEYS},
    }
    if perf:
        sections["generate"] = {"batch_size": cfg["generate"]["batch_size"]}
    return params_json(cfg, **sections)


def extract_params(cfg: Mapping[str, Any], arm: str, step: int, base: str) -> str:
    """Activation capture. Baseline refusal scores are computed only where Arditi's prompt
    filter is decided: on the source model (``arm == base``)."""
    return params_json(
        cfg,
        model=model_params(cfg),
        activations=cfg["activations"],
        carrier={"filter_prompts": cfg["carrier"]["filter_prompts"] and arm == base},
        arm=arm,
        step=int(step),
    )


def prompt_filter_params(cfg: Mapping[str, Any]) -> str:
    return params_json(cfg, carrier={"min_prompts": cfg["carrier"]["min_prompts"]})


def carrier_params(cfg: Mapping[str, Any], arm: str, step: int) -> str:
    """The carrier search of one cell, and the cross-anchor transfer onto it."""
    return params_json(
        cfg,
        model=model_params(cfg),
        carrier=cfg.get("carrier", {}),
        arm=arm,
        step=int(step),
    )


def drift_params(cfg: Mapping[str, Any]) -> str:
    return params_json(
        cfg,
        arms=cfg["arms"],
        anchors=cfg["anchors"],
        drift=cfg.get("drift", {}),
        summary=cfg["summary"],
    )


def utility_shift_params(cfg: Mapping[str, Any], arm: str, step: int) -> str:
    return params_json(
        cfg,
        model=model_params(cfg),
        utility_shift=cfg["utility_shift"],
        arm=arm,
        step=int(step),
    )


def interventions_summary_params(cfg: Mapping[str, Any]) -> str:
    return params_json(cfg, arms=cfg["arms"], summary=cfg["summary"])


def summary_params(cfg: Mapping[str, Any]) -> str:
    return params_json(
        cfg,
        arms=cfg["arms"],
        anchors=cfg["anchors"],
        benchmarks=cfg["benchmarks"],
        summary=cfg["summary"],
    )


def judge_json(cfg: Mapping[str, Any], perf: bool = True) -> str:
    """A scoring job's parameters (rules judge and adaptive_judge)."""
    return params_json(cfg, judge=judge_params(cfg, perf))


def metrics_json(cfg: Mapping[str, Any]) -> str:
    return params_json(cfg, judge=metrics_params(cfg))


def validate_params(cfg: Mapping[str, Any], perf: bool = True) -> str:
    """Judge validation: judge.bootstrap sizes no interval here and judge.batch_size
    (perf=True) only sizes batches."""
    return params_json(cfg, judge=judge_params(cfg, perf), validate=cfg["validate"])


def tracked_params(
    cfg: Mapping[str, Any],
    arm: str = "sft",
    step: int = 1,
    benchmark: str = "harmbench",
    attack: str = "gcg",
    base: str = "base",
) -> dict[str, str]:
    """{rule: the parameters Snakemake tracks for its job in one cell}: the ``key`` param
    where a rule has one, else its ``json``. Two configs rerun exactly the rules whose
    entries differ (and what reads their outputs); ``tests/test_stage_params.py`` checks
    these sets fast, ``tests/test_caching.py`` on a real workflow. Shared files are tracked
    by content, which the workflow adds (left empty here)."""
    no_files: dict[str, str] = {}
    return {
        "prepare_model": prepare_model_params(cfg),
        "prepare_data": prepare_data_params(cfg, benchmark, source=no_files),
        "sft_data": sft_data_params(cfg, perf=False),
        "train": params_json(cfg, **train_params(cfg, arm, step)),
        "generate": generate_params(cfg, arm, step, benchmark, perf=False),
        "judge": judge_json(cfg, perf=False),
        "metrics": metrics_json(cfg),
        "validate_judges": validate_params(cfg, perf=False),
        "utility_shift": utility_shift_params(cfg, arm, step),
        "extract_activations": extract_params(cfg, arm, step, base),
        "prompt_filter": prompt_filter_params(cfg),
        "carriers": carrier_params(cfg, arm, step),
        "cross_anchor": carrier_params(cfg, arm, step),
        "interventions": interventions_params(cfg, arm, step, perf=False),
        "interventions_summary": interventions_summary_params(cfg),
        "drift": drift_params(cfg),
        "summary": summary_params(cfg),
        "attack": attack_params(cfg, "Templates"),
        "attack_gcg": gcg_params(cfg, 0, targets=no_files),
        "attack_autodan": attack_autodan_params(cfg),
        "adaptive_gcg": adaptive_params(cfg, arm, step, targets=no_files),
        "adaptive_autodan": adaptive_autodan_params(cfg, arm, step),
        "adaptive_generate": adaptive_generate_params(cfg, arm, step, attack, perf=False),
        "adaptive_judge": judge_json(cfg, perf=False),
        "adaptive_metrics": metrics_json(cfg),
    }
