"""Run the real workflow from tests: one place for the command line and the job table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    return out


def snakemake(workdir, *args, configfile=None, snakefile=None, cores="2", timeout=1800):
    """``snakemake`` on the repo's Snakefile (or ``snakefile``) with ``--directory workdir``."""
    cmd = [
        *SNAKEMAKE,
        "--snakefile",
        str(snakefile or REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile or REPO / ".test" / "config.yaml"),
    ]
    if cores:
        cmd += ["--cores", str(cores)]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run as {rule: count}; {} when nothing is to be done."""
    if "Job stats:" not in dry_run_output:
        return {}
    lines = dry_run_output[dry_run_output.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def failure_report(res, workdir) -> str:
    logs = Path(workdir) / "results" / "logs"
    tails = []
    for log in sorted(logs.rglob("*.log")) if logs.exists() else []:
        text = log.read_text(errors="replace")
        if "error" in text.lower() or "Traceback" in text:
            tails.append(f"== {log}\n{text[-2000:]}")
    return f"snakemake failed:\n{(res.stdout + res.stderr)[-6000:]}\n" + "\n".join(tails)
