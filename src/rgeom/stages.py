"""Glue between the CLI and the concern modules.

Each function here is one ``rgeom`` subcommand: it unpacks ``params`` (the JSON Snakemake
passes), seeds everything, loads what it needs and calls into the module that owns the
logic. Provenance fields common to every output are assembled here.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rgeom.errors import RgeomError
from rgeom.io import config_hash, provenance, read_meta

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. A stage that has not imported torch yet does not pay
    for the import here (2-3 s): torch is seeded the moment its package has executed,
    before any code can draw from its generator, which leaves the state eager seeding
    leaves."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            spec = importlib.util.find_spec("torch")
        except ImportError:
            return
        if spec is None:
            return
        if type(spec.loader) is importlib.machinery.SourceFileLoader:
            for finder in sys.meta_path:
                if isinstance(finder, _SeedTorchOnImport):
                    finder.seed = seed
                    return
            sys.meta_path.insert(0, _SeedTorchOnImport(seed))
            return
        import torch
    torch.manual_seed(seed)


class _SeedTorchOnImport(importlib.abc.MetaPathFinder):
    """Hands torch's own spec back with a loader that calls ``torch.manual_seed`` right
    after the package executes; finds nothing else, and leaves ``sys.meta_path`` then."""

    def __init__(self, seed: int):
        self.seed = seed

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _SeedingLoader(spec.loader.name, spec.loader.path, self.seed)
        return spec


class _SeedingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, name: str, path: str, seed: int):
        super().__init__(name, path)
        self.seed = seed

    def exec_module(self, module) -> None:
        super().exec_module(module)
        module.manual_seed(self.seed)


def _meta(params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return provenance(config_hash=config_hash(params), seed=params.get("seed"), **fields)


def _model_settings(params: dict[str, Any]) -> dict[str, Any]:
    model = params.get("model", {})
    return {
        "dtype": model.get("dtype", "float32"),
        "device": model.get("device", "auto"),
        "trust_remote_code": model.get("trust_remote_code", False),
    }


def _load(model_dir: str, params: dict[str, Any]):
    from rgeom.models import load_model, load_tokenizer, resolve_device

    settings = _model_settings(params)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=settings["trust_remote_code"])
    model = load_model(
        model_dir,
        dtype=settings["dtype"],
        device=resolve_device(settings["device"]),
        trust_remote_code=settings["trust_remote_code"],
    )
    return model, tokenizer


def prepare_model(out: str, params: dict[str, Any]) -> None:
    from rgeom.models import prepare_model as _prepare

    seed_everything(params.get("seed", 0))
    model = params.get("model", {})
    _prepare(
        source=model.get("source", "smollm2_gguf"),
        out_dir=out,
        path=model.get("path"),
        gguf_file=model.get("gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        dtype=model.get("dtype", "float32"),
        trust_remote_code=model.get("trust_remote_code", False),
        seed=params.get("seed", 0),
        chat_template=model.get("chat_template"),
    )
    log.info("model ready at %s", out)


def prepare_data(name: str, out: str, tokenizer: str | None, params: dict[str, Any]) -> None:
    from rgeom.data import prepare_set

    seed_everything(params.get("seed", 0))
    if not isinstance(params.get("spec"), dict):
        raise RgeomError(f"--params: key 'spec' (the dataset spec of set {name!r}) is required")
    tok = None
    if tokenizer:
        from rgeom.models import load_plain_tokenizer, load_tokenizer

        # Only token counts are needed: tokenizer.json read directly spares the job
        # importing torch and transformers where that gives transformers' ids.
        tok = load_plain_tokenizer(tokenizer) or load_tokenizer(tokenizer)
    prepare_set(
        name=name,
        spec=params["spec"],
        shared_dir=params.get("shared_dir", "../shared/data"),
        seed=params.get("seed", 0),
        out=out,
        meta=_meta(params, dataset=name),
        tokenizer=tok,
        max_prompt_tokens=params.get("max_prompt_tokens", 2048),
    )


def sft_data(model: str, harmful: str, harmless: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.train.data import build_sft_data

    seed_everything(params.get("seed", 0))
    lm = tokenizer = None
    # The reference's utility data are the set's own answers: no model to load.
    if params.get("train", {}).get("utility_source", "dataset") == "self_distill":
        lm, tokenizer = _load(model, params)
    build_sft_data(
        model=lm,
        tokenizer=tokenizer,
        harmful=harmful,
        harmless=harmless,
        out=out,
        params=params,
        meta=_meta(params, model=model),
    )


def train(
    arm: str,
    model: str,
    data: str,
    out_dir: str,
    state_dir: str,
    log_table: str | None,
    extra: list[tuple[str, str]],
    params: dict[str, Any],
    time_limit_min: float | None = None,
    save_every: int | None = None,
) -> None:
    import os

    from rgeom.train import train_arm

    seed_everything(params.get("seed", 0))
    _model_settings(params)
    if save_every is not None:
        # Passed beside --params: how often state is saved changes no result, so the
        # workflow keeps it out of the job's parameters (no rerun when it changes).
        params = {**params, "train": {**params.get("train", {}), "save_every": save_every}}
    # Only SLURM enforces the limit; a workstation run with the rule's runtime must not stop.
    limit = time_limit_min * 60 if time_limit_min and os.environ.get("SLURM_JOB_ID") else None
    train_arm(
        arm=arm,
        model_dir=model,
        data=data,
        out_dir=out_dir,
        state_dir=state_dir,
        log_table=log_table,
        write_log=log_table is not None,
        params=params,
        extra=dict(extra),
        meta=_meta(params, model=model, arm=arm),
        time_limit_s=limit,
    )


def train_log(arm: str, state_dir: str, out: str, params: dict[str, Any]) -> None:
    from rgeom.train.runner import write_train_log

    table = write_train_log(state_dir, out, _meta(params, arm=arm))
    log.info("training log of arm %s: %d steps -> %s", arm, table.num_rows, out)


GENERATE_BACKENDS = ("hf", "vllm")


def generate(model: str, prompts: str, out: str, params: dict[str, Any]) -> None:
    seed_everything(params.get("seed", 0))
    settings = params.get("generate", {})
    backend = settings.get("backend", "hf")
    meta = _meta(
        params,
        model=model,
        arm=params.get("arm"),
        step=params.get("step"),
        benchmark=params.get("benchmark"),
    )
    if backend == "vllm":
        # Imported here only: with the default hf backend vLLM is never imported.
        from rgeom.vllm_backend import generate_table as vllm_table

        vllm_table(
            model_dir=model,
            prompts=prompts,
            out=out,
            params=settings,
            model_settings=_model_settings(params),
            seed=int(params.get("seed", 0)),
            meta=meta,
        )
        return
    if backend != "hf":
        raise RgeomError(
            f"generate.backend {backend!r} is unknown; choose one of {list(GENERATE_BACKENDS)}"
        )
    from rgeom.generation import generate_table

    lm, tokenizer = _load(model, params)
    generate_table(
        model=lm, tokenizer=tokenizer, prompts=prompts, out=out, params=settings, meta=meta
    )


def judge(
    generations: str,
    labels: str,
    metrics: str | None,
    params: dict[str, Any],
    prompts: str | None = None,
) -> None:
    from rgeom.judges import judge_table

    seed_everything(params.get("seed", 0))
    source = read_meta(generations)
    judge_table(
        generations=generations,
        labels_out=labels,
        metrics_out=metrics,
        params=params.get("judge", {}),
        seed=params.get("seed", 0),
        meta=_meta(
            params,
            model=source.get("model"),
            arm=source.get("arm"),
            step=source.get("step"),
            benchmark=source.get("benchmark"),
        ),
        prompts=prompts,
    )


def metrics(labels: list[str], out: list[str], params: dict[str, Any]) -> None:
    """Each judged cell's metrics with bootstrap CIs, ``labels[i]`` -> ``out[i]``: the cheap
    half of judging, the only one ``judge.bootstrap`` reaches."""
    from rgeom.judges import bootstrap_count, metrics_table

    if len(labels) != len(out):
        raise RgeomError(f"--labels names {len(labels)} files but --out {len(out)}")
    n_boot = bootstrap_count(params.get("judge", {}))
    for src, dst in zip(labels, out, strict=True):
        metrics_table(src, dst, n_boot, int(params.get("seed", 0)), _meta(params))


def validate_judge(
    labelled: str,
    agreement: str,
    confusion: str,
    predictions: str,
    markdown: str,
    params: dict[str, Any],
    prompts: str | None = None,
) -> None:
    from rgeom.judges.validation import validate_judge as _validate

    seed_everything(params.get("seed", 0))
    print(
        _validate(
            labelled=labelled,
            prompts=prompts,
            outputs={
                "agreement": agreement,
                "confusion": confusion,
                "predictions": predictions,
                "markdown": markdown,
            },
            params=params.get("judge", {}),
            meta=_meta(params, labelled=labelled),
            max_invalid_rate=params.get("validate", {}).get("max_invalid_rate"),
        )
    )


def utility_shift(
    model: str, base: str, reference: list[str], out: str, params: dict[str, Any]
) -> None:
    from rgeom.utility_shift import utility_shift_table

    seed_everything(params.get("seed", 0))
    lm, tokenizer = _load(model, params)
    base_lm = lm if Path(base).resolve() == Path(model).resolve() else _load(base, params)[0]
    utility_shift_table(
        model=lm,
        base=base_lm,
        tokenizer=tokenizer,
        references=reference,
        out=out,
        params=params.get("utility_shift", {}),
        seed=params.get("seed", 0),
        meta=_meta(params, model=model, base=base, arm=params.get("arm"), step=params.get("step")),
    )


def _direction_filter(params: dict[str, Any]) -> tuple[bool, int]:
    """``carrier.filter_prompts`` and ``carrier.min_prompts``.

    Absent, the filter is off (unlike the schema default): a bare ``rgeom extract`` then
    stores no scores, as it always did. The workflow always passes the validated config's
    values, and asks for scores only on the source model, where the filter is decided.
    """
    carrier = params.get("carrier") or {}
    enabled = carrier.get("filter_prompts", False)
    if not isinstance(enabled, bool):
        raise RgeomError(f"carrier.filter_prompts must be true or false, got {enabled!r}")
    least = carrier.get("min_prompts", 8)
    if not isinstance(least, int) or isinstance(least, bool) or least < 1:
        raise RgeomError(f"carrier.min_prompts must be an integer >= 1, got {least!r}")
    return enabled, least


def extract(model: str, sets: list[tuple[str, str]], out: str, params: dict[str, Any]) -> None:
    from rgeom.activations import extract_activations

    seed_everything(params.get("seed", 0))
    # Scores are only worth their extra forward where the prompt filter is decided.
    scores, _ = _direction_filter(params)
    lm, tokenizer = _load(model, params)
    extract_activations(
        model=lm,
        tokenizer=tokenizer,
        sets=dict(sets),
        out=out,
        params=params.get("activations", {}),
        meta=_meta(params, model=model, arm=params.get("arm"), step=params.get("step")),
        refusal_scores=scores,
    )


def prompt_filter(activations: str, out: str, params: dict[str, Any]) -> None:
    """Arditi et al.'s prompt filter, decided once on the source model's activation table
    (with its baseline refusal scores) for every cell's directions and carrier search."""
    from rgeom.geometry import prompt_filter_table

    _, min_prompts = _direction_filter(params)
    source = read_meta(activations)
    prompt_filter_table(
        activations,
        out,
        _meta(params, model=source.get("model"), arm=source.get("arm"), step=source.get("step")),
        min_prompts=min_prompts,
    )


def directions(
    activations: str, out: str, params: dict[str, Any], prompt_filter: str | None = None
) -> None:
    from rgeom.geometry import diff_in_means_table

    source = read_meta(activations)
    diff_in_means_table(
        activations=activations,
        out=out,
        meta=_meta(
            params, model=source.get("model"), arm=source.get("arm"), step=source.get("step")
        ),
        prompt_filter=prompt_filter,
    )


def check_config(config: str, print_config: bool = False) -> None:
    """Validate; end with one "OK: ..." line. ``--print`` puts the resolved config on stdout
    (so ``$(rgeom check-config --print F)`` is JSON) and the OK line on stderr."""
    import sys

    from rgeom.config import describe, load

    cfg = load(config)
    model = cfg.get("model", {})
    if model.get("dtype") == "bfloat16" and model.get("device") == "cpu":
        from rgeom.models import cpu_has_native_bf16

        if cpu_has_native_bf16() is False:
            print(
                f"note: {config}: model.dtype is bfloat16 on a CPU without native bfloat16 "
                "(no avx512_bf16 or amx_bf16 flag): its matmuls are emulated, several times "
                "slower than float32; model.dtype: float32 runs faster here (other numbers)",
                file=sys.stderr,
            )
    ok = f"OK: {config}: {describe(cfg)}"
    if print_config:
        print(json.dumps(cfg, indent=2, sort_keys=True))
        print(ok, file=sys.stderr)
    else:
        print(ok)


def provenance_cmd(file: str) -> None:
    path = Path(file)
    if not path.exists():
        raise RgeomError(f"no such file: {path}")
    print(json.dumps(read_meta(path), indent=2, sort_keys=True))


def carriers(
    model: str,
    directions: str,
    val_harmful: str,
    val_harmless: str,
    out: str,
    params: dict[str, Any],
    prompt_filter: str | None = None,
    activations: str | None = None,
) -> None:
    from rgeom.interventions import carrier_search_table

    seed_everything(params.get("seed", 0))
    source = read_meta(directions)
    lm, tokenizer = _load(model, params)
    carrier_search_table(
        model=lm,
        tokenizer=tokenizer,
        directions=directions,
        harmful=val_harmful,
        harmless=val_harmless,
        out=out,
        params=params.get("carrier", {}),
        meta=_meta(
            params,
            model=model,
            arm=params.get("arm", source.get("arm")),
            step=params.get("step", source.get("step")),
            directions=directions,
        ),
        seed=int(params.get("seed", 0)),
        prompt_filter=prompt_filter,
        activations=activations,
    )


def drift(
    directions: list[str],
    carriers: list[str],
    activations: list[str],
    out_dir: str,
    params: dict[str, Any],
    cross_anchor: list[str] | None = None,
) -> None:
    from rgeom.drift import build_drift

    seed_everything(params.get("seed", 0))
    tables = build_drift(
        directions=directions,
        carriers=carriers,
        out_dir=out_dir,
        params=params,
        meta=_meta(params),
        activations=activations or None,
        cross_anchor=cross_anchor or None,
    )
    for row in tables["verdict"].to_pylist():
        print(f"{row['arm']}: {row['verdict']} ({row['detail']})")


def interventions(
    model: str,
    directions: str,
    carriers: str,
    activations: str,
    val_harmful: str,
    val_harmless: str,
    generate_set: str,
    utility_set: str,
    out: str,
    params: dict[str, Any],
) -> None:
    from rgeom.causal import interventions_table

    seed_everything(params.get("seed", 0))
    source = read_meta(directions)
    lm, tokenizer = _load(model, params)
    interventions_table(
        model=lm,
        tokenizer=tokenizer,
        directions=directions,
        carriers=carriers,
        activations=activations,
        val_harmful=val_harmful,
        val_harmless=val_harmless,
        generate_prompts=generate_set,
        utility_prompts=utility_set,
        out=out,
        params=params,
        meta=_meta(
            params,
            model=model,
            arm=params.get("arm", source.get("arm")),
            step=params.get("step", source.get("step")),
        ),
    )


def cross_anchor(
    model: str,
    directions: list[str],
    carriers: list[str],
    val_harmful: str,
    val_harmless: str,
    out: str,
    params: dict[str, Any],
) -> None:
    from rgeom.causal import cross_anchor_table

    seed_everything(params.get("seed", 0))
    if params.get("arm") is None or params.get("step") is None:
        raise RgeomError("--params: 'arm' and 'step' (the target cell) are required")
    lm, tokenizer = _load(model, params)
    cross_anchor_table(
        model=lm,
        tokenizer=tokenizer,
        directions=directions,
        carriers=carriers,
        val_harmful=val_harmful,
        val_harmless=val_harmless,
        out=out,
        params=params,
        meta=_meta(params, model=model, arm=params["arm"], step=int(params["step"])),
    )


def interventions_summary(tables: list[str], out_dir: str, params: dict[str, Any]) -> None:
    from rgeom.causal import interventions_summary as build

    build(tables=tables, out_dir=out_dir, params=params, meta=_meta(params))


def record_config(out: str, params: dict[str, Any]) -> None:
    from rgeom.config import validate
    from rgeom.io import write_json

    # Validated again so the record always has every default filled in: two runs whose
    # configs differ only in spelling out a default then compare as equal.
    write_json(out, validate(params, source="record-config --params", check_files=False))
