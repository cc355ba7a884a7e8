"""The summary's place in the workflow: a failed summary keeps the last good one, and its
error reaches the screen under the shipped profile."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from dagrun import REPO, snakemake

from rgeom.errors import RgeomError
from rgeom.report import publish_summary

TARGET = "results/summary/summary.csv"
ONLY_SUMMARY = ["--allowed-rules", "summary", "publish_summary"]


def _summary_inputs(workdir: Path) -> list[str]:
    """The summary job's inputs, as the dry run names them when they are missing."""
    res = snakemake(workdir, "-n", *ONLY_SUMMARY, "--", TARGET, cores="1", timeout=300)
    assert "Missing input files for rule summary" in res.stderr + res.stdout, res.stderr[-2000:]
    text = (res.stderr + res.stdout).split("affected files:", 1)[1]
    return re.findall(r"^\s+(results/\S+)$", text, flags=re.MULTILINE)


def test_a_failed_summary_keeps_the_earlier_summary_and_shows_its_error(tmp_path):
    inputs = _summary_inputs(tmp_path)
    assert "results/drift/drift.parquet" in inputs
    # An earlier good run: its staging and published summary, an hour old.
    earlier = tmp_path / TARGET
    figure = tmp_path / "results/summary/figures/asr_vs_step.png"
    staged = tmp_path / "results/staging/summary/summary.csv"
    for path in (earlier, figure, staged):
        path.parent.mkdir(parents=True, exist_ok=True)
    earlier.write_text("arm,step\nsft,2\n")
    figure.write_bytes(b"\x89PNG earlier run")
    staged.write_text("arm,step\nsft,2\n")
    hour_ago = time.time() - 3600
    for path in (earlier, figure, staged, staged.parent):
        os.utime(path, (hour_ago, hour_ago))
    # Newer inputs that are not Parquet: the summary stage fails on the first one it reads.
    for name in inputs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}" if name.endswith(".json") else "not a table")

    res = snakemake(
        tmp_path,
        "--profile",
        REPO / "profiles" / "local",
        *ONLY_SUMMARY,
        "--",
        TARGET,
        cores="1",
        timeout=600,
    )
    screen = res.stdout + res.stderr
    assert res.returncode != 0, screen[-3000:]
    assert earlier.read_text() == "arm,step\nsft,2\n"
    assert figure.read_bytes() == b"\x89PNG earlier run"
    # show-failed-logs in profiles/local: the stage's one-line error is on the screen.
    assert "rgeom summary: error:" in screen, screen[-3000:]


def test_publish_copies_every_declared_file_and_refuses_an_incomplete_staging(tmp_path):
    staging, dest = tmp_path / "staging", tmp_path / "summary"
    (staging / "figures").mkdir(parents=True)
    (staging / "summary.csv").write_text("new")
    (staging / "figures" / "a.png").write_bytes(b"png")
    (dest / "figures").mkdir(parents=True)
    (dest / "summary.csv").write_text("old")
    files = [str(dest / "summary.csv"), str(dest / "figures" / "a.png")]
    publish_summary(str(staging), str(dest), files)
    assert (dest / "summary.csv").read_text() == "new"
    assert (dest / "figures" / "a.png").read_bytes() == b"png"

    (dest / "summary.csv").write_text("kept")
    with pytest.raises(RgeomError, match="lacks 1 file"):
        publish_summary(str(staging), str(dest), [*files, str(dest / "figures" / "b.png")])
    assert (dest / "summary.csv").read_text() == "kept"


def test_rules_find_rgeom_when_the_venv_is_not_activated(tmp_path, tiny_model_dir):
    """`.venv/bin/snakemake` with a bare PATH: the rules' `rgeom` is the interpreter's."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(tiny_model_dir, tmp_path / "results" / "model" / "base")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(tmp_path), "--configfile", str(REPO / ".test" / "config.yaml")]
    cmd += ["--cores", "1", "--allowed-rules", "prepare_data", "--show-failed-logs"]
    cmd += ["--", "results/data/xstest.parquet"]
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PATH")}
    bare["PATH"] = "/usr/bin:/bin"
    assert not shutil.which("rgeom", path=bare["PATH"])
    res = subprocess.run(cmd, capture_output=True, text=True, env=bare, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert (tmp_path / "results" / "data" / "xstest.parquet").stat().st_size > 0


def test_a_config_edit_gives_record_config_a_short_reason(tmp_path):
    """record_config's params are a hash: a dry run does not print the config twice."""
    import yaml

    target = ["--allowed-rules", "record_config", "--", "results/config.json"]
    res = snakemake(tmp_path, *target, cores="1", timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["seed"] = 1
    edited = tmp_path / "cfg.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, "-n", *target, configfile=edited, cores="1", timeout=300)
    reasons = [line for line in res.stdout.splitlines() if "reason:" in line]
    assert reasons and "params" in reasons[0].lower(), res.stdout[-3000:]
    assert max(map(len, reasons)) < 300, reasons


def _wide_table_html() -> str:
    """The verdict table's page with long details and many columns, as the summary writes."""
    import polars as pl

    from rgeom.tables import Table, _plain, html

    detail = "transfer 0.93 [0.81, 1.02] (early effect 2.31 / own effect 2.48 log-odds; " * 3
    frame = pl.DataFrame(
        {"arm": ["sft", "r2d2"], **{f"c{i}": [1.5 + i, 2.5 + i] for i in range(14)}}
    ).with_columns(pl.lit(detail).alias("detail"))
    display = [("arm", _plain("arm"))] + [
        (f"a long column name {i}", _plain(f"c{i}", lambda v: f"{v:.4f} [{v:.4f}, {v:.4f}]"))
        for i in range(14)
    ]
    display.append(("detail", _plain("detail")))
    return html(Table("verdict", "Cross-anchor verdict per arm", frame, display, ["a note"]))


def test_the_report_shows_plain_parameters_and_wide_tables_fit_1400_px(tmp_path):
    """publish_summary's outputs in the Snakemake report: parameters in words, not
    escaped JSON; in headless Chromium at 1400 px a wide table scrolls inside its page."""
    import json as _json
    import shutil
    import subprocess

    res = snakemake(tmp_path, "-n", "--allowed-rules", "publish_summary", "--", TARGET)
    outputs = re.search(r"^\s+output: (.+)$", res.stdout + res.stderr, re.MULTILINE)
    assert outputs, (res.stdout + res.stderr)[-3000:]
    staging = tmp_path / "results" / "staging" / "summary"
    png = (REPO / "docs" / "demo_asr_vs_step.png").read_bytes()
    for name in outputs.group(1).split(", "):
        path = staging / Path(name).relative_to("results/summary")
        path.parent.mkdir(parents=True, exist_ok=True)
        body = _wide_table_html() if name.endswith(".html") else "x"
        path.write_bytes(png) if name.endswith(".png") else path.write_text(body)
    res = snakemake(tmp_path, "--allowed-rules", "publish_summary", "--", TARGET, cores="1")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    report = tmp_path / "report.html"
    res = snakemake(tmp_path, "--report", report, "--", TARGET, cores=None, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    text = report.read_text()
    start = text.index("var results = {") + len("var results = ")
    results = _json.loads(text[start : text.index(";\n", start)])
    params = {v["job_properties"]["params"] for v in results.values()}
    assert params and all("{" not in p and "\\" not in p for p in params), params
    assert any("anchors=0 / 2 / 4" in p for p in params), params

    chromium = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if chromium is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs it)")
    page = tmp_path / "results" / "summary" / "tables" / "verdict.html"
    # Measured by the page itself: the document is no wider than the window (nothing is
    # cut), and the table's box scrolls sideways inside it.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>document.title = [document.documentElement.scrollWidth,"
            " document.querySelector('.scroll').scrollWidth,"
            " document.querySelector('.scroll').clientWidth].join(' ');</script></body>",
        )
    )
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"]
    dom = subprocess.run(
        [*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180
    )
    title = re.search(r"<title>(\d+) (\d+) (\d+)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    page_width, table_width, box_width = map(int, title.groups())
    assert page_width <= 1400 and box_width <= 1400, title.groups()
    shot = tmp_path / "verdict.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], timeout=180, check=True)
    assert shot.stat().st_size > 0
