"""generate.backend: hf by default (vLLM never imported), vllm behind the switch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pyarrow as pa
import pytest

from rgeom.errors import RgeomError
from rgeom.generation import GENERATION_SCHEMA
from rgeom.io import read_meta, read_table
from rgeom.stages.generate import run as run_generate

PARAMS = {"model": {"device": "cpu"}, "seed": 0, "arm": "sft", "step": 2, "benchmark": "b"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from rgeom.data import prepare_set

    out = tmp_path_factory.mktemp("prompts") / "harmful.parquet"
    spec = {"format": "builtin", "path": "harmful", "split": "test", "limit": 3}
    prepare_set("harmbench", spec, ".", 0, out, {})
    return out


def test_hf_backend_never_imports_vllm(tiny_model_dir, prompts, tmp_path):
    """A stand-in vllm package is importable, so any import of it would show."""
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("IMPORTED = True\n")
    out = tmp_path / "gen.parquet"
    params = {**PARAMS, "generate": {"backend": "hf", "max_new_tokens": 2}}
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        import importlib.util
        assert importlib.util.find_spec("vllm") is not None  # the stand-in is visible
        from rgeom.cli import main
        rc = main(["generate", "--model", {str(tiny_model_dir)!r}, "--prompts",
                   {str(prompts)!r}, "--out", {str(out)!r}, "--params", {json.dumps(params)!r}])
        print("VLLM_IMPORTED", "vllm" in sys.modules, rc)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert "VLLM_IMPORTED False 0" in res.stdout, res.stderr[-2000:]
    assert read_table(out, GENERATION_SCHEMA).num_rows == 3


def test_vllm_backend_without_vllm_is_one_clear_error(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "gen.parquet"
    params = json.dumps({**PARAMS, "generate": {"backend": "vllm"}})
    # sys.modules["vllm"] = None makes `import vllm` fail even where vLLM is installed.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vllm"] = None
        from rgeom.cli import main
        sys.exit(main(["generate", "--model", {str(tiny_model_dir)!r}, "--prompts",
                       {str(prompts)!r}, "--out", {str(out)!r}, "--params", {params!r}]))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, res.stderr[-2000:]
    assert "generate.backend" in errors[0] and ".[vllm]" in errors[0]
    assert not out.exists()


def test_unknown_backend_is_an_error(tiny_model_dir, prompts, tmp_path):
    params = {**PARAMS, "generate": {"backend": "tgi"}}
    with pytest.raises(RgeomError, match="'tgi'"):
        run_generate(str(tiny_model_dir), str(prompts), str(tmp_path / "g.parquet"), params)


def _fake_vllm(model, tokenizer, calls):
    """A stand-in vllm module: greedy HF generation, one prompt at a time, from token ids."""
    import torch

    class SamplingParams:
        def __init__(self, **kw):
            calls["sampling"] = kw
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, sampling_params):
            outs = []
            for p in prompts:
                ids = torch.tensor([p["prompt_token_ids"]])
                seq = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=sampling_params.kw["max_tokens"],
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )[0, ids.shape[1] :].tolist()
                completion = types.SimpleNamespace(token_ids=seq)
                outs.append(types.SimpleNamespace(outputs=[completion]))
            return outs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, __version__="fake")


def test_vllm_backend_writes_what_the_hf_backend_writes(
    tiny, tiny_model_dir, prompts, tmp_path, monkeypatch
):
    model, tokenizer = tiny
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(model, tokenizer, calls))
    gen = {"max_new_tokens": 6, "vllm": {"gpu_memory_utilization": 0.5}}
    hf_out, vllm_out = tmp_path / "hf.parquet", tmp_path / "vllm.parquet"
    run_generate(str(tiny_model_dir), str(prompts), str(hf_out), {**PARAMS, "generate": gen})
    run_generate(
        str(tiny_model_dir),
        str(prompts),
        str(vllm_out),
        {**PARAMS, "generate": {**gen, "backend": "vllm"}},
    )
    hf, vl = read_table(hf_out, GENERATION_SCHEMA), read_table(vllm_out, GENERATION_SCHEMA)
    assert vl.schema.remove_metadata() == hf.schema.remove_metadata()
    assert vl.to_pylist() == hf.to_pylist()
    assert any(n > 0 for n in vl.column("n_new_tokens").to_pylist())
    # Greedy, the same token budget, the model dir and the seed of the config.
    assert calls["sampling"] == {"temperature": 0.0, "max_tokens": 6}
    assert calls["llm"]["model"] == str(tiny_model_dir) and calls["llm"]["seed"] == 0
    assert calls["llm"]["gpu_memory_utilization"] == 0.5
    meta = read_meta(vllm_out)
    assert meta["backend"] == "vllm" and meta["arm"] == "sft" and meta["step"] == 2


def test_completions_end_at_eos(tiny):
    from rgeom.vllm_backend import vllm_completions

    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    word = tokenizer("hello", add_special_tokens=False)["input_ids"]

    class LLM:
        def generate(self, prompts, sampling):
            seqs = [word + [eos] + word, word]
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=s)]) for s in seqs
            ]

    texts, n_new = vllm_completions(LLM(), None, tokenizer, [[1], [2]])
    assert texts == ["hello", "hello"] and n_new == [len(word), len(word)]
    with pytest.raises(RgeomError, match="2 completions for 3"):
        vllm_completions(LLM(), None, tokenizer, [[1], [2], [3]])


def test_generation_schema_is_shared():
    import rgeom.vllm_backend as vb

    assert pa.types.is_string(GENERATION_SCHEMA.field("completion").type)
    assert "vllm" not in vars(vb)  # the module holds no import of vllm at load time
