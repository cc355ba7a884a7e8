"""Stages that need no model never import torch or transformers.

Each import costs a job 2-3 s (about 40 of the embedded demo's jobs are such stages), and
an analysis environment without torch must still run drift, the intervention summary and
the summary. The checks run in a fresh interpreter in which importing either raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCKED = ("torch", "transformers")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            # As if not installed: libraries that probe with find_spec (polars) catch this.
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"blocked for this test: {{name}}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)

#: Modules that stages without a model import; with torch blocked they must import.
TORCH_FREE = (
    "rgeom.cli",
    "rgeom.schemas",
    "rgeom.stages",
    "rgeom.config",
    "rgeom.io",
    "rgeom.layout",
    "rgeom.stage_params",
    "rgeom.stages.train_log",
    "rgeom.train.train_log",
    "rgeom.data",
    "rgeom.geometry",
    "rgeom.drift",
    "rgeom.causal",
    "rgeom.report",
    "rgeom.figures",
    "rgeom.tables",
    "rgeom.status",
    "rgeom.judges",
    "rgeom.judges.validation",
)


def run_blocked(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_blocker_blocks():
    # The check below would pass vacuously if the blocker let torch through.
    res = run_blocked("import torch")
    assert res.returncode != 0 and "blocked for this test: torch" in res.stderr


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    res = run_blocked(
        f"""
        import importlib, sys
        importlib.import_module({module!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_schemas_are_the_ones_the_stages_use():
    # One definition per table: the modules that write or read a table hold the schema
    # object from rgeom.schemas, not a copy that could drift from it.
    import rgeom.attacks.testcases as testcases
    import rgeom.judges as judges
    from rgeom import activations, causal, drift, generation, geometry, interventions, schemas
    from rgeom.data import loaders
    from rgeom.judges import validation
    from rgeom.train import data as train_data
    from rgeom.train import runner

    same = {
        "PROMPT_SCHEMA": loaders,
        "CHAT_PROMPT_SCHEMA": loaders,
        "SFT_SCHEMA": train_data,
        "SFT_FULL_SCHEMA": train_data,
        "TRAIN_LOG_SCHEMA": runner,
        "GENERATION_SCHEMA": generation,
        "LABEL_SCHEMA": judges,
        "METRIC_SCHEMA": judges,
        "AGREEMENT_SCHEMA": validation,
        "CONFUSION_SCHEMA": validation,
        "PREDICTION_SCHEMA": validation,
        "ACTIVATION_SCHEMA": activations,
        "DIRECTION_SCHEMA": geometry,
        "PROMPT_FILTER_SCHEMA": geometry,
        "CARRIER_SCHEMA": interventions,
        "CARRIER_BASE_SCHEMA": causal,
        "INTERVENTION_SCHEMA": causal,
        "CROSS_SCHEMA": causal,
        "DRIFT_SCHEMA": drift,
        "ANGLES_SCHEMA": drift,
        "VERDICT_SCHEMA": drift,
    }
    for name, module in same.items():
        assert getattr(module, name) is getattr(schemas, name), name
    assert generation.SHARD_SCHEMA is schemas.GENERATION_SHARD_SCHEMA
    for name in (
        "TEST_CASE_SCHEMA",
        "ADAPTIVE_CASES_SCHEMA",
        "ADAPTIVE_COMPLETION_SCHEMA",
        "ADAPTIVE_SCHEMA",
        "ADAPTIVE_SHARD_SCHEMA",
    ):
        assert getattr(testcases, name) is getattr(schemas, name), name
    assert activations.activation_schema(8).equals(schemas.activation_schema(8))
    assert isinstance(schemas.direction_schema(8).field("unit").type, pa.FixedSizeListType)


def test_analysis_stages_run_without_torch(tmp_path, tiny_model_dir):
    """prepare-data with its tokenizer length check, judge (refusal_matcher),
    interventions-summary, train-log and the config check, end to end in the blocked
    interpreter."""
    from rgeom.io import write_table
    from rgeom.schemas import GENERATION_SCHEMA, INTERVENTION_SCHEMA

    gens = tmp_path / "gens.parquet"
    rows = [
        {"prompt_id": "a", "label": "safe", "prompt": "How do I kill a process?"},
        {"prompt_id": "b", "label": "safe", "prompt": "How do I bake bread?"},
    ]
    for row, completion in zip(
        rows, ("I'm sorry, I can't help.", "Mix flour and water."), strict=True
    ):
        row.update(completion=completion, arm="base", step=0, benchmark="xstest")
    table = pa.Table.from_pylist(rows, GENERATION_SCHEMA)
    write_table(gens, table, GENERATION_SCHEMA, {"arm": "base", "step": 0, "benchmark": "xstest"})

    tables = []
    for arm, step in (("base", 0), ("sft", 6)):
        row = {f.name: None for f in INTERVENTION_SCHEMA}
        row.update(
            arm=arm,
            step=step,
            intervention="none",
            layer=3,
            position=-1,
            admissible=False,
            carrier_source="fallback_min_bypass",
            refusal_score_harmful=-1.0 - step,
            kl_harmless=0.0,
            n_generate=0,
            n_utility=0,
            judge="refusal_matcher",
        )
        path = tmp_path / f"{arm}-{step}.parquet"
        write_table(path, pa.Table.from_pylist([row], INTERVENTION_SCHEMA), INTERVENTION_SCHEMA, {})
        tables.append(str(path))
    out = tmp_path / "summary"
    state = tmp_path / "train_state"
    state.mkdir()
    row = {"step": 1, "loss": 2.5, "learning_rate": 1e-5, "grad_norm": 1.0}
    row |= {"tokens_per_s": 10.0, "seconds": 0.1, "extra": "{}"}
    (state / "log.jsonl").write_text(json.dumps(row) + "\n")
    res = run_blocked(
        f"""
        import json, sys
        from rgeom.cli import main
        rc = main(["interventions-summary", "--tables", *{tables!r}, "--out-dir", {str(out)!r},
                   "--params", {json.dumps(json.dumps({"arms": ["sft"]}))}])
        assert rc == 0, rc
        rc = main(["check-config", "config/config.yaml"])
        assert rc == 0, rc
        spec = {{"spec": {{"format": "builtin", "path": "xstest"}}, "max_prompt_tokens": 2048}}
        rc = main(["prepare-data", "--name", "xstest", "--out", {str(tmp_path / "x.parquet")!r},
                   "--tokenizer", {str(tiny_model_dir)!r}, "--params", json.dumps(spec)])
        assert rc == 0, rc
        rc = main(["judge", "--generations", {str(gens)!r},
                   "--labels", {str(tmp_path / "l.parquet")!r},
                   "--metrics", {str(tmp_path / "m.parquet")!r}, "--params", '{{"seed": 0}}'])
        assert rc == 0, rc
        rc = main(["train-log", "--arm", "sft", "--state-dir", {str(state)!r},
                   "--out", {str(tmp_path / "log.parquet")!r}, "--params", "{{}}"])
        assert rc == 0, rc
        assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
        """,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "interventions.parquet").exists()
    assert (out / "frontier_sft.png").exists()
    assert (tmp_path / "x.parquet").exists() and (tmp_path / "m.parquet").exists()
    assert (tmp_path / "log.parquet").exists()


def test_seeding_waits_for_torch_and_equals_eager_seeding():
    """seed_everything no longer imports torch; torch imported later starts from the
    state that seeding it eagerly leaves."""
    code = """
        import sys
        from rgeom.stages._common import seed_everything
        seed_everything({seed})
        {eager}
        lazy = "torch" not in sys.modules
        import torch
        print(lazy, torch.initial_seed(), torch.rand(4).tolist())
    """
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = {}
    for name, eager in (("lazy", ""), ("eager", "import torch; torch.manual_seed(5)")):
        res = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code.format(seed=5, eager=eager))],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        out[name] = res.stdout.split(" ", 1)
    assert out["lazy"][0] == "True" and out["eager"][0] == "False"
    assert out["lazy"][1] == out["eager"][1]
    assert out["lazy"][1].startswith("5 ")
