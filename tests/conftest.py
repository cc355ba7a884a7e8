"""Shared fixtures: tiny random models for speed, the real SmolLM2 for `slow` tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RGEOM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    # The upstream benchmark files live beside the project, never inside it.
    assert SHARED_DATA.is_dir(), f"benchmark files expected at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rgeom.models import prepare_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    prepare_model("tiny_random", out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of a 2-layer random Llama with a ChatML tokenizer."""
    from rgeom.models import load_model, load_tokenizer

    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session (about 40 s)."""
    from rgeom.models import prepare_model

    cached = os.environ.get("RGEOM_SMOLLM2_DIR")
    if cached and Path(cached, "config.json").exists():
        return Path(cached)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    prepare_model("smollm2_gguf", out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from rgeom.models import load_model, load_tokenizer

    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The whole .test/ workflow run once locally (a 2-layer random Llama, 1-2 min), shared
    by test_workflow, test_caching and test_slurm. Tests that edit it work on a copy."""
    from dagrun import failure_report, snakemake

    workdir = tmp_path_factory.mktemp("workflow")
    res = snakemake(workdir)
    if res.returncode != 0:
        pytest.fail(failure_report(res, workdir))
    return workdir
