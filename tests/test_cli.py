"""The console script: help everywhere, one clear line for every user error."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from rgeom.cli import COMMANDS

RGEOM = [sys.executable, "-m", "rgeom.cli"]


def run(*args, cwd=None):
    return subprocess.run([*RGEOM, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help_with_an_example(command):
    res = run(command, "--help")
    assert res.returncode == 0
    assert "example:" in res.stdout


def _one_clear_line(res, *needles):
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0]


def test_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: many\n")
    _one_clear_line(run("check-config", str(bad)), "bad.yaml", "train.max_steps")


def test_missing_model_path_is_one_line(tmp_path):
    prompts = tmp_path / "p.parquet"
    res = run(
        "generate",
        "--model",
        str(tmp_path / "no-model"),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "g.parquet"),
    )
    _one_clear_line(res, "no-model")
    assert not (tmp_path / "g.parquet").exists()


def test_missing_benchmark_file_is_one_line(tmp_path):
    params = {"spec": {"format": "xstest_csv", "path": "nope.csv"}, "shared_dir": str(tmp_path)}
    out = tmp_path / "x.parquet"
    res = run("prepare-data", "--name", "xstest", "--out", str(out), "--params", json.dumps(params))
    _one_clear_line(res, "nope.csv")
    assert not out.exists()


def test_provenance_prints_the_record(tmp_path):
    import pyarrow as pa

    from rgeom.io import write_table

    path = tmp_path / "t.parquet"
    write_table(path, pa.table({"a": [1]}), pa.schema([("a", pa.int8())]), {"model": "m"})
    res = run("provenance", str(path))
    assert res.returncode == 0
    record = json.loads(res.stdout)
    assert record["model"] == "m" and record["num_rows"] == 1 and "packages" in record


def _make_targets(repo_root) -> set[str]:
    text = (repo_root / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.MULTILINE))


def test_every_make_command_in_the_docs_is_a_target(repo_root):
    docs = [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]
    shown = {m for d in docs for m in re.findall(r"\bmake ([a-z][a-z-]*)", d.read_text())}
    assert {"demo", "test", "report", "dry-run"} <= _make_targets(repo_root)
    assert shown <= _make_targets(repo_root), shown - _make_targets(repo_root)


def test_every_snakemake_call_of_the_makefile_shows_failed_logs(repo_root):
    for target in ("demo", "run", "dry-run", "report", "lint"):
        res = subprocess.run(
            ["make", "-n", "-W", ".venv/.rgeom-installed", target],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # make -n still runs the $(MAKE) lines, so demo's sub-makes show their calls too.
        calls = [line for line in res.stdout.splitlines() if "bin/snakemake " in line]
        assert calls, (target, res.stdout, res.stderr)
        assert all("--show-failed-logs" in c for c in calls), calls


def test_check_config_ends_with_one_ok_line_and_prints_the_config_on_request(repo_root):
    res = run("check-config", str(repo_root / "config" / "config.yaml"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("OK: "), res.stdout
    assert "anchors 0/6/12" in lines[0]

    res = run("check-config", "--print", str(repo_root / "config" / "config.yaml"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["anchors"] == [0, 6, 12]  # stdout stays pure JSON
    assert res.stderr.strip().splitlines()[-1].startswith("OK: ")


def test_docs_cited_by_the_conda_envs_exist(repo_root):
    for env in sorted((repo_root / "workflow" / "envs").glob("*.yaml")):
        head = " ".join(line.lstrip("# ") for line in env.read_text().splitlines()[:4])
        cited = re.findall(r"see (docs/\S+\.md), \"([^\"]+)\"", head)
        assert cited, f"{env.name} cites no doc section"
        for doc, section in cited:
            headings = [h for h in (repo_root / doc).read_text().splitlines() if h[:1] == "#"]
            assert any(section in h for h in headings), (env.name, doc, section)


def test_the_readme_counts_the_figures_and_names_the_schema(repo_root):
    from rgeom.report import REPORT_FIGURES

    readme = (repo_root / "README.md").read_text()
    assert f"{len(REPORT_FIGURES)} summary figures + a frontier per arm" in readme
    assert "nine figures" not in readme
    assert "workflow/schemas/" not in readme
    assert (repo_root / "src" / "rgeom" / "schemas" / "config.schema.yaml").exists()
