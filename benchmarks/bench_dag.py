"""DAG scale: `snakemake -n` job count and DAG build time on the paper config and on a 4x
grid (2 arms x 20 anchors x every benchmark), plus a no-op rerun of a finished workflow.

    python benchmarks/bench_dag.py                      # paper and the 4x grid
    python benchmarks/bench_dag.py --finished DIR       # also: no-op rerun of a finished run

A dry run parses the Snakefile, validates the config and builds the whole DAG; nothing is
downloaded (model and data are never opened). Targets: DAG build < 10 s, growth linear in
the number of cells; no-op rerun < 5 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from dagrun import job_counts  # noqa: E402


def dry_run(config: Path, workdir: Path, profile: str | None = None) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(config), "--quiet", "rules"]
    cmd += ["--profile", profile] if profile else ["--cores", "1"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"snakemake -n failed on {config}:\n{res.stderr[-3000:]}")
    return elapsed, job_counts(res.stdout + res.stderr)


def grids(tmp: Path) -> list[tuple[str, Path, int]]:
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    shared = Path(paper["data"]["shared_dir"])
    paper["data"]["shared_dir"] = str(shared if shared.is_absolute() else REPO / shared)
    out = []
    for name, n_anchors in (("paper", None), ("2x grid", 10), ("4x grid", 20)):
        cfg = dict(paper)
        if n_anchors:
            cfg["anchors"] = [0] + [25 * (i + 1) for i in range(n_anchors - 1)]
            cfg["train"] = {**paper.get("train", {}), "max_steps": cfg["anchors"][-1]}
        path = tmp / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        n_cells = 1 + len(cfg["arms"]) * (len(cfg["anchors"]) - 1)
        out.append((name, path, n_cells))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=Path, help="a finished workflow dir (no-op rerun)")
    parser.add_argument("--configfile", type=Path, default=REPO / ".test" / "config.yaml")
    parser.add_argument("--profile", default=None, help="e.g. profiles/slurm (dry run only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'grid':10s} {'cells':>6s} {'jobs':>6s} {'DAG s':>7s} {'ms/cell':>8s}")
        for name, config, n_cells in grids(tmp):
            elapsed, counts = dry_run(config, tmp / "work", args.profile)
            total = sum(counts.values())
            print(
                f"{name:10s} {n_cells:6d} {total:6d} {elapsed:7.1f} {1000 * elapsed / n_cells:8.0f}"
            )
            print("  " + ", ".join(f"{rule} {n}" for rule, n in counts.items()))
    if args.finished:
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
        cmd += ["--directory", str(args.finished), "--configfile", str(args.configfile)]
        cmd += ["--cores", "1"]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        ok = res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr
        verdict = "nothing ran" if ok else "RAN JOBS"
        print(f"no-op rerun of {args.finished}: {elapsed:.1f} s ({verdict})")


if __name__ == "__main__":
    main()
