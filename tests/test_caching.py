"""What an edit reruns, on the finished tiny workflow (tests/conftest.py: finished_run).

Snakemake 9 reruns a job when its code, params, input checksums or software change; a touch
alone reruns nothing. Each test edits one thing and reads the dry run's job table. Other
rules may be added to the workflow, so each test names the rules an edit may rerun (a
superset) and the rules it must not rerun (count 0), with exact counts for the rules whose
count is known.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml
from dagrun import REPO, failure_report, job_counts, snakemake

from rgeom.config import load
from rgeom.io import read_table

pytestmark = pytest.mark.slow

TEST_CONFIG = (REPO / ".test" / "config.yaml").read_text()
RAW = yaml.safe_load(TEST_CONFIG)
CFG = load(REPO / ".test" / "config.yaml")
N_CELLS = 1 + len(CFG["arms"]) * (len(CFG["anchors"]) - 1)  # the base once, then each arm
N_BENCH = len(CFG["benchmarks"])
#: Adaptive attacks per cell (GCG and AutoDAN in .test/config.yaml).
N_ADAPTIVE = (
    len(CFG["attacks"]["adaptive"]["methods"]) if CFG["attacks"]["adaptive"]["enabled"] else 0
)
#: Jobs that are never cheap: an edit downstream of them must not rerun them.
EXPENSIVE = ("prepare_model", "prepare_data", "sft_data", "train", "generate")
EXPENSIVE += ("extract_activations", "directions", "attack", "attack_gcg", "adaptive_gcg")
EXPENSIVE += ("adaptive_autodan", "test_cases")


def edited(**sections) -> str:
    """.test/config.yaml with the given sections' keys replaced, as YAML text."""
    raw = yaml.safe_load(TEST_CONFIG)
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return yaml.safe_dump(raw)


def dry_run(workdir, config_text, tmp_path):
    cfg = tmp_path / "edited.yaml"
    cfg.write_text(config_text)
    res = snakemake(workdir, "-n", configfile=cfg, cores="1", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return job_counts(res.stdout)


def assert_only(counts, allowed, exact):
    assert set(counts) <= set(allowed), f"unexpected reruns: {set(counts) - set(allowed)}"
    for rule in EXPENSIVE:
        assert counts.get(rule, 0) == 0, f"{rule} must not rerun: {counts}"
    for rule, n in exact.items():
        assert counts.get(rule, 0) == n, f"{rule}: {counts.get(rule, 0)} jobs, want {n}"


def test_no_change_reruns_nothing(finished_run):
    before = {p: p.stat().st_mtime_ns for p in (finished_run / "results").rglob("*.parquet")}
    t0 = time.monotonic()
    res = snakemake(finished_run)  # a real run, not a dry run
    # Reported, not asserted: benchmarks/bench_dag.py --finished measures it (target < 5 s).
    print(f"no-op rerun: {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr
    after = {p: p.stat().st_mtime_ns for p in (finished_run / "results").rglob("*.parquet")}
    assert after == before


def test_a_touch_reruns_nothing(finished_run, tmp_path):
    # On a copy: the shared run's files keep their times for the other tests.
    work = tmp_path / "touched"
    shutil.copytree(finished_run, work, symlinks=True)
    for p in (work / "results" / "data").glob("*.parquet"):
        p.touch()
    assert dry_run(work, TEST_CONFIG, tmp_path) == {}


def test_a_carrier_parameter_reruns_only_geometry_analysis(finished_run, tmp_path):
    kl_max = CFG["carrier"]["kl_max"]
    counts = dry_run(finished_run, edited(carrier={"kl_max": kl_max * 2}), tmp_path)
    allowed = {"carriers", "cross_anchor", "interventions", "interventions_summary", "drift"}
    allowed |= {"record_config", "summary", "publish_summary", "all"}
    exact = {"carriers": N_CELLS, "cross_anchor": N_CELLS, "interventions": N_CELLS}
    exact |= {"drift": 1, "interventions_summary": 1, "record_config": 1, "all": 1}
    exact |= {"judge": 0, "extract_activations": 0}
    assert_only(counts, allowed, exact)


def test_the_bootstrap_count_reruns_only_the_metrics(finished_run, tmp_path):
    # judge.bootstrap only sizes intervals: the per-cell metrics jobs recompute them from the
    # labels. Before: every judge, adaptive_judge and validate_judges job (model judges at
    # paper scale) reran.
    bootstrap = CFG["judge"]["bootstrap"]
    counts = dry_run(finished_run, edited(judge={"bootstrap": bootstrap // 2}), tmp_path)
    exact = {"metrics": N_CELLS, "adaptive_metrics": N_CELLS if N_ADAPTIVE else 0, **RECORD}
    assert counts == {rule: n for rule, n in exact.items() if n}, counts


def test_editing_the_judge_reruns_only_judging(finished_run, tmp_path):
    # A judge that labels differently: every scoring job and what reads its labels.
    counts = dry_run(finished_run, edited(judge={"harmbench": "refusal_matcher"}), tmp_path)
    allowed = {"judge", "adaptive_judge", "metrics", "adaptive_metrics", "validate_judges"}
    # Interventions score their generations with the configured judge.
    allowed |= {"interventions", "interventions_summary"} | set(RECORD)
    exact = {"judge": N_CELLS * N_BENCH, "metrics": N_CELLS, **RECORD}
    exact |= {"adaptive_judge": N_CELLS * N_ADAPTIVE, "adaptive_metrics": N_CELLS}
    exact |= {"validate_judges": 1, "adaptive_generate": 0, "utility_shift": 0}
    exact |= {"carriers": 0, "drift": 0}
    assert_only(counts, allowed, exact)


def test_editing_the_utility_audit_reruns_only_it(finished_run, tmp_path):
    counts = dry_run(finished_run, edited(utility_shift={"limit": 4}), tmp_path)
    exact = {"utility_shift": N_CELLS, "summary": 1, "publish_summary": 1}
    exact |= {"record_config": 1, "all": 1}
    assert_only(counts, set(exact), exact | {"judge": 0, "validate_judges": 0})


@pytest.fixture(scope="module")
def added_anchor(finished_run, tmp_path_factory):
    """A copy of the finished run, then the same config with one more anchor, run for real."""
    work = tmp_path_factory.mktemp("anchor") / "run"
    shutil.copytree(finished_run, work, symlinks=True)
    last = CFG["anchors"][-1]
    new = last + 2
    text = edited(anchors=[*RAW["anchors"], new], train={"max_steps": new})
    cfg = work.parent / "anchor.yaml"
    cfg.write_text(text)
    dry = snakemake(work, "-n", configfile=cfg, cores="1", timeout=600)
    assert dry.returncode == 0, dry.stderr[-3000:]
    res = snakemake(work, configfile=cfg)
    if res.returncode != 0:
        pytest.fail(failure_report(res, work))
    return work, new, job_counts(dry.stdout), res


def test_an_added_anchor_resumes_training(added_anchor, finished_run):
    work, new, counts, _ = added_anchor
    assert counts["train"] == len(CFG["arms"])
    # The new cell's jobs are there: one generate and judge per benchmark, one extraction.
    tag = f"step-{new:06d}"
    for arm in CFG["arms"]:
        cell = work / "results" / arm / tag
        for bench in CFG["benchmarks"]:
            assert read_table(cell / "metrics" / f"{bench}.parquet").num_rows > 0
        assert read_table(cell / "directions.parquet").num_rows > 0
        log = (work / "results" / "logs" / "train" / f"{arm}-{new:06d}.log").read_text()
        # Resumed from the state of the last old anchor, not retrained from zero.
        last = CFG["anchors"][-1]
        assert f"resuming arm {arm}" in log and f"checkpoint-{last}" in log, log[-2000:]
        old = read_table(finished_run / "results" / arm / "train_log.parquet").to_pylist()
        got = read_table(work / "results" / arm / "train_log.parquet").to_pylist()
        assert len(got) == new and got[-1]["step"] == new
        for a, b in zip(old, got, strict=False):  # the first steps are the old run's steps
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_an_added_anchor_runs_only_the_new_cells(added_anchor, finished_run):
    work, new, counts, _ = added_anchor
    arms = len(CFG["arms"])
    # Per arm: one training segment and the new cell's jobs; nothing of the old cells.
    per_cell = {"generate": N_BENCH, "judge": N_BENCH, "extract_activations": 1}
    per_cell |= {"directions": 1, "carriers": 1, "interventions": 1, "utility_shift": 1}
    per_cell |= {"metrics": 1, "adaptive_gcg": 1, "adaptive_generate": N_ADAPTIVE}
    for rule, n in per_cell.items():
        assert counts.get(rule, 0) == arms * n, f"{rule}: {counts}"
    assert counts["train"] == arms and counts["train_log"] == arms
    for rule in ("prepare_model", "prepare_data", "sft_data", "attack", "test_cases"):
        assert counts.get(rule, 0) == 0, f"{rule} must not rerun: {counts}"
    # The old checkpoints were not rewritten.
    for arm in CFG["arms"]:
        for step in CFG["anchors"][1:]:
            rel = Path("results") / arm / "checkpoints" / f"step-{step:06d}" / "model.safetensors"
            assert (work / rel).stat().st_mtime_ns == (finished_run / rel).stat().st_mtime_ns


#: What any config edit reruns: the config record, and the summary (staged, then published)
#: that sits beside it.
RECORD = {"record_config": 1, "summary": 1, "publish_summary": 1, "all": 1}


def test_a_memory_knob_reruns_nothing_but_the_config_record(finished_run, tmp_path):
    # generate.batch_size and shard_size size batches and shards; greedy tables are the same.
    # Before: sft_data, every training segment and every cell reran (78 of 97 jobs).
    gen = {"batch_size": CFG["generate"]["batch_size"] * 2, "shard_size": 3}
    counts = dry_run(finished_run, edited(generate=gen), tmp_path)
    assert counts == RECORD, counts


def test_the_judge_batch_size_reruns_nothing_but_the_config_record(finished_run, tmp_path):
    # judge.batch_size only sizes the judge models' batches. Before: every judge,
    # adaptive_judge, validate_judges and interventions job reran.
    judge = {"batch_size": CFG["judge"]["batch_size"] * 2}
    counts = dry_run(finished_run, edited(judge=judge), tmp_path)
    assert counts == RECORD, counts


def test_moving_the_shared_data_folder_reruns_nothing_but_the_config_record(finished_run, tmp_path):
    # The same files through another path: shared files are tracked by content
    # (common.smk: content_key), never by the folder's name. Before: 95 jobs.
    counts = dry_run(finished_run, edited(data={"shared_dir": str(tmp_path / "moved")}), tmp_path)
    assert counts == RECORD, counts


def test_generate_max_new_tokens_reruns_generation_but_not_training(finished_run, tmp_path):
    new = CFG["generate"]["max_new_tokens"] + 2
    counts = dry_run(finished_run, edited(generate={"max_new_tokens": new}), tmp_path)
    # Completions, their labels and metrics; utility_shift scores the base model's
    # (regenerated) answers to harmless prompts. Not the adaptive searches: GCG and AutoDAN
    # (whose early stop generates attacks.autodan.early_stop_tokens of its own) never read
    # generate.*; before, both reran in every cell.
    exact = {"generate": N_CELLS * N_BENCH, "judge": N_CELLS * N_BENCH, "metrics": N_CELLS}
    exact |= {"adaptive_generate": N_CELLS * N_ADAPTIVE, "adaptive_judge": N_CELLS * N_ADAPTIVE}
    exact |= {"adaptive_metrics": N_CELLS, "utility_shift": N_CELLS, **RECORD}
    for rule in ("prepare_model", "prepare_data", "sft_data", "train", "attack_gcg"):
        assert counts.get(rule, 0) == 0, f"{rule} must not rerun: {counts}"
    assert counts == {rule: n for rule, n in exact.items() if n}, counts
