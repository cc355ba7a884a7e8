"""Check Snakemake profiles against the workflow's rules, a config and the cluster.

Snakemake silently ignores a ``set-resources`` (or ``set-threads``) entry whose key is not
a rule name, so a typo or a renamed rule would quietly drop a job's GPU or memory request.
:func:`check_profile` turns that into one :class:`RgeomError` naming the unknown rule.

With a config file, :func:`resolved_resources` asks Snakemake itself (a forced dry run with
the profile and the config) for every job's resources, so values computed from the config
(a rule's ``gpu=judge_gpu()``, ``mem_mb=40000 if model_judges() else 1000``) are checked
as Snakemake will submit them, not only the literals a regex can read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from rgeom.errors import RgeomError

RULE_RE = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.MULTILINE)
RULE_KEYED = ("set-resources", "set-threads")


def rule_names(rules_dir: str | os.PathLike) -> set[str]:
    """Every rule (and checkpoint) declared in ``rules_dir/*.smk``."""
    rules_dir = Path(rules_dir)
    files = sorted(rules_dir.glob("*.smk"))
    if not files:
        raise RgeomError(f"no *.smk rule files in {rules_dir}")
    names: set[str] = set()
    for path in files:
        names.update(RULE_RE.findall(path.read_text(encoding="utf-8")))
    return names


def check_profile(profile_path: str | os.PathLike, rules_dir: str | os.PathLike) -> list[str]:
    """The rule names a profile configures, after checking each is a rule of the workflow.

    ``profile_path`` is a profile's ``config.yaml`` (or the profile directory holding it).
    """
    path = Path(profile_path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.exists():
        raise RgeomError(f"profile not found: {path}")
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RgeomError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(profile, dict):
        raise RgeomError(f"{path}: the top level must be a mapping of keys")
    known = rule_names(rules_dir)
    checked: list[str] = []
    for section in RULE_KEYED:
        entries = profile.get(section) or {}
        if not isinstance(entries, dict):
            raise RgeomError(f"{path}: key {section} must map rule names to settings")
        for rule in entries:
            if rule not in known:
                raise RgeomError(
                    f"{path}: key {section}.{rule}: {rule!r} is not a rule of the workflow "
                    f"(rules: {', '.join(sorted(known))})"
                )
            checked.append(rule)
    return checked


# --- checks against the SLURM that will run the jobs -------------------------------------

RESOURCES_RE = re.compile(r"^(\s+)resources:\s*\n((?:\1\s+.*\n)+)", re.MULTILINE)
LITERAL_RE = re.compile(r"^\s*(\w+)\s*=\s*(\d+)\s*,?\s*$")
#: Resources compared with a partition's limits; everything else is passed through.
LIMITED = ("slurm_partition", "mem_mb", "runtime", "cpus_per_task", "cpus_per_gpu", "gpu", "nodes")


@dataclass(frozen=True)
class Partition:
    """What ``sinfo`` reports for one partition: the limits a job must fit in."""

    name: str
    cpus: int  # CPUs of its largest node
    mem_mb: int  # memory of its largest node, MB
    max_minutes: int | None  # the partition's time limit; None when unlimited
    gpus: int  # GPUs (gres gpu) of its largest node
    nodes: int


def _minutes(text: str) -> int | None:
    """SLURM time ([D-]HH:MM:SS, MM:SS, MM, "infinite") in whole minutes."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = (0, parts) if days == 0 else (parts[0], (parts[1], 0))
    else:
        h, m, s = (parts[0], 0, 0) if days else (0, parts[0], 0)
    return days * 1440 + h * 60 + m + (1 if s else 0)


def _gpus(gres: str) -> int:
    """GPUs in an sinfo %G field such as ``gpu:a100:4(S:0-1),tmpdisk:100``."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total = max(total, int(fields[-1]))
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions from ``sinfo -h -e -o '%R|%c|%m|%l|%G|%D'`` (one line per node kind)."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, mem, limit, gres, nodes = line.split("|")[:6]
        part = Partition(
            name=name.strip().rstrip("*"),
            cpus=int(cpus.rstrip("+")),
            mem_mb=int(mem.rstrip("+")),
            max_minutes=_minutes(limit),
            gpus=_gpus(gres),
            nodes=int(nodes),
        )
        old = parts.get(part.name)
        if old is not None:  # several node kinds: the largest of each limit
            part = Partition(
                part.name,
                max(old.cpus, part.cpus),
                max(old.mem_mb, part.mem_mb),
                part.max_minutes,
                max(old.gpus, part.gpus),
                old.nodes + part.nodes,
            )
        parts[part.name] = part
    return parts


def slurm_partitions() -> dict[str, Partition]:
    """The partitions of the SLURM cluster this machine submits to, from ``sinfo``."""
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-e", "-o", "%R|%c|%m|%l|%G|%D"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise RgeomError("sinfo not found: run this on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise RgeomError("sinfo did not answer within 60 s: is slurmctld up?") from None
    if res.returncode != 0:
        raise RgeomError(f"sinfo failed: {res.stderr.strip() or res.stdout.strip()}")
    parts = parse_sinfo(res.stdout)
    if not parts:
        raise RgeomError("sinfo lists no partitions")
    return parts


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_resources(
    resources: dict[str, dict], partitions: dict[str, Partition], source: str = ""
) -> list[str]:
    """Every way a rule's resources do not fit its partition, as one line each.

    ``resources`` maps a rule name to its effective resources (``slurm_partition``,
    ``mem_mb``, ``runtime`` in minutes, ``cpus_per_task``, ``cpus_per_gpu``, ``gpu``,
    ``nodes``); a missing partition means SLURM's default partition.
    """
    prefix = f"{source}: " if source else ""
    default = next(iter(partitions.values()))
    problems = []
    unknown: dict[str, list[str]] = {}
    for rule, res in sorted(resources.items()):
        name = res.get("slurm_partition") or None
        if name is not None and str(name) not in partitions:
            unknown.setdefault(str(name), []).append(rule)
            continue
        part = partitions[str(name)] if name is not None else default
        where = f"partition {part.name!r}"
        mem, runtime = _int(res.get("mem_mb")), _int(res.get("runtime"))
        gpu, nodes = _int(res.get("gpu")) or 0, _int(res.get("nodes")) or 1
        cpus = _int(res.get("cpus_per_task")) or 0
        if gpu and _int(res.get("cpus_per_gpu")):
            cpus = max(cpus, gpu * _int(res.get("cpus_per_gpu")))
        if mem is not None and mem > part.mem_mb:
            problems.append(
                f"{prefix}rule {rule}: mem_mb={mem} exceeds the {part.mem_mb} MB of the "
                f"largest node in {where}"
            )
        if runtime is not None and part.max_minutes is not None and runtime > part.max_minutes:
            problems.append(
                f"{prefix}rule {rule}: runtime={runtime} min exceeds the time limit of "
                f"{where} ({part.max_minutes} min)"
            )
        if cpus > part.cpus:
            problems.append(
                f"{prefix}rule {rule}: {cpus} CPUs per task exceed the {part.cpus} CPUs of "
                f"the largest node in {where}"
            )
        if gpu > part.gpus:
            problems.append(
                f"{prefix}rule {rule}: gpu={gpu} exceeds the {part.gpus} GPUs of the "
                f"largest node in {where}"
            )
        if nodes > part.nodes:
            problems.append(
                f"{prefix}rule {rule}: nodes={nodes} exceeds the {part.nodes} nodes of {where}"
            )
    known = ", ".join(sorted(partitions))
    problems[:0] = [
        f"{prefix}partition {name!r} (rules {', '.join(rules)}) is not known to SLURM "
        f"(sinfo lists: {known})"
        for name, rules in unknown.items()
    ]
    return problems


def rule_resources(rules_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """The integer literals in each submitted rule's ``resources:`` block (callables are
    skipped, local rules left out)."""
    out: dict[str, dict[str, int]] = {}
    for path in sorted(Path(rules_dir).glob("*.smk")):
        text = path.read_text(encoding="utf-8")
        starts = list(RULE_RE.finditer(text))
        for i, match in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            block = text[match.start() : end]
            found = RESOURCES_RE.search(block)
            values = {}
            if found:
                for line in found.group(2).splitlines():
                    literal = LITERAL_RE.match(line)
                    if literal:
                        values[literal.group(1)] = int(literal.group(2))
            if not re.search(r"^\s+localrule:\s*True", block, re.MULTILINE):
                out[match.group(1)] = values  # local rules never reach SLURM
    return out


def profile_resources(
    profile_path: str | os.PathLike, rules_dir: str | os.PathLike
) -> dict[str, dict]:
    """Each rule's resources as a profile sets them: default-resources, then the rule's
    own literals, then the profile's set-resources (Snakemake's order of precedence)."""
    path = _profile_file(profile_path)
    profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    defaults = profile.get("default-resources") or {}
    if isinstance(defaults, list):  # the `- key=value` form
        defaults = dict(item.split("=", 1) for item in defaults)
    defaults = {k: _unquote(v) for k, v in defaults.items()}
    overrides = profile.get("set-resources") or {}
    merged = {}
    for rule, own in rule_resources(rules_dir).items():
        res = dict(defaults)
        res.update(own)
        res.update({k: _unquote(v) for k, v in (overrides.get(rule) or {}).items()})
        merged[rule] = res
    return merged


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _profile_file(profile_path: str | os.PathLike) -> Path:
    path = Path(profile_path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.exists():
        raise RgeomError(f"profile not found: {path}")
    return path


def check_profile_slurm(
    profile_path: str | os.PathLike,
    rules_dir: str | os.PathLike,
    partitions: dict[str, Partition] | None = None,
) -> dict[str, dict]:
    """:func:`check_profile`, then every rule's resources against the SLURM partitions
    (``sinfo``); one :class:`RgeomError` lists every problem. Returns the resources."""
    check_profile(profile_path, rules_dir)
    partitions = slurm_partitions() if partitions is None else partitions
    resources = profile_resources(profile_path, rules_dir)
    problems = check_resources(resources, partitions, str(_profile_file(profile_path)))
    if problems:
        raise RgeomError(
            f"{len(problems)} problem(s) before anything is submitted: " + "; ".join(problems)
        )
    return resources


def check_workflow_jobs(workflow) -> None:
    """The Snakefile's ``onstart`` check: under the SLURM executor, the resources of every
    job about to be submitted (as Snakemake resolved them: rule, default-resources and
    set-resources) must fit a partition SLURM knows. Raises before the first submission."""
    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or getattr(plugin, "name", None) != "slurm" or workflow.dryrun:
        return
    if os.environ.get("RGEOM_SKIP_SLURM_CHECK"):
        return
    by_rule: dict[str, dict] = {}
    for job in workflow.dag.needrun_jobs():
        if job.is_local:
            continue
        res = {k: v for k, v in job.resources.items() if k in LIMITED + ("mpi", "tasks")}
        old = by_rule.setdefault(job.rule.name, res)
        for key in ("mem_mb", "runtime", "cpus_per_task", "gpu", "nodes"):
            if _int(res.get(key)) is not None and (_int(old.get(key)) or 0) < _int(res[key]):
                old[key] = res[key]
    if not by_rule:
        return
    problems = check_resources(by_rule, slurm_partitions())
    problems += check_conventions(by_rule, dict(workflow.config))
    if problems:
        raise RgeomError(
            f"{len(problems)} problem(s) before anything is submitted: " + "; ".join(problems)
        )


# --- resources as Snakemake resolves them, from a forced dry run ---------------------------

_JOB_RE = re.compile(r"^(rule|localrule|checkpoint|localcheckpoint) (\w+):\s*$")
_RES_RE = re.compile(r"^\s+resources: (.*)$")
_ITEM_RE = re.compile(r"(\w+)=(.*?)(?=, \w+=|$)")


def parse_dry_run(text: str) -> list[tuple[str, dict]]:
    """``(rule, resources)`` of every submitted job in ``snakemake -n`` output (local rules,
    which never reach SLURM, are left out). Integers come back as ``int``; ``<TBD>`` (a
    resource that needs an input not yet made) is left out."""
    jobs: list[tuple[str, dict]] = []
    rule, local = None, False
    for line in text.splitlines():
        head = _JOB_RE.match(line)
        if head:
            rule, local = head.group(2), head.group(1).startswith("local")
            continue
        found = _RES_RE.match(line)
        if found and rule is not None:
            res = {}
            for key, value in _ITEM_RE.findall(found.group(1)):
                if value == "<TBD>":
                    continue
                res[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
            if not local:
                jobs.append((rule, res))
            rule = None
    return jobs


def resolved_resources(
    profile: str | os.PathLike,
    configfile: str | os.PathLike,
    snakefile: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
) -> list[tuple[str, dict]]:
    """Every job of the workflow with its resources as Snakemake resolves them for this
    profile and config: rule resources (callables evaluated), ``default-resources`` and
    ``set-resources``. ``--forceall`` lists every job, finished or not; nothing runs."""
    profile = Path(profile)
    if profile.name == "config.yaml":
        profile = profile.parent
    snakefile = Path(snakefile) if snakefile else _default_snakefile(profile)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--dry-run",
        "--forceall",
        "--nolock",
        "--profile",
        str(profile.resolve()),
        "--configfile",
        str(Path(configfile).resolve()),
        "--snakefile",
        str(snakefile.resolve()),
    ]
    if workdir is not None:
        cmd += ["--directory", str(workdir)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RgeomError(f"snakemake --dry-run with profile {profile} took over 600 s") from None
    if res.returncode != 0:
        lines = (res.stdout + "\n" + res.stderr).strip().splitlines()
        # Snakemake's own message: from its last "...Error" line (the traceback follows).
        starts = [i for i, line in enumerate(lines) if "Error" in line.split(" ", 1)[0]]
        tail = lines[starts[-1] : starts[-1] + 3] if starts else lines[-15:]
        raise RgeomError(
            f"snakemake --dry-run --profile {profile} --configfile {configfile} failed: "
            + " | ".join(line.strip() for line in tail)
        )
    jobs = parse_dry_run(res.stdout)
    if not jobs:
        raise RgeomError(f"snakemake --dry-run --profile {profile} listed no submitted job")
    return jobs


def _default_snakefile(profile: Path) -> Path:
    # profiles/<name>/ sits beside the Snakefile; otherwise the one in the current folder.
    for candidate in (profile.resolve().parent.parent / "Snakefile", Path("Snakefile")):
        if candidate.exists():
            return candidate
    raise RgeomError(f"no Snakefile found next to {profile} or here; pass --snakefile")


def by_rule_max(jobs: list[tuple[str, dict]]) -> dict[str, dict]:
    """Per rule, the largest request of each limited resource over its jobs."""
    out: dict[str, dict] = {}
    for rule, res in jobs:
        old = out.setdefault(rule, dict(res))
        for key, value in res.items():
            if isinstance(value, int) and isinstance(old.get(key), int) and value > old[key]:
                old[key] = value
    return out


def check_conventions(resources: dict[str, dict], config: dict | None = None) -> list[str]:
    """What snakemake-executor-plugin-slurm would turn into a wrong sbatch line.

    * ``cpus_per_task`` wins over ``cpus_per_gpu`` (the plugin's ``get_cpu_setting``), so a
      GPU job carrying both gets the CPU count meant for CPU jobs;
    * a job with several GPUs and no ``nodes`` may get them spread over nodes (``--gpus`` is
      a total), which a single-node ``torchrun`` cannot use;
    * ``train``'s GPUs must be ``train.num_gpus`` (the ranks the launcher starts); with the
      ``mpi`` (srun) route, ``tasks`` must be too.
    """
    problems = []
    for rule, res in sorted(resources.items()):
        gpu = _int(res.get("gpu")) or 0
        if gpu and _int(res.get("cpus_per_gpu")) and _int(res.get("cpus_per_task")):
            problems.append(
                f"rule {rule}: cpus_per_task={res['cpus_per_task']} overrides "
                f"cpus_per_gpu={res['cpus_per_gpu']} in the SLURM plugin (drop cpus_per_task "
                "from default-resources, or set it per rule)"
            )
        if gpu > 1 and res.get("nodes") is None and not res.get("mpi"):
            problems.append(
                f"rule {rule}: gpu={gpu} without nodes: --gpus={gpu} may be split across "
                "nodes; set nodes: 1 (or the mpi route of docs/cluster.md)"
            )
    if config is not None and config["model"]["device"] == "cuda" and "train" in resources:
        want = int(config["train"]["num_gpus"])
        res = resources["train"]
        if (_int(res.get("gpu")) or 0) != want:
            problems.append(
                f"rule train: gpu={res.get('gpu')} but train.num_gpus={want}: the job "
                f"launches {want} ranks, one per GPU"
            )
        if res.get("mpi") and _int(res.get("tasks")) != want:
            problems.append(
                f"rule train: tasks={res.get('tasks')} but train.num_gpus={want}: srun "
                "starts one rank per task"
            )
    return problems


def check_profile_config(
    profile: str | os.PathLike,
    configfile: str | os.PathLike,
    rules_dir: str | os.PathLike,
    partitions: dict[str, Partition] | None = None,
    snakefile: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
) -> dict[str, dict]:
    """The profile against a config and SLURM: rule names, then every job's resolved
    resources against the partitions and the plugin's conventions. One :class:`RgeomError`
    lists every problem; returns each rule's largest request."""
    from rgeom.config import load

    path = _profile_file(profile)
    check_profile(path, rules_dir)
    config = load(configfile)
    partitions = slurm_partitions() if partitions is None else partitions
    resources = by_rule_max(resolved_resources(path, configfile, snakefile, workdir))
    problems = check_resources(resources, partitions, f"{path} + {configfile}")
    problems += check_conventions(resources, config)
    if problems:
        raise RgeomError(
            f"{len(problems)} problem(s) before anything is submitted: " + "; ".join(problems)
        )
    return resources


def sbatch_line(rule: str, resources: dict, threads: int = 1) -> str:
    """The sbatch call snakemake-executor-plugin-slurm would build for a job of ``rule``
    with these resources (its own ``get_submit_command`` and ``set_gres_string``)."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class _Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=_Resources(resources), threads=threads, name=rule)
    partition = resources.get("slurm_partition")
    account = resources.get("slurm_account")
    params = {
        "run_uuid": "rgeom",
        "slurm_logfile": f".snakemake/slurm_logs/rule_{rule}/%j.log",
        "comment_str": f"rule_{rule}",
        "account": f"-A {account}" if account else "",
        "partition": f"-p {partition}" if partition else "",
        "workdir": None,
    }
    return get_submit_command(job, params) + set_gres_string(job)


def check_profile_cmd(
    profile: str,
    rules: str,
    slurm: bool | None = None,
    configfile: str | None = None,
    snakefile: str | None = None,
) -> None:
    """``rgeom check-profile``: rule names always; partitions and limits when the profile
    uses the SLURM executor (or ``--slurm``); with ``--configfile``, every job's resources
    as Snakemake resolves them for that config. Prints one line per rule."""
    path = _profile_file(profile)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if slurm is None:
        slurm = data.get("executor") == "slurm"
    if not slurm:
        checked = check_profile(path, rules)
        print(f"{path}: ok ({len(checked)} rule entries name workflow rules)")
        return
    partitions = slurm_partitions()
    if configfile:
        resources = check_profile_config(path, configfile, rules, partitions, snakefile)
        print(
            f"{path} + {configfile}: ok against SLURM partitions {', '.join(sorted(partitions))}"
            " (resources as Snakemake resolves them)"
        )
    else:
        resources = check_profile_slurm(path, rules, partitions)
        print(f"{path}: ok against SLURM partitions {', '.join(sorted(partitions))}")
    for rule, res in sorted(resources.items()):
        shown = " ".join(f"{k}={res[k]}" for k in LIMITED if res.get(k) not in (None, ""))
        print(f"  {rule:24s} {shown}")
