"""The ``rgeom`` console script: one subcommand per workflow stage.

Snakemake rules call these subcommands, so all logic lives in the package and is tested
without Snakemake. Each stage takes its inputs and outputs as paths and its parameters as
one JSON object (``--params``): Snakemake tracks that JSON as the rule's params, so editing
a parameter reruns exactly the jobs that consume it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable

from rgeom import __version__, warm
from rgeom.errors import RgeomError

log = logging.getLogger("rgeom")


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


def _keyval(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


# name -> (help, example, target "module:function", [(flags, kwargs), ...])
COMMANDS: dict[str, tuple[str, str, str, list[tuple[tuple[str, ...], dict]]]] = {
    "prepare-model": (
        "Materialise the source model as a plain Hugging Face directory.",
        'rgeom prepare-model --out results/model --params \'{"source": "smollm2_gguf"}\'',
        "rgeom.stages:prepare_model",
        [(("--out",), {"required": True, "help": "output model directory"})],
    ),
    "prepare-data": (
        "Read one prompt set from its upstream format into rgeom's prompt schema.",
        "rgeom prepare-data --name xstest --out results/data/xstest.parquet \\\n"
        '    --params \'{"spec": {"format": "xstest_csv", '
        '"path": "xstest/xstest_prompts.csv"}}\'',
        "rgeom.stages:prepare_data",
        [
            (("--name",), {"required": True, "help": "set name (key of data.sets)"}),
            (("--out",), {"required": True, "help": "output Parquet file"}),
            (
                ("--tokenizer",),
                {"default": None, "help": "model dir whose tokenizer checks lengths"},
            ),
        ],
    ),
    "sft-data": (
        "Build the supervised training set: refusals for harmful prompts, "
        "the base model's own answers for harmless ones.",
        "rgeom sft-data --model results/model/base --harmful h.parquet --harmless b.parquet \\\n"
        "    --out sft.parquet",
        "rgeom.stages:sft_data",
        [
            (("--model",), {"required": True}),
            (("--harmful",), {"required": True}),
            (("--harmless",), {"required": True}),
            (("--out",), {"required": True}),
        ],
    ),
    "train": (
        "Train one arm up to its anchors (resuming from --state-dir) and write a checkpoint "
        "at each; the workflow runs one job per anchor.",
        "rgeom train --arm sft --model results/model/base \\\n"
        "    --data results/data/sft_train.parquet --out-dir results/sft/checkpoints \\\n"
        "    --state-dir results/sft/train_state --log-table results/sft/train_log.parquet \\\n"
        '    --params \'{"train": {"max_steps": 20}, "anchors": [10, 20]}\'',
        "rgeom.stages:train",
        [
            (("--arm",), {"required": True}),
            (("--model",), {"required": True}),
            (("--data",), {"required": True}),
            (("--out-dir",), {"required": True, "help": "folder of the anchor checkpoints"}),
            (("--state-dir",), {"required": True, "help": "resume state kept across reruns"}),
            (("--log-table",), {"help": "also write the per-step metrics Parquet here"}),
            (
                ("--extra",),
                {
                    "action": "append",
                    "type": _keyval,
                    "default": [],
                    "help": "NAME=PATH extra inputs",
                },
            ),
            (
                ("--time-limit-min",),
                {
                    "type": float,
                    "help": "the job's time limit in minutes; under SLURM the run saves and "
                    "stops train.save_margin_s before it",
                },
            ),
            (("--save-every",), {"type": int, "help": "overrides train.save_every"}),
        ],
    ),
    "generate": (
        "Greedy, batched, left-padded completions for one benchmark cell.",
        "rgeom generate --model results/model/base --prompts results/data/xstest.parquet \\\n"
        "    --out gen.parquet",
        "rgeom.stages:generate",
        [
            (("--model",), {"required": True}),
            (("--prompts",), {"required": True}),
            (("--out",), {"required": True}),
        ],
    ),
    "judge": (
        "Label completions (and, with --metrics, compute the benchmark's metrics).",
        "rgeom judge --generations gen.parquet --labels labels.parquet",
        "rgeom.stages:judge",
        [
            (("--generations",), {"required": True}),
            (("--labels",), {"required": True}),
            (("--metrics",), {"default": None, "help": "also write the metrics (rgeom metrics)"}),
            (
                ("--prompts",),
                {"default": None, "help": "the prompt set (behaviour text for model judges)"},
            ),
        ],
    ),
    "metrics": (
        "Metrics with bootstrap CIs from judged labels (judge.bootstrap resamples).",
        "rgeom metrics --labels results/sft/step-000010/judgements/xstest.parquet \\\n"
        "    --out results/sft/step-000010/metrics/xstest.parquet",
        "rgeom.stages:metrics",
        [
            (("--labels",), {"nargs": "+", "required": True, "help": "rgeom judge's labels"}),
            (("--out",), {"nargs": "+", "required": True, "help": "one metrics table each"}),
        ],
    ),
    "validate-judge": (
        "Score a human-labelled file with the configured judge: accuracy, kappa, confusion.",
        "rgeom validate-judge --labelled builtin:xstest \
"
        "    --agreement results/validation/judge_agreement.parquet \
"
        "    --confusion results/validation/judge_confusion.parquet \
"
        "    --predictions results/validation/judge_predictions.parquet \
"
        "    --markdown results/validation/judge_validation.md",
        "rgeom.stages:validate_judge",
        [
            (
                ("--labelled",),
                {"required": True, "help": "labelled JSONL/CSV/Parquet or builtin:xstest"},
            ),
            (
                ("--prompts",),
                {"default": None, "help": "XSTest CSV or prompt Parquet (by prompt_id)"},
            ),
            (("--agreement",), {"required": True, "help": "output Parquet: accuracy and kappa"}),
            (("--confusion",), {"required": True, "help": "output Parquet: confusion counts"}),
            (("--predictions",), {"required": True, "help": "output Parquet: per-item labels"}),
            (("--markdown",), {"required": True, "help": "output markdown report"}),
        ],
    ),
    "utility-shift": (
        "Cross-entropy and KL(base || checkpoint) on the base model's greedy harmless answers.",
        "rgeom utility-shift --model results/sft/checkpoints/step-000010 \
"
        "    --base results/model/base \
"
        "    --reference results/base/step-000000/generations/utility.parquet \
"
        "    --out results/sft/step-000010/utility_shift.parquet",
        "rgeom.stages:utility_shift",
        [
            (("--model",), {"required": True, "help": "checkpoint to measure"}),
            (("--base",), {"required": True, "help": "the base model"}),
            (
                ("--reference",),
                {"nargs": "+", "required": True, "help": "the base model's generation tables"},
            ),
            (("--out",), {"required": True}),
        ],
    ),
    "extract": (
        "Capture residual-stream activations at post-instruction positions to Parquet.",
        "rgeom extract --model results/model/base --set dir_harmful=h.parquet \\\n"
        "    --set dir_harmless=b.parquet --out acts.parquet",
        "rgeom.stages:extract",
        [
            (("--model",), {"required": True}),
            (("--set",), {"action": "append", "type": _keyval, "required": True, "dest": "sets"}),
            (("--out",), {"required": True}),
        ],
    ),
    "train-log": (
        "The arm's per-step training metrics (loss terms, learning rate, tokens/s) as Parquet.",
        "rgeom train-log --arm sft --state-dir results/sft/train_state \\\n"
        "    --out results/sft/train_log.parquet",
        "rgeom.stages:train_log",
        [
            (("--arm",), {"required": True}),
            (("--state-dir",), {"required": True}),
            (("--out",), {"required": True}),
        ],
    ),
    "directions": (
        "Difference-in-means refusal directions per layer and position.",
        "rgeom directions --activations acts.parquet --out directions.parquet",
        "rgeom.stages:directions",
        [
            (("--activations",), {"required": True}),
            (("--out",), {"required": True}),
            (
                ("--prompt-filter",),
                {"default": None, "help": "the source model's prompt filter (rgeom prompt-filter)"},
            ),
        ],
    ),
    "prompt-filter": (
        "Arditi's prompt filter, decided once on the source model's activations (with "
        "baseline refusal scores) for every cell's directions and carrier search.",
        "rgeom prompt-filter --activations results/base/step-000000/activations.parquet \\\n"
        '    --out results/prompt_filter.parquet --params \'{"carrier": {"min_prompts": 8}}\'',
        "rgeom.stages:prompt_filter",
        [
            (("--activations",), {"required": True}),
            (("--out",), {"required": True}),
        ],
    ),
    "summary": (
        "The summary table, the paper-style tables (behaviour, geometry, interventions, "
        "verdict; CSV, Markdown, LaTeX) and every report figure (PNG + SVG).",
        "rgeom summary --metrics results/*/step-*/metrics/*.parquet \\\n"
        "    --directions results/*/step-*/directions.parquet \\\n"
        "    --carriers results/*/step-*/carriers.parquet --drift-dir results/drift \\\n"
        "    --interventions results/interventions/interventions.parquet \\\n"
        '    --out-dir results/summary --params \'{"arms": ["sft", "r2d2"]}\'',
        "rgeom.report:summary_cmd",
        [
            (("--metrics",), {"nargs": "+", "required": True}),
            (("--directions",), {"nargs": "+", "required": True}),
            (("--train-logs",), {"nargs": "*", "default": []}),
            (
                ("--utility-shift",),
                {"nargs": "*", "default": [], "help": "utility_shift.parquet of every cell"},
            ),
            (("--carriers",), {"nargs": "*", "default": [], "help": "every cell's carriers"}),
            (("--drift-dir",), {"default": None, "help": "folder of drift/angles/verdict"}),
            (("--interventions",), {"default": None, "help": "all cells' interventions"}),
            (
                ("--validation",),
                {"default": None, "help": "validate_judges' judge_agreement.parquet"},
            ),
            (("--out-dir",), {"required": True}),
        ],
    ),
    "carriers": (
        "Causal carrier search: ablate/add each candidate direction on the validation sets.",
        "rgeom carriers --model results/model/base \\\n"
        "    --directions results/base/step-000000/directions.parquet \\\n"
        "    --val-harmful results/data/val_harmful.parquet \\\n"
        "    --val-harmless results/data/val_harmless.parquet \\\n"
        "    --out results/base/step-000000/carriers.parquet \\\n"
        '    --params \'{"carrier": {"layer_stride": 3, "positions": [-1]}}\'',
        "rgeom.stages:carriers",
        [
            (("--model",), {"required": True}),
            (("--directions",), {"required": True}),
            (("--val-harmful",), {"required": True}),
            (("--val-harmless",), {"required": True}),
            (("--out",), {"required": True}),
            (
                ("--prompt-filter",),
                {"default": None, "help": "the source model's prompt filter (rgeom prompt-filter)"},
            ),
            (
                ("--activations",),
                {"default": None, "help": "the cell's activations, for the rank-k carriers"},
            ),
        ],
    ),
    "drift": (
        "Carrier relocation, effective rank and principal angles across anchors and arms.",
        "rgeom drift --directions results/*/step-*/directions.parquet \\\n"
        "    --carriers results/*/step-*/carriers.parquet \\\n"
        "    --activations results/*/step-*/activations.parquet --out-dir results/drift",
        "rgeom.stages:drift",
        [
            (("--directions",), {"nargs": "+", "required": True}),
            (("--carriers",), {"nargs": "+", "required": True}),
            (
                ("--activations",),
                {"nargs": "*", "default": [], "help": "for the label-shuffled null"},
            ),
            (
                ("--cross-anchor",),
                {
                    "nargs": "*",
                    "default": [],
                    "help": "cross-anchor tables (rgeom cross-anchor) for the verdict",
                },
            ),
            (("--out-dir",), {"required": True}),
        ],
    ),
    "interventions": (
        "Ablation, activation addition and rank-k ablation at one cell's carrier: refusal "
        "score, judged generations, KL, cross-entropy and utility under each.",
        "rgeom interventions --model results/model/base \\\n"
        "    --directions results/base/step-000000/directions.parquet \\\n"
        "    --carriers results/base/step-000000/carriers.parquet \\\n"
        "    --activations results/base/step-000000/activations.parquet \\\n"
        "    --val-harmful results/data/val_harmful.parquet \\\n"
        "    --val-harmless results/data/val_harmless.parquet \\\n"
        "    --generate-set results/data/harmbench.parquet \\\n"
        "    --utility-set results/data/utility.parquet \\\n"
        "    --out results/base/step-000000/interventions.parquet",
        "rgeom.stages:interventions",
        [
            (("--model",), {"required": True}),
            (("--directions",), {"required": True}),
            (("--carriers",), {"required": True}),
            (("--activations",), {"required": True, "help": "for the rank-k subspace"}),
            (("--val-harmful",), {"required": True}),
            (("--val-harmless",), {"required": True}),
            (("--generate-set",), {"required": True, "help": "harmful prompts to generate on"}),
            (("--utility-set",), {"required": True, "help": "prompts with checkable answers"}),
            (("--out",), {"required": True}),
        ],
    ),
    "cross-anchor": (
        "Apply every source cell's carrier direction to one target cell's model.",
        "rgeom cross-anchor --model results/sft/checkpoints/step-000020 \\\n"
        "    --directions results/{base,sft}/step-*/directions.parquet \\\n"
        "    --carriers results/{base,sft}/step-*/carriers.parquet \\\n"
        "    --val-harmful results/data/val_harmful.parquet \\\n"
        "    --val-harmless results/data/val_harmless.parquet \\\n"
        "    --out results/sft/step-000020/cross_anchor.parquet \\\n"
        '    --params \'{"arm": "sft", "step": 20}\'',
        "rgeom.stages:cross_anchor",
        [
            (("--model",), {"required": True}),
            (("--directions",), {"nargs": "+", "required": True}),
            (("--carriers",), {"nargs": "+", "required": True}),
            (("--val-harmful",), {"required": True}),
            (("--val-harmless",), {"required": True}),
            (("--out",), {"required": True}),
        ],
    ),
    "interventions-summary": (
        "All cells' intervention tables in one, and a refusal-vs-KL frontier figure per arm.",
        "rgeom interventions-summary --tables results/*/step-*/interventions.parquet \\\n"
        "    --out-dir results/interventions",
        "rgeom.stages:interventions_summary",
        [
            (("--tables",), {"nargs": "+", "required": True}),
            (("--out-dir",), {"required": True}),
        ],
    ),
    "attack": (
        "Build one fixed-source attack method's test cases (against the source model).",
        "rgeom attack --method GCG-transfer --behaviors results/data/harmbench.parquet \\\n"
        "    --model results/model/base --out results/attacks/GCG-transfer.parquet \\\n"
        '    --params \'{"attacks": {"gcg": {"n_behaviors": 4, "steps": 5, "search_width": 32}}}\'',
        "rgeom.attacks.stages:attack",
        [
            (
                ("--method",),
                {"required": True, "help": "DirectRequest, Templates, GCG-transfer or AutoDAN"},
            ),
            (("--behaviors",), {"required": True, "help": "behaviour set (prompt Parquet)"}),
            (("--out",), {"required": True, "help": "output test-case Parquet"}),
            (("--model",), {"default": None, "help": "source model dir (GCG-transfer, AutoDAN)"}),
            (
                ("--templates",),
                {"default": None, "help": "templates JSONL, or AutoDAN prototypes (default: ours)"},
            ),
            (("--targets",), {"default": None, "help": "HarmBench targets JSON"}),
        ],
    ),
    "attack-merge": (
        "Merge one method's chunk files (rgeom attack with chunk [k, n] in --params, one "
        "job each) into the table a single job writes.",
        "rgeom attack-merge --method GCG-transfer --parts results/attacks/GCG-transfer/*.parquet"
        " \\\n    --behaviors results/data/harmbench.parquet"
        " --out results/attacks/GCG-transfer.parquet",
        "rgeom.attacks.stages:attack_merge",
        [
            (("--method",), {"required": True, "help": "the method the chunks ran"}),
            (("--parts",), {"nargs": "+", "required": True, "help": "chunk Parquet files"}),
            (("--behaviors",), {"required": True, "help": "behaviour set (prompt Parquet)"}),
            (("--out",), {"required": True}),
        ],
    ),
    "test-cases": (
        "Merge per-method (and your own) test-case files, checking every behaviour id.",
        "rgeom test-cases --cases results/attacks/DirectRequest.parquet \\\n"
        "    results/attacks/Templates.parquet --behaviors results/data/harmbench.parquet \\\n"
        "    --out results/attacks/test_cases.parquet",
        "rgeom.attacks.stages:test_cases",
        [
            (("--cases",), {"nargs": "+", "required": True, "help": "test-case Parquet files"}),
            (("--behaviors",), {"required": True, "help": "behaviour set (prompt Parquet)"}),
            (("--out",), {"required": True}),
        ],
    ),
    "adaptive-gcg": (
        "GCG optimised against this checkpoint on a few behaviours: the suffixes.",
        "rgeom adaptive-gcg --model results/sft/checkpoints/step-000010 \\\n"
        "    --behaviors results/data/harmbench.parquet \\\n"
        "    --out results/sft/step-000010/adaptive_gcg_cases.parquet \\\n"
        '    --params \'{"arm": "sft", "step": 10, "attacks": {"adaptive": {"n_behaviors": 2}}}\'',
        "rgeom.attacks.stages:adaptive_gcg",
        [
            (("--model",), {"required": True}),
            (("--behaviors",), {"required": True, "help": "behaviour set (prompt Parquet)"}),
            (("--out",), {"required": True, "help": "suffixes and their token ids"}),
            (("--targets",), {"default": None, "help": "HarmBench targets JSON"}),
        ],
    ),
    "adaptive-autodan": (
        "AutoDAN evolved against this checkpoint on the adaptive subset: the jailbreaks.",
        "rgeom adaptive-autodan --model results/sft/checkpoints/step-000010 \\\n"
        "    --behaviors results/data/harmbench.parquet \\\n"
        "    --out results/sft/step-000010/adaptive_autodan_cases.parquet \\\n"
        '    --params \'{"arm": "sft", "step": 10, "attacks": {"adaptive": {"n_behaviors": 2}}}\'',
        "rgeom.attacks.stages:adaptive_autodan",
        [
            (("--model",), {"required": True}),
            (("--behaviors",), {"required": True, "help": "behaviour set (prompt Parquet)"}),
            (("--out",), {"required": True, "help": "evolved templates and test cases"}),
            (("--targets",), {"default": None, "help": "HarmBench targets JSON"}),
            (("--templates",), {"default": None, "help": "AutoDAN prototypes JSONL"}),
        ],
    ),
    "adaptive-generate": (
        "Greedy completions of an adaptive search's test cases (GCG's exact token ids).",
        "rgeom adaptive-generate --model results/sft/checkpoints/step-000010 \\\n"
        "    --cases results/sft/step-000010/adaptive_gcg_cases.parquet \\\n"
        "    --out results/sft/step-000010/adaptive_gcg_completions.parquet",
        "rgeom.attacks.stages:adaptive_generate",
        [
            (("--model",), {"required": True}),
            (("--cases",), {"required": True, "help": "rgeom adaptive-gcg/-autodan output"}),
            (("--out",), {"required": True, "help": "the cases with their completions"}),
        ],
    ),
    "adaptive-judge": (
        "Judge adaptive-attack completions: per-behaviour labels and success.",
        "rgeom adaptive-judge \\\n"
        "    --completions results/sft/step-000010/adaptive_gcg_completions.parquet \\\n"
        "    --out results/sft/step-000010/adaptive_gcg.parquet",
        "rgeom.attacks.stages:adaptive_judge",
        [
            (("--completions",), {"required": True}),
            (("--out",), {"required": True, "help": "per-behaviour labels and success"}),
            (
                ("--metrics",),
                {"default": None, "help": "also write the ASR table (rgeom adaptive-metrics)"},
            ),
            (
                ("--prompts",),
                {"default": None, "help": "behaviour set: the text a model judge reads"},
            ),
        ],
    ),
    "adaptive-metrics": (
        "The ASR of judged adaptive attacks, with its bootstrap CI.",
        "rgeom adaptive-metrics --labels results/sft/step-000010/adaptive_gcg.parquet \\\n"
        "    --out results/sft/step-000010/adaptive_gcg_metrics.parquet",
        "rgeom.attacks.stages:adaptive_metrics",
        [
            (("--labels",), {"nargs": "+", "required": True, "help": "rgeom adaptive-judge's"}),
            (("--out",), {"nargs": "+", "required": True, "help": "one metrics table each"}),
        ],
    ),
    "check-config": (
        "Validate a config file (schema, semantics, data files) and end with one OK line.",
        "rgeom check-config config/config.yaml",
        "rgeom.stages:check_config",
        [
            (("config",), {"help": "YAML config file"}),
            (
                ("--print",),
                {
                    "dest": "print_config",
                    "action": "store_true",
                    "help": "also print the resolved config (JSON on stdout; OK line on stderr)",
                },
            ),
        ],
    ),
    "check-profile": (
        "Check a Snakemake profile: its rule names, and under the SLURM executor every "
        "rule's partition and resources against the partitions sinfo lists.",
        "rgeom check-profile profiles/slurm --configfile config/paper.yaml",
        "rgeom.profiles:check_profile_cmd",
        [
            (("profile",), {"help": "profile directory (or its config.yaml)"}),
            (("--rules",), {"default": "workflow/rules", "help": "folder of the *.smk rules"}),
            (
                ("--slurm",),
                {
                    "action": argparse.BooleanOptionalAction,
                    "default": None,
                    "help": "check against sinfo (default: when the profile's executor is slurm)",
                },
            ),
            (
                ("--configfile",),
                {
                    "default": None,
                    "help": "config the jobs are resolved for (a forced dry run): callables "
                    "and config-dependent resources are checked as Snakemake submits them",
                },
            ),
            (("--snakefile",), {"default": None, "help": "default: the one beside profiles/"}),
        ],
    ),
    "provenance": (
        "Print the provenance record stored in an rgeom Parquet file.",
        "rgeom provenance results/sft/step-000010/generations/xstest.parquet",
        "rgeom.stages:provenance_cmd",
        [(("file",), {"help": "Parquet file written by rgeom"})],
    ),
    "fetch-data": (
        "Download the upstream data files a config reads (every manifest file without "
        "--configfile) into the data folder, each checked against its sha256 pin, and load "
        "its hub data sets once into the datasets cache (docs/data.md).",
        "rgeom fetch-data --configfile config/paper.yaml\n"
        "  rgeom fetch-data --dest data --source /mnt/mirror/rgeom-data",
        "rgeom.fetch:fetch_data_cmd",
        [
            (("--configfile",), {"default": None, "help": "config whose files to fetch"}),
            (
                ("--dest",),
                {"default": None, "help": "data folder (default: the config's data.shared_dir)"},
            ),
            (
                ("--source",),
                {
                    "default": None,
                    "help": "a mirror instead of the upstream URLs: a base URL or a local "
                    "folder laid out like the data folder",
                },
            ),
            (("--manifest",), {"default": None, "help": "another manifest YAML (tests)"}),
            (
                ("--force",),
                {"action": "store_true", "help": "replace present files with other bytes"},
            ),
            (
                ("--no-hub",),
                {"dest": "hub", "action": "store_false", "help": "skip the hub data sets"},
            ),
        ],
    ),
    "fetch-models": (
        "Download every hub model a config loads (studied model, attack source, judges and "
        "their adapters) into the Hugging Face cache, for compute nodes without internet.",
        "rgeom fetch-models --configfile config/paper.yaml",
        "rgeom.fetch:fetch_models_cmd",
        [
            (("--configfile",), {"required": True, "help": "config whose models to fetch"}),
            (("--cache-dir",), {"default": None, "help": "default: the hub cache (HF_HOME)"}),
            (
                ("--dry-run",),
                {"action": "store_true", "help": "list the repo ids and the keys naming them"},
            ),
        ],
    ),
    "warm": (
        "Run a command (Snakemake) with a warm fork server behind every rgeom job in it: "
        "torch and the stages are imported once, not once per job (local runs; make run "
        "uses it).",
        "rgeom warm -- snakemake --cores 2 --configfile config/config.yaml",
        "rgeom.warm:warm_cmd",
        [
            (
                ("run_argv",),
                {"nargs": argparse.REMAINDER, "metavar": "COMMAND", "help": "what to run"},
            ),
            (("--socket",), {"dest": "socket_path", "default": None, "help": "socket path"}),
        ],
    ),
    "record-config": (
        "Write the validated config, defaults filled in, as JSON (for `rgeom compare`).",
        "rgeom record-config --out results/config.json \\\n"
        '    --params "$(rgeom check-config --print config/config.yaml)"',
        "rgeom.stages:record_config",
        [(("--out",), {"required": True, "help": "output JSON file"})],
    ),
    "status": (
        "Show which cells of the configured grid are done, running, incomplete or missing.",
        "rgeom status --config config/config.yaml --results results",
        "rgeom.status:status_cmd",
        [
            (("--config",), {"default": "config/config.yaml", "help": "YAML config file"}),
            (("--results",), {"default": "results", "help": "results folder of the run"}),
        ],
    ),
    "compare": (
        "Compare two runs' summaries (A, B with 95% CIs, and B-A per shared (arm, step) and "
        "metric), or two config files (the keys that differ, defaults filled in).",
        "rgeom compare results ../other-run/results --ignore data.shared_dir --changed-only\n"
        "  rgeom compare config/config.yaml my.yaml",
        "rgeom.status:compare_cmd",
        [
            (
                ("run_a",),
                {"metavar": "A", "help": "results folder (or workflow dir), or a config file"},
            ),
            (
                ("run_b",),
                {"metavar": "B", "help": "results folder (or workflow dir), or a config file"},
            ),
            (
                ("--changed-only",),
                {"action": "store_true", "help": "only the values that differ between A and B"},
            ),
            (
                ("--ignore",),
                {
                    "action": "append",
                    "default": [],
                    "metavar": "KEY",
                    "help": "dotted config key (or section) allowed to differ; repeatable",
                },
            ),
        ],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgeom",
        description="Measure how safety fine-tuning reorganizes refusal geometry. "
        "Each subcommand is one workflow stage; `snakemake` chains them.",
    )
    parser.add_argument("--version", action="version", version=f"rgeom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, example, _target, args) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for flags, kwargs in args:
            p.add_argument(*flags, **kwargs)
        no_params = ("check-config", "check-profile", "provenance", "status", "compare")
        if name not in (*no_params, "fetch-data", "fetch-models", "warm"):
            p.add_argument("--params", type=_json, default={}, help="stage parameters as JSON")
    return parser


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.environ.get(warm.SOCKET_ENV) and sys.argv[1:2] != ["warm"]:
        status = warm.forward(sys.argv[1:])
        if status is not None:
            return status
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    kwargs = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        _resolve(COMMANDS[args.command][2])(**kwargs)
    except RgeomError as exc:
        print(f"rgeom {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rgeom {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
