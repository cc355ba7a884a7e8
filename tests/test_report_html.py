"""The Snakemake HTML report of a finished .test/ run: every summary figure and table is in
it with its caption, and headless Chromium renders it (the landing page, then a figure)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rgeom.report import REPORT_FIGURES
from rgeom.tables import TABLE_NAMES

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
OKABE_BLUE = np.array([0x00, 0x72, 0xB2])  # the sft arm's colour in every figure


def _report_data(html: str, name: str) -> dict:
    """A JSON object the report embeds as ``var NAME = {...};``."""
    start = html.index(f"var {name} = {{") + len(f"var {name} = ")
    return json.loads(html[start : html.index(";\n", start)])


def _screenshot(page: Path, out: Path) -> np.ndarray:
    from matplotlib.image import imread

    res = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            # Lets the report's React app render before the shot.
            "--virtual-time-budget=10000",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0 and out.exists(), res.stderr[-2000:]
    return (imread(out)[..., :3] * 255).round().astype(int)


def _blue_pixels(img: np.ndarray) -> int:
    return int((np.abs(img - OKABE_BLUE).max(axis=-1) <= 12).sum())


@pytest.fixture(scope="module")
def report_html(finished_run, tmp_path_factory) -> Path:
    from dagrun import snakemake

    html = tmp_path_factory.mktemp("report") / "report.html"
    res = snakemake(finished_run, "--report", str(html), cores=None, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return html


@pytest.mark.slow
def test_the_report_holds_every_figure_and_table_with_a_caption(report_html, finished_run):
    html = report_html.read_text()
    results = _report_data(html, "results")
    figures = sorted((finished_run / "results" / "summary" / "figures").glob("*.png"))
    arms = json.loads((finished_run / "results" / "config.json").read_text())["arms"]
    assert len(figures) == len(REPORT_FIGURES) + len(arms)
    pngs = {k: v for k, v in results.items() if v["mime_type"] == "image/png"}
    # Every figure the summary drew is in the report, as the same bytes.
    assert sorted(Path(k).name for k in pngs) == [f.name for f in figures]
    for key, entry in pngs.items():
        data = base64.b64decode(entry["data_uri"].split("base64,", 1)[1])
        assert data == (finished_run / key).read_bytes(), key
        assert len(entry["caption"]) > 200, key  # what it shows and how to read it
    tables = {Path(k).stem for k, v in results.items() if v["mime_type"] == "text/html"}
    assert tables == set(TABLE_NAMES)
    categories = _report_data(html, "categories")
    assert {"Behaviour", "Geometry", "Interventions", "Tables", "Training"} <= set(categories)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_chromium_renders_the_report_and_a_figure(report_html, tmp_path):
    landing = _screenshot(report_html, tmp_path / "landing.png")
    assert landing.shape[:2] == (1000, 1400)
    # Not a blank page: the navigation bar, the workflow text and the rule graph.
    assert landing.std() > 20
    assert len(np.unique(landing.reshape(-1, 3), axis=0)) > 50

    # Open a figure as a click on its result would, then shoot again: the figure's lines in
    # the sft arm's colour must now be on screen.
    html = report_html.read_text()
    key = next(k for k in _report_data(html, "results") if k.endswith("/asr_vs_step.png"))
    opener = (
        "<script>setTimeout(function () { app.setView({content: 'img', "
        f"contentPath: results[{json.dumps(key)}].data_uri}}); }}, 100);</script>"
    )
    # The last </body>: the report's bundled scripts hold the string too.
    head, tail = html.rsplit("</body>", 1)
    page = tmp_path / "figure.html"
    page.write_text(head + opener + "</body>" + tail)
    shot = _screenshot(page, tmp_path / "figure.png")
    assert _blue_pixels(shot) > 100 > _blue_pixels(landing)
