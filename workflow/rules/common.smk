# Helpers shared by every rule: config validation, the (arm, step) grid, paths and params.
import json
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rgeom.config import validate
from rgeom.errors import RgeomError

try:
    config.update(
        validate(
            config,
            source=", ".join(
                map(str, workflow.overwrite_configfiles or workflow.configfiles)
            ),
        )
    )
except RgeomError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None


wildcard_constraints:
    arm="[a-z0-9]+",
    step=r"\d{6}",
    benchmark="[A-Za-z0-9_]+",
    # Only configured set names, so results/data/sft_train.parquet is never a "set".
    dataset="|".join(sorted(config["data"]["sets"])),


BASE = "base"  # step 0 is the source model, measured once and shared by every arm
GPU = 1 if config["model"]["device"] == "cuda" else 0
TRAIN_GPUS = config["train"]["num_gpus"] if GPU else 0


def tag(step):
    return f"{int(step):06d}"


def trained_tags():
    return [tag(s) for s in config["anchors"] if s > 0]


def cells():
    """Every (arm, step tag) measured: the base once, then each arm at each trained anchor."""
    grid = [(BASE, tag(0))] if 0 in config["anchors"] else []
    grid += [(arm, t) for arm in config["arms"] for t in trained_tags()]
    return grid


def cell_paths(pattern):
    return [pattern.format(arm=arm, step=step) for arm, step in cells()]


def model_dir(wildcards):
    if wildcards.arm == BASE:
        return "results/model/base"
    return f"results/{wildcards.arm}/checkpoints/step-{wildcards.step}"


def params_json(**sections):
    """The stage parameters as canonical JSON; Snakemake reruns a job when they change."""
    return json.dumps({"seed": config["seed"], **sections}, sort_keys=True)


def model_params():
    # threads and paths are deliberately absent: they do not change any result.
    return {k: config["model"][k] for k in ("dtype", "device", "trust_remote_code")}


def dataset_input(wildcards):
    spec = config["data"]["sets"][wildcards.dataset]
    if spec["format"] in ("builtin", "hf"):
        return []
    path = Path(spec["path"])
    return str(
        path if path.is_absolute() else Path(config["data"]["shared_dir"]) / path
    )


def summary_outputs():
    return [
        "results/config.json",
        "results/summary/summary.parquet",
        "results/summary/summary.csv",
        "results/summary/summary.md",
        "results/summary/figures/metrics_vs_step.png",
        "results/summary/figures/direction_norm_heatmap.png",
    ]


def drift_outputs():
    return [
        "results/drift/drift.parquet",
        "results/drift/angles.parquet",
        "results/drift/verdict.parquet",
        "results/drift/figures/carrier_layer_vs_step.png",
        "results/drift/figures/principal_angles.png",
    ]


def shared_path(path):
    path = Path(path)
    return str(
        path if path.is_absolute() else Path(config["data"]["shared_dir"]) / path
    )


def r2d2_inputs():
    """The R2D2 pool's behaviours: a HarmBench CSV + targets JSON, or train_harmful's targets."""
    r2d2 = config["r2d2"]
    if r2d2["behaviours"]:
        return {
            "r2d2_behaviours": shared_path(r2d2["behaviours"]),
            "r2d2_targets": shared_path(r2d2["targets"]),
        }
    return {"r2d2_behaviours": "results/data/train_harmful.parquet"}


def deepspeed_config():
    offload = "_offload" if config["train"]["offload"] else ""
    # Relative to the Snakefile, so runs with --directory elsewhere still find it.
    name = f"zero{config['train']['zero_stage']}{offload}.json"
    return str(Path(workflow.basedir) / "workflow" / "deepspeed" / name)


def train_inputs(wildcards):
    inputs = {"model": "results/model/base", "data": "results/data/sft_train.parquet"}
    if wildcards.arm == "r2d2":
        inputs.update(r2d2_inputs())
    if config["train"]["zero_stage"]:
        inputs["deepspeed"] = deepspeed_config()
    return inputs


def train_params(wildcards):
    sections = {
        "model": model_params(),
        "train": config["train"],
        "anchors": config["anchors"],
    }
    if wildcards.arm == "r2d2":
        # Only the r2d2 arm sees these, so tuning R2D2 never retrains the SFT arm.
        sections["r2d2"] = {
            k: v
            for k, v in config["r2d2"].items()
            if k not in ("behaviours", "targets")
        }
    return params_json(**sections)


def extra_flags(wildcards, input):
    names = ("r2d2_behaviours", "r2d2_targets", "deepspeed")
    return " ".join(f"--extra {n}={input[n]}" for n in names if n in input.keys())
