"""The .test workflow is reproducible: one seed gives the same tables, another seed does not.

Three full runs of the real Snakemake DAG (about 2.5 minutes each on 2 cores), shared by
every test here through one module-scoped fixture.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

METRICS = "results/*/step-*/metrics/*.parquet"
GENERATIONS = "results/*/step-*/generations/*.parquet"
SUMMARY_CSV = "results/summary/summary.csv"


def _snakemake(repo: Path, workdir: Path, configfile: Path) -> None:
    env = dict(os.environ)
    # The rules call the `rgeom` console script of this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(repo / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        logs = workdir / "results" / "logs"
        tails = [
            f"== {log}\n{log.read_text()[-2000:]}"
            for log in (sorted(logs.rglob("*.log")) if logs.exists() else [])
        ]
        pytest.fail(f"snakemake failed in {workdir}:\n{res.stderr[-4000:]}\n" + "\n".join(tails))


def _with_seed(text: str, seed: int) -> str:
    new, n = re.subn(r"(?m)^seed:\s*\d+\s*$", f"seed: {seed}", text)
    assert n == 1, "the .test config must set a top-level seed"
    return new


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory) -> dict[str, Path]:
    """Workdirs of three runs: ``a`` and ``b`` with the .test seed, ``other`` with another."""
    config = repo_root / ".test" / "config.yaml"
    text = config.read_text()
    seed = int(re.search(r"(?m)^seed:\s*(\d+)", text).group(1))
    configs = {}
    for name, value in (("a", seed), ("b", seed), ("other", seed + 1)):
        path = tmp_path_factory.mktemp(f"config-{name}") / "config.yaml"
        path.write_text(_with_seed(text, value))
        configs[name] = path
    out = {}
    for name, path in configs.items():
        workdir = tmp_path_factory.mktemp(f"run-{name}")
        _snakemake(repo_root, workdir, path)
        out[name] = workdir
    return out


def _files(workdir: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(workdir)): p for p in sorted(workdir.glob(pattern))}


def _same_data(a: Path, b: Path) -> bool:
    """Equal schema and values, ignoring the provenance metadata (git commit, versions).

    Values are compared through their exact JSON text, so a NaN equals a NaN (Arrow's own
    ``equals`` says it does not) while any other difference, however small, still counts.
    """
    ta = pq.read_table(a).replace_schema_metadata(None)
    tb = pq.read_table(b).replace_schema_metadata(None)
    if ta.schema != tb.schema:
        return False
    return json.dumps(ta.to_pydict()) == json.dumps(tb.to_pydict())


def _differing(a: Path, b: Path, pattern: str) -> list[str]:
    fa, fb = _files(a, pattern), _files(b, pattern)
    assert fa, f"no {pattern} in {a}"
    assert sorted(fa) == sorted(fb), "the two runs wrote different sets of files"
    return [name for name in fa if not _same_data(fa[name], fb[name])]


def test_same_seed_gives_identical_metric_tables(runs):
    assert _differing(runs["a"], runs["b"], METRICS) == []


def test_same_seed_gives_identical_generations(runs):
    assert _differing(runs["a"], runs["b"], GENERATIONS) == []


def test_same_seed_gives_identical_summary_csv(runs):
    a = (runs["a"] / SUMMARY_CSV).read_bytes()
    b = (runs["b"] / SUMMARY_CSV).read_bytes()
    assert a, "summary.csv is empty"
    assert a == b


def test_another_seed_changes_the_results(runs):
    changed = _differing(runs["a"], runs["other"], GENERATIONS)
    changed += _differing(runs["a"], runs["other"], METRICS)
    assert changed, "seed 0 and seed 1 gave identical generations and metrics"
    # The seed really reached the model: the tiny random weights differ.
    weights = Path("results", "model", "base", "model.safetensors")
    assert (runs["a"] / weights).read_bytes() != (runs["other"] / weights).read_bytes()
