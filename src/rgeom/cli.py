"""The ``rgeom`` console script: one subcommand per workflow stage, plus a few tools.

Snakemake rules call these subcommands, so all logic lives in the package and is tested
without Snakemake. Each stage takes its inputs and outputs as paths and its parameters as
one JSON object (``--params``): Snakemake tracks that JSON as the rule's params, so editing
a parameter reruns exactly the jobs that consume it.

The stages' subcommands come from the registry in :mod:`rgeom.stages` (each stage module
holds its own help, example and arguments); ``TOOLS`` below are the commands that run no
stage and take no ``--params``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable

from rgeom import __version__, warm_client
from rgeom.errors import RgeomError
from rgeom.stages import STAGES, StageCommand, arg, command_name

log = logging.getLogger("rgeom")


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


#: The commands that run no workflow stage: name -> ("module:function" it runs, its spec).
TOOLS: dict[str, tuple[str, StageCommand]] = {
    "check-config": (
        "rgeom.tools:check_config",
        StageCommand(
            help="Validate a config file (schema, semantics, data files) and end with one OK line.",
            example="rgeom check-config config/config.yaml",
            args=(
                arg("config", help="YAML config file"),
                arg(
                    "--print",
                    dest="print_config",
                    action="store_true",
                    help="also print the resolved config (JSON on stdout; OK line on stderr)",
                ),
            ),
        ),
    ),
    "check-profile": (
        "rgeom.profiles:check_profile_cmd",
        StageCommand(
            help="Check a Snakemake profile: its rule names, and under the SLURM executor every "
            "rule's partition and resources against the partitions sinfo lists.",
            example="rgeom check-profile profiles/slurm --configfile config/paper.yaml",
            args=(
                arg("profile", help="profile directory (or its config.yaml)"),
                arg("--rules", default="workflow/rules", help="folder of the *.smk rules"),
                arg(
                    "--slurm",
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help="check against sinfo (default: when the profile's executor is slurm)",
                ),
                arg(
                    "--configfile",
                    default=None,
                    help="config the jobs are resolved for (a forced dry run): callables "
                    "and config-dependent resources are checked as Snakemake submits them",
                ),
                arg("--snakefile", default=None, help="default: the one beside profiles/"),
            ),
        ),
    ),
    "provenance": (
        "rgeom.tools:provenance_cmd",
        StageCommand(
            help="Print the provenance record stored in an rgeom Parquet file.",
            example="rgeom provenance results/sft/step-000010/generations/xstest.parquet",
            args=(arg("file", help="Parquet file written by rgeom"),),
        ),
    ),
    "fetch-data": (
        "rgeom.fetch:fetch_data_cmd",
        StageCommand(
            help="Download the upstream data files a config reads (every manifest file without "
            "--configfile) into the data folder, each checked against its sha256 pin, and load "
            "its hub data sets once into the datasets cache (docs/data.md).",
            example="rgeom fetch-data --configfile config/paper.yaml\n"
            "  rgeom fetch-data --dest data --source /mnt/mirror/rgeom-data",
            args=(
                arg("--configfile", default=None, help="config whose files to fetch"),
                arg(
                    "--dest",
                    default=None,
                    help="data folder (default: the config's data.shared_dir)",
                ),
                arg(
                    "--source",
                    default=None,
                    help="a mirror instead of the upstream URLs: a base URL or a local "
                    "folder laid out like the data folder",
                ),
                arg("--manifest", default=None, help="another manifest YAML (tests)"),
                arg("--force", action="store_true", help="replace present files with other bytes"),
                arg("--no-hub", dest="hub", action="store_false", help="skip the hub data sets"),
            ),
        ),
    ),
    "fetch-models": (
        "rgeom.fetch:fetch_models_cmd",
        StageCommand(
            help="Download every hub model a config loads (studied model, attack source, judges "
            "and their adapters) into the Hugging Face cache, for compute nodes without "
            "internet.",
            example="rgeom fetch-models --configfile config/paper.yaml",
            args=(
                arg("--configfile", required=True, help="config whose models to fetch"),
                arg("--cache-dir", default=None, help="default: the hub cache (HF_HOME)"),
                arg(
                    "--dry-run",
                    action="store_true",
                    help="list the repo ids and the keys naming them",
                ),
            ),
        ),
    ),
    "warm": (
        "rgeom.warm:warm_cmd",
        StageCommand(
            help="Run a command (Snakemake) with a warm fork server behind every rgeom job in "
            "it: torch and the stages are imported once, not once per job (local runs; make "
            "run uses it).",
            example="rgeom warm -- snakemake --cores 2 --configfile config/config.yaml",
            args=(
                arg("run_argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="what to run"),
                arg("--socket", dest="socket_path", default=None, help="socket path"),
            ),
        ),
    ),
    "status": (
        "rgeom.status:status_cmd",
        StageCommand(
            help="Show which cells of the configured grid are done, running, incomplete or "
            "missing.",
            example="rgeom status --config config/config.yaml --results results",
            args=(
                arg("--config", default="config/config.yaml", help="YAML config file"),
                arg("--results", default="results", help="results folder of the run"),
            ),
        ),
    ),
    "compare": (
        "rgeom.status:compare_cmd",
        StageCommand(
            help="Compare two runs' summaries (A, B with 95% CIs, and B-A per shared (arm, step) "
            "and metric), or two config files (the keys that differ, defaults filled in).",
            example="rgeom compare results ../other-run/results --ignore data.shared_dir "
            "--changed-only\n  rgeom compare config/config.yaml my.yaml",
            args=(
                arg(
                    "run_a", metavar="A", help="results folder (or workflow dir), or a config file"
                ),
                arg(
                    "run_b", metavar="B", help="results folder (or workflow dir), or a config file"
                ),
                arg(
                    "--changed-only",
                    action="store_true",
                    help="only the values that differ between A and B",
                ),
                arg(
                    "--ignore",
                    action="append",
                    default=[],
                    metavar="KEY",
                    help="dotted config key (or section) allowed to differ; repeatable",
                ),
            ),
        ),
    ),
}

#: Every subcommand, in the order ``rgeom --help`` lists them: name -> "module:function".
COMMANDS: dict[str, str] = {
    **{command_name(stage): f"rgeom.stages.{stage}:run" for stage in STAGES},
    **{name: target for name, (target, _spec) in TOOLS.items()},
}


def _spec(name: str) -> StageCommand:
    if name in TOOLS:
        return TOOLS[name][1]
    return importlib.import_module(COMMANDS[name].partition(":")[0]).COMMAND


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgeom",
        description="Measure how safety fine-tuning reorganizes refusal geometry. "
        "Each subcommand is one workflow stage; `snakemake` chains them.",
    )
    parser.add_argument("--version", action="version", version=f"rgeom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        command = _spec(name)
        p = sub.add_parser(
            name,
            # The list in `rgeom --help` %-formats each line ("95% CIs").
            help=command.help.replace("%", "%%"),
            description=command.help,
            epilog=f"example:\n  {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for flags, kwargs in command.args:
            p.add_argument(*flags, **kwargs)
        if name not in TOOLS:
            p.add_argument("--params", type=_json, default={}, help="stage parameters as JSON")
    return parser


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.environ.get(warm_client.SOCKET_ENV) and sys.argv[1:2] != ["warm"]:
        status = warm_client.forward(sys.argv[1:])
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
        _resolve(COMMANDS[args.command])(**kwargs)
    except RgeomError as exc:
        print(f"rgeom {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rgeom {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
