"""Fault injection: SIGKILL a stage at chosen points, rerun it, compare with an undisturbed run.

Kills are deterministic: ``RGEOM_FAULT=point@N:suffix`` (rgeom.io.fault_point) makes the
process SIGKILL itself the N-th time it reaches ``point`` on a path ending in ``suffix``,
with N drawn from a seeded generator, so a failure replays exactly. Each case checks that
the kill left no file under the output's name (nothing truncated can be consumed), that a
plain rerun completes, and that the rerun's table equals an undisturbed run's, byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rgeom.data import PROMPT_SCHEMA
from rgeom.errors import RgeomError
from rgeom.io import (
    FAULT_ENV,
    Shards,
    TableWriter,
    parts_dir,
    read_meta,
    read_table,
    write_table,
)

SEED = 1234
N_PROMPTS = 24
GEN_PARAMS = {"batch_size": 2, "max_new_tokens": 6, "shard_size": 4}
# 2 batches of 2 prompts per shard; 18 prompts in all make 5 shards.
ACT_PARAMS = {"batch_size": 2, "shard_size": 4}
WORDS = [
    "how",
    "do",
    "I",
    "make",
    "a",
    "cake",
    "bomb",
    "poem",
    "sea",
    "river",
    "explain",
    "write",
    "short",
    "long",
    "story",
    "about",
]


def _prompts(path: Path, n: int, label: str, seed: int) -> Path:
    rng = random.Random(seed)
    # Varied lengths, so the length sort really reorders rows across shards.
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(n)]
    table = pa.table(
        {
            "prompt_id": [f"{label}-{i}" for i in range(n)],
            "source": ["test"] * n,
            "split": ["test"] * n,
            "text": texts,
            "context": pa.array([None] * n, pa.string()),
            "category": ["none"] * n,
            "label": [label] * n,
            "target": [""] * n,
        }
    )
    write_table(path, table, PROMPT_SCHEMA, {"dataset": label})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault_inputs")
    return {
        "gen": _prompts(root / "gen.parquet", N_PROMPTS, "harmful", SEED),
        "dir_harmful": _prompts(root / "dh.parquet", 10, "harmful", SEED + 1),
        "dir_harmless": _prompts(root / "db.parquet", 8, "harmless", SEED + 2),
    }


def in_child(fn, fault: str | None = None) -> int:
    """Run ``fn`` in a forked copy of this process (the tiny model already loaded, so no
    import cost) with ``RGEOM_FAULT`` set; returns the signal that ended it, 0 if none."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if fault:
                os.environ[FAULT_ENV] = fault
            torch.set_num_threads(1)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the child failed without being killed"
    return 0


def killed(fn, fault: str) -> None:
    assert in_child(fn, fault) == signal.SIGKILL, f"{fault} never fired"


def run_generation(tiny, tiny_model_dir, prompts: Path, out: Path, generate=None):
    from rgeom.generation import generate_table

    model, tokenizer = tiny
    params = {**GEN_PARAMS, **(generate or {})}
    meta = {"model": str(tiny_model_dir), "arm": "base", "step": 0, "benchmark": "b"}
    return lambda: generate_table(model, tokenizer, str(prompts), str(out), params, meta)


def run_extraction(tiny, tiny_model_dir, inputs, out: Path):
    from rgeom.activations import extract_activations

    model, tokenizer = tiny
    sets = {k: str(inputs[k]) for k in ("dir_harmful", "dir_harmless")}
    meta = {"model": str(tiny_model_dir), "arm": "base", "step": 0}
    return lambda: extract_activations(model, tokenizer, sets, str(out), ACT_PARAMS, meta)


def assert_same_file(got: Path, want: Path) -> None:
    assert read_table(got).equals(read_table(want))
    assert read_meta(got) == read_meta(want)
    assert got.read_bytes() == want.read_bytes()


def no_visible_output(out: Path) -> None:
    """A kill never leaves a file under the output's name; a reader sees it missing."""
    assert not out.exists()
    with pytest.raises(RgeomError, match="missing file"):
        read_table(out)


def manifest(out: Path) -> dict:
    return json.loads((parts_dir(out) / Shards.MANIFEST).read_text())


@pytest.fixture(scope="module")
def gen_reference(tiny, tiny_model_dir, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen_ref") / "gen.parquet"
    run_generation(tiny, tiny_model_dir, inputs["gen"], out)()
    assert not parts_dir(out).exists()
    return out


@pytest.fixture(scope="module")
def act_reference(tiny, tiny_model_dir, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("act_ref") / "acts.parquet"
    run_extraction(tiny, tiny_model_dir, inputs, out)()
    return out


def test_generation_killed_mid_shard_and_before_rename_resumes(
    tiny, tiny_model_dir, inputs, gen_reference, tmp_path, caplog
):
    out = tmp_path / "gen.parquet"
    run = run_generation(tiny, tiny_model_dir, inputs["gen"], out)
    n_shards = N_PROMPTS // 4
    after = random.Random(SEED).randint(1, n_shards - 1)
    killed(run, f"shard@{after}:gen.parquet")
    no_visible_output(out)
    assert manifest(out)["complete"] == list(range(after))
    # Killed again with every shard done and the output's temporary file complete but not
    # renamed: still nothing under the output's name.
    killed(run, "replace:gen.parquet")
    no_visible_output(out)
    assert list(tmp_path.glob(".gen.parquet.*.tmp"))
    assert manifest(out)["complete"] == list(range(n_shards))
    with caplog.at_level(logging.INFO, logger="rgeom"):
        run()
    assert f"{n_shards} of {n_shards} shards already done" in caplog.text
    assert_same_file(out, gen_reference)
    assert not parts_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.parquet"]


def test_generation_shards_of_other_inputs_are_discarded(
    tiny, tiny_model_dir, inputs, gen_reference, tmp_path, caplog
):
    out = tmp_path / "gen.parquet"
    other = {"max_new_tokens": 3}
    killed(run_generation(tiny, tiny_model_dir, inputs["gen"], out, other), "shard@2")
    assert manifest(out)["complete"] == [0, 1]
    with caplog.at_level(logging.INFO, logger="rgeom"):
        run_generation(tiny, tiny_model_dir, inputs["gen"], out)()
    assert "discarding" in caplog.text and "already done" not in caplog.text
    assert_same_file(out, gen_reference)


def test_a_corrupt_listed_shard_is_redone(tiny, tiny_model_dir, inputs, gen_reference, tmp_path):
    out = tmp_path / "gen.parquet"
    run = run_generation(tiny, tiny_model_dir, inputs["gen"], out)
    killed(run, "shard@3")
    shard = parts_dir(out) / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    run()
    assert_same_file(out, gen_reference)


def test_sharded_generation_equals_one_piece(tiny, tiny_model_dir, inputs, gen_reference, tmp_path):
    """Shards are whole batches of one global length sort: the shard size changes no row."""
    out = tmp_path / "gen.parquet"
    generate = {"shard_size": 10_000}
    run_generation(tiny, tiny_model_dir, inputs["gen"], out, generate)()
    assert read_table(out).equals(read_table(gen_reference))


def test_extraction_killed_at_three_points_resumes(
    tiny, tiny_model_dir, inputs, act_reference, tmp_path, caplog
):
    out = tmp_path / "acts.parquet"
    run = run_extraction(tiny, tiny_model_dir, inputs, out)
    rng = random.Random(SEED)
    # Mid-file inside the first shard: 2 layers x 2 batches = 4 row groups per shard.
    killed(run, f"parquet_write@{rng.randint(1, 3)}:shard-00000.parquet")
    no_visible_output(out)
    # The half-written shard is a temporary file that no reader is ever pointed at.
    (stale,) = parts_dir(out).glob(".*.tmp")
    with pytest.raises(pa.ArrowInvalid):
        pq.read_metadata(stale)
    assert manifest(out)["complete"] == []
    after = rng.randint(1, 4)
    killed(run, f"shard@{after}:acts.parquet")
    no_visible_output(out)
    assert manifest(out)["complete"] == list(range(after))
    assert not list(parts_dir(out).glob(".*.tmp"))
    # Mid-way through concatenating the finished shards into the output.
    killed(run, f"parquet_write@{rng.randint(1, 17)}:acts.parquet")
    no_visible_output(out)
    with caplog.at_level(logging.INFO, logger="rgeom"):
        run()
    assert "5 of 5 shards already done" in caplog.text
    assert_same_file(out, act_reference)
    assert not parts_dir(out).exists()


def test_killed_mid_parquet_write_leaves_only_a_temporary(tmp_path):
    """A streamed Parquet write killed after a random number of row groups."""
    after = random.Random(SEED).randint(1, 4)
    out = tmp_path / "t.parquet"
    schema = pa.schema([("a", pa.int64())])

    def write():
        with TableWriter(out, schema, {}) as writer:
            for i in range(5):
                writer.write(pa.table({"a": list(range(i * 100, i * 100 + 100))}))

    killed(write, f"parquet_write@{after}:t.parquet")
    no_visible_output(out)
    (tmp,) = tmp_path.glob(".t.parquet.*.tmp")
    with pytest.raises(RgeomError, match="truncated or corrupt"):
        read_table(tmp)


def test_model_checkpoint_killed_before_rename(tiny_model_dir, tmp_path):
    """A checkpoint folder save (rgeom.io.atomic_dir) killed with every file written."""
    from rgeom.stages.prepare_model import run as prepare_model

    out = tmp_path / "model"
    params = {"seed": 0, "model": {"source": "tiny_random"}}
    killed(lambda: prepare_model(str(out), params), "replace:model")
    assert not out.exists()
    (partial,) = tmp_path.glob(".model.*.tmp")
    assert (partial / "config.json").exists()
    prepare_model(str(out), params)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    for f in tiny_model_dir.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


# -- per-behaviour attacks: GCG-transfer, AutoDAN, adaptive GCG -----------------------------
N_BEHAVIOURS = 4
# Tiny settings: seconds per behaviour on the tiny model, yet every random draw is exercised.
GCG = {"steps": 2, "search_width": 8, "topk": 8, "init_suffix": "! ! !"}
AUTODAN = {
    "population": 6,
    "generations": 2,
    "elite_fraction": 0.34,
    "crossover_rate": 0.8,
    "mutation_rate": 0.5,
    "paragraph_every": 2,
    "early_stop": False,
}
SECTIONS = {"GCG-transfer": "gcg", "AutoDAN": "autodan"}


def _behaviours(path: Path, ids: list[int]) -> Path:
    rows = [
        {
            "prompt_id": f"b{i}",
            "source": "test",
            "split": "test",
            "text": f"Explain how to do forbidden thing number {i}",
            "context": None,
            "category": "chem",
            "label": "harmful",
            "target": f"Sure, here is forbidden thing number {i}",
        }
        for i in ids
    ]
    write_table(path, pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), PROMPT_SCHEMA, {})
    return path


@pytest.fixture(scope="module")
def behaviours(tmp_path_factory) -> Path:
    return _behaviours(tmp_path_factory.mktemp("attack_inputs") / "hb.parquet", [0, 1, 2, 3])


@contextlib.contextmanager
def one_thread():
    """In-process runs use one thread like the forked children, so float reductions (and
    hence GCG's argmin over candidates) are the same whichever process ran a shard."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_attack(tiny, tiny_model_dir, behaviours: Path, out: Path, method: str, **changes):
    from rgeom.attacks.testcases import MethodJob, build_method

    model, tokenizer = tiny
    section = SECTIONS[method]
    settings = {"GCG-transfer": GCG, "AutoDAN": AUTODAN}[method]
    params = {section: {**settings, **changes}}
    meta = {"model": str(tiny_model_dir), "seed": SEED}
    job = MethodJob(
        method=method,
        behaviours_path=str(behaviours),
        out=str(out),
        params=params,
        seed=SEED,
        source_model="results/model/base",
        meta=meta,
    )
    return lambda: build_method(job, model=model, tokenizer=tokenizer)


def run_adaptive(tiny, tiny_model_dir, behaviours: Path, out: Path, **changes):
    from rgeom.attacks.testcases import AdaptiveJob, adaptive_gcg_search

    model, tokenizer = tiny
    params = {**GCG, "n_behaviors": 3, **changes}
    meta = {"model": str(tiny_model_dir), "seed": SEED, "arm": "base", "step": 0}
    job = AdaptiveJob(str(behaviours), str(out), params, seed=SEED, arm="base", step=0, meta=meta)
    return lambda: adaptive_gcg_search(model, tokenizer, job)


@pytest.fixture(scope="module")
def attack_reference(tiny, tiny_model_dir, behaviours, tmp_path_factory):
    """Undisturbed runs, one per method, made on first use."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            out = tmp_path_factory.mktemp("attack_ref") / f"{method}.parquet"
            with one_thread():
                if method == "adaptive":
                    run_adaptive(tiny, tiny_model_dir, behaviours, out)()
                else:
                    run_attack(tiny, tiny_model_dir, behaviours, out, method)()
            assert not parts_dir(out).exists()
            done[method] = out
        return done[method]

    return get


def attacked(log_text: str, method: str) -> list[str]:
    """The behaviours a run really optimised, from the line each logs when done."""
    name = {"GCG-transfer": "GCG", "AutoDAN": "AutoDAN", "adaptive": "adaptive GCG"}[method]
    return re.findall(rf"^{name} (\S+): loss", log_text, flags=re.MULTILINE)


@pytest.mark.parametrize("method", ["GCG-transfer", "AutoDAN"])
def test_attack_killed_after_k_behaviours_resumes(
    tiny, tiny_model_dir, behaviours, attack_reference, tmp_path, caplog, method
):
    reference = attack_reference(method)
    out = tmp_path / f"{method}.parquet"
    run = run_attack(tiny, tiny_model_dir, behaviours, out, method)
    after = random.Random(f"{SEED}{method}").randint(1, N_BEHAVIOURS - 1)
    killed(run, f"shard@{after}:{method}.parquet")
    no_visible_output(out)
    ids = [f"b{i}" for i in range(N_BEHAVIOURS)]
    # One behaviour per shard, keyed by its id.
    assert manifest(out)["complete"] == list(range(after))
    assert manifest(out)["inputs"]["keys"] == ids
    with one_thread(), caplog.at_level(logging.INFO, logger="rgeom"):
        run()
    assert f"{after} of {N_BEHAVIOURS} shards already done" in caplog.text
    # The finished behaviours were read back, not attacked again.
    assert attacked("\n".join(caplog.messages), method) == ids[after:]
    assert_same_file(out, reference)
    assert not parts_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_attack_shards_of_other_params_are_discarded(
    tiny, tiny_model_dir, behaviours, attack_reference, tmp_path, caplog
):
    reference = attack_reference("GCG-transfer")
    out = tmp_path / "GCG-transfer.parquet"
    other = run_attack(tiny, tiny_model_dir, behaviours, out, "GCG-transfer", steps=1)
    killed(other, "shard@2:GCG-transfer.parquet")
    assert manifest(out)["complete"] == [0, 1]
    with one_thread(), caplog.at_level(logging.INFO, logger="rgeom"):
        run_attack(tiny, tiny_model_dir, behaviours, out, "GCG-transfer")()
    assert "discarding" in caplog.text and "already done" not in caplog.text
    assert attacked("\n".join(caplog.messages), "GCG-transfer") == [
        f"b{i}" for i in range(N_BEHAVIOURS)
    ]
    assert_same_file(out, reference)


def test_gcg_suffix_depends_only_on_seed_and_behaviour(
    tiny, tiny_model_dir, attack_reference, tmp_path
):
    """Per-behaviour seeds: a behaviour attacked after none, or after three others, gets the
    same suffix (one random stream over the run would give b3 a different one)."""
    reference = read_table(attack_reference("GCG-transfer")).to_pylist()
    alone = _behaviours(tmp_path / "hb3.parquet", [3])
    out = tmp_path / "GCG-transfer.parquet"
    with one_thread():
        run_attack(tiny, tiny_model_dir, alone, out, "GCG-transfer")()
    (row,) = read_table(out).to_pylist()
    want = next(r for r in reference if r["behavior_id"] == "b3")
    # GCG moved away from the start, so equal suffixes say something about the seeding.
    assert want["suffix"] != GCG["init_suffix"] and want["loss"] < want["initial_loss"]
    assert (row["suffix"], row["loss"]) == (want["suffix"], want["loss"])


def test_adaptive_gcg_killed_after_a_behaviour_resumes(
    tiny, tiny_model_dir, behaviours, attack_reference, tmp_path, caplog
):
    from rgeom.attacks.testcases import ADAPTIVE_CASES_SCHEMA

    reference = attack_reference("adaptive")
    out = tmp_path / "adaptive_gcg_cases.parquet"
    run = run_adaptive(tiny, tiny_model_dir, behaviours, out)
    killed(run, "shard@2:adaptive_gcg_cases.parquet")
    no_visible_output(out)
    assert manifest(out)["complete"] == [0, 1]
    with one_thread(), caplog.at_level(logging.INFO, logger="rgeom"):
        run()
    assert "2 of 3 shards already done" in caplog.text
    assert len(attacked("\n".join(caplog.messages), "adaptive")) == 1
    assert_same_file(out, reference)
    assert read_table(out, ADAPTIVE_CASES_SCHEMA).num_rows == 3
    assert not parts_dir(out).exists()
    # A changed setting discards the shards: the other run attacks all three again.
    caplog.clear()
    out.unlink()
    killed(run_adaptive(tiny, tiny_model_dir, behaviours, out, topk=4), "shard@1")
    with one_thread(), caplog.at_level(logging.INFO, logger="rgeom"):
        run()
    assert "discarding" in caplog.text
    assert len(attacked("\n".join(caplog.messages), "adaptive")) == 3
    assert_same_file(out, reference)


# -- through Snakemake ---------------------------------------------------------------------
CELL = "results/base/step-000000"
TARGETS = [f"{CELL}/activations.parquet", f"{CELL}/generations/xstest.parquet"]
# The .test/ config with shards small enough that each job has several.
SHARDED = {
    "activations": {"batch_size": 2, "shard_size": 4},
    "generate": {"batch_size": 2, "max_new_tokens": 4, "shard_size": 2},
}


@pytest.mark.slow
def test_workflow_jobs_killed_mid_shard_resume_with_rerun_incomplete(tmp_path):
    from dagrun import REPO, env, failure_report, snakemake

    workdir = tmp_path / "wf"
    workdir.mkdir()
    config = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump({**config, **SHARDED}))
    # Every job process counts its own shards: both sharded jobs die at their second one.
    os.environ[FAULT_ENV] = "shard@2"
    try:
        # --keep-going: the first kill must not stop Snakemake from starting the other job.
        res = snakemake(workdir, *TARGETS, "--keep-going", configfile=configfile)
    finally:
        os.environ.pop(FAULT_ENV)
    assert res.returncode != 0, "the injected kills should fail the run"
    assert FAULT_ENV not in env()
    for target in TARGETS:
        out = workdir / target
        # Snakemake removed the failed job's declared output (there was none: the writes
        # are atomic) but left the undeclared parts folder for the rerun.
        assert not out.exists()
        if not (parts_dir(out) / Shards.MANIFEST).exists():
            pytest.fail(f"{target} was not killed mid-shard\n" + failure_report(res, workdir))
        assert manifest(out)["complete"] == [0, 1], target

    res = snakemake(workdir, *TARGETS, "--rerun-incomplete", configfile=configfile)
    if res.returncode != 0:
        pytest.fail(failure_report(res, workdir))
    resumed = {}
    for target in TARGETS:
        out = workdir / target
        assert not parts_dir(out).exists()
        resumed[target] = tmp_path / Path(target).name
        shutil.copy(out, resumed[target])
    logs = workdir / "results" / "logs"
    assert "2 of" in (logs / "extract_activations" / "base-000000.log").read_text()
    assert "2 of" in (logs / "generate" / "base-000000-xstest.log").read_text()

    # The undisturbed run: the same jobs forced again, with nothing left to resume.
    res = snakemake(
        workdir,
        *TARGETS,
        "--forcerun",
        "extract_activations",
        "generate",
        configfile=configfile,
    )
    if res.returncode != 0:
        pytest.fail(failure_report(res, workdir))
    for target in TARGETS:
        assert_same_file(resumed[target], workdir / target)
