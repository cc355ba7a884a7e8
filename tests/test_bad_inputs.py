"""Malformed inputs through the real console script: one clear line, exit 1, no output.

Every case runs ``python -m rgeom.cli <stage> ...`` in a subprocess, as a Snakemake rule
would, and expects exit code 1, no traceback, exactly one ``rgeom <cmd>: error:`` line that
names the file, key or row at fault, and no output file (nor a leftover temporary one).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from rgeom.cli import COMMANDS
from rgeom.config import ROLE_SETS
from rgeom.errors import RgeomError
from rgeom.profiles import check_profile, rule_names

RGEOM = [sys.executable, "-m", "rgeom.cli"]
HB_HEADER = "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"


def run(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [*RGEOM, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def error_lines(res: subprocess.CompletedProcess, command: str) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith(f"rgeom {command}: error:")]


@dataclass
class Ctx:
    """What a case may use: a scratch folder and the session's tiny model and inputs."""

    tmp: Path
    request: pytest.FixtureRequest

    @property
    def inputs(self) -> Path:
        path = self.tmp / "in"
        path.mkdir(exist_ok=True)
        return path

    @property
    def out(self) -> Path:
        path = self.tmp / "out"
        path.mkdir(exist_ok=True)
        return path

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.inputs / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@dataclass
class Case:
    """``build(ctx)`` -> (argv after ``rgeom``, outputs that must not appear, needles)."""

    id: str
    build: Callable[[Ctx], tuple[list[str], list[Path], list[str]]]


# --- config ------------------------------------------------------------------------------


def config_case(case_id: str, text: str | bytes, *needles: str) -> Case:
    def build(ctx: Ctx):
        path = ctx.write("cfg.yaml", text)
        return ["check-config", str(path)], [], ["cfg.yaml", *needles]

    return Case(f"config-{case_id}", build)


def _sets_yaml(first: str) -> str:
    """``data.sets`` with every role set builtin but the first, given as ``name: spec``."""
    names = [*ROLE_SETS[1:], "harmbench", "xstest", "utility"]
    rest = [f"    {name}: {{format: builtin, path: harmless}}" for name in names]
    return "data:\n  sets:\n    " + first + "\n" + "\n".join(rest) + "\n"


CONFIG_CASES = [
    config_case("wrong-type", "train:\n  learning_rate: fast\n", "train.learning_rate", "type"),
    config_case("wrong-type-list", "anchors: 10\n", "key anchors", "type"),
    config_case("unknown-key", "trian:\n  max_steps: 2\n", "unknown key trian"),
    config_case("unknown-nested-key", "train:\n  max_step: 2\n", "unknown key train.max_step"),
    config_case(
        "unknown-dataset-key",
        "data:\n  sets:\n    harmbench: {format: builtin, pth: harmful}\n",
        "data.sets.harmbench.pth",
    ),
    config_case("anchors-unsorted", "anchors: [0, 10, 5]\n", "anchors", "strictly increasing"),
    config_case(
        "anchor-beyond-max-steps",
        "anchors: [0, 10, 30]\ntrain:\n  max_steps: 20\n",
        "anchors",
        "[30]",
        "train.max_steps=20",
    ),
    config_case("unknown-arm", "arms: [sft, dpo]\n", "key arms", "'dpo'"),
    config_case("zero-stage-1", "train:\n  zero_stage: 1\n", "train.zero_stage"),
    config_case(
        "r2d2-pool-too-small",
        "arms: [sft, r2d2]\nr2d2:\n  pool_size: 4\n  updates_per_step: 8\n",
        "r2d2.pool_size",
        "r2d2.updates_per_step=8",
    ),
    config_case(
        "builtin-name-typo",
        _sets_yaml("train_harmful: {format: builtin, path: harmfull}"),
        "data.sets.train_harmful.path",
        "'harmfull' is not a builtin set",
        "harmful, harmless, xstest, utility",
    ),
    config_case(
        "data-file-missing",
        "data:\n  shared_dir: /nonexistent-rgeom\n"
        + _sets_yaml("train_harmful: {format: harmbench_csv, path: hb.csv}").split("\n", 1)[1],
        "data.sets.train_harmful.path",
        "/nonexistent-rgeom/hb.csv does not exist",
    ),
    config_case("benchmark-not-a-set", "benchmarks: [xstest, nope]\n", "benchmarks", "'nope'"),
    config_case("not-yaml", "train: [max_steps: 2\n", "not valid YAML"),
    config_case("not-utf8", "seed: 0\n# caf\xe9\n".encode("latin-1"), "not UTF-8"),
    config_case("not-a-mapping", "- seed\n- 0\n", "top level"),
]


# --- benchmark files through prepare-data ------------------------------------------------


def data_case(
    case_id: str,
    name: str,
    content: str | bytes,
    spec: dict,
    *needles: str,
    tokenizer: bool = False,
    extra: dict | None = None,
) -> Case:
    def build(ctx: Ctx):
        ctx.write(name, content)
        out = ctx.out / "set.parquet"
        params = {"spec": {**spec, "path": name}, "shared_dir": str(ctx.inputs), **(extra or {})}
        argv = ["prepare-data", "--name", "s", "--out", str(out), "--params", json.dumps(params)]
        if tokenizer:
            argv += ["--tokenizer", str(ctx.fixture("tiny_model_dir"))]
        return argv, [out], [name, *needles]

    return Case(f"data-{case_id}", build)


LONG = " ".join(["word"] * 300)
DATA_CASES = [
    data_case(
        "xstest-missing-column",
        "xs.csv",
        "id,prompt\n1,How do I kill a process?\n",
        {"format": "xstest_csv"},
        "missing required column",
        "type",
    ),
    data_case(
        "harmbench-missing-column",
        "hb.csv",
        "Behavior,Tags,BehaviorID\nDo a thing,,x1\n",
        {"format": "harmbench_csv"},
        "ContextString",
    ),
    data_case(
        "advbench-missing-column",
        "adv.csv",
        "prompt,target\nDo a thing,Sure\n",
        {"format": "advbench_csv"},
        "goal",
    ),
    data_case(
        "not-utf8",
        "hb.csv",
        (HB_HEADER + "Caf\xe9 thing,standard,illegal,,,x1\n").encode("latin-1"),
        {"format": "harmbench_csv"},
        "not UTF-8",
        "line 2",
    ),
    data_case(
        "empty-prompt",
        "xs.csv",
        "id,prompt,type\n1,How do I kill a process?,homonyms\n2,  ,contrast_homonyms\n",
        {"format": "xstest_csv"},
        "row 2",
        "xstest-2",
        "empty prompt",
    ),
    data_case(
        "duplicate-id",
        "hb.csv",
        HB_HEADER + "Do a thing,standard,illegal,,,x1\nDo another,standard,illegal,,,x1\n",
        {"format": "harmbench_csv"},
        "duplicate prompt id",
        "'x1'",
        "row 2",
    ),
    data_case(
        "prompt-too-long",
        "p.jsonl",
        json.dumps({"id": "ok", "prompt": "short"})
        + "\n"
        + json.dumps({"id": "long-one", "prompt": LONG})
        + "\n",
        {"format": "jsonl", "label": "harmful"},
        "line 2",
        "long-one",
        "max_prompt_tokens = 64",
        tokenizer=True,
        extra={"max_prompt_tokens": 64},
    ),
    data_case(
        "jsonl-malformed-line",
        "p.jsonl",
        '{"prompt": "fine", "label": "harmful"}\n{"prompt": "broken", \n',
        {"format": "jsonl"},
        "line 2 does not parse as JSON (column 22",
    ),
    data_case(
        "jsonl-line-not-an-object",
        "p.jsonl",
        '{"prompt": "fine", "label": "harmful"}\n["a", "list"]\n',
        {"format": "jsonl"},
        "line 2",
        "not a JSON object",
    ),
    data_case(
        "json-malformed",
        "harmful_x.json",
        '[{"instruction": "ok", "category": null},\n {"instruction": oops}]',
        {"format": "arditi_json"},
        "line 2",
        "JSON",
    ),
    data_case(
        "json-not-a-list",
        "harmful_x.json",
        '{"instruction": "ok"}',
        {"format": "arditi_json"},
        "JSON list",
    ),
]


# --- Parquet tables, models and tokenizers -----------------------------------------------


def _rgeom_table(path: Path, table: pa.Table) -> Path:
    from rgeom.io import write_table

    write_table(path, table, table.schema, {"arm": "sft", "step": 2})
    return path


def _generations(path: Path, drop: str | None = None) -> Path:
    cols = {
        "prompt_id": ["a", "b"],
        "label": ["harmful", "safe"],
        "category": [None, None],
        "target": [None, None],
        "completion": ["I'm sorry, I can't.", "Sure, here it is."],
        "arm": ["sft", "sft"],
        "step": [2, 2],
        "benchmark": ["xstest", "xstest"],
    }
    cols.pop(drop, None)
    return _rgeom_table(path, pa.table(cols))


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def judge_case(case_id: str, make: Callable[[Path], Path], *needles: str) -> Case:
    def build(ctx: Ctx):
        gen = make(ctx.inputs / "gen.parquet")
        labels, metrics = ctx.out / "labels.parquet", ctx.out / "metrics.parquet"
        argv = ["judge", "--generations", str(gen), "--labels", str(labels)]
        argv += ["--metrics", str(metrics)]
        return argv, [labels, metrics], ["gen.parquet", *needles]

    return Case(f"judge-{case_id}", build)


def _activations(ctx: Ctx, path: Path, drop: str | None = None) -> Path:
    """A copy of the tiny model's real activation table, optionally without a column."""
    from rgeom.io import read_meta, read_table, write_table

    source = ctx.fixture("cell")["activations"]
    table = read_table(source)
    if drop is None:
        shutil.copyfile(source, path)
    else:
        table = table.drop_columns([drop])
        write_table(path, table, table.schema, read_meta(source))
    return path


def directions_case(case_id: str, make: Callable[[Ctx, Path], Path], *needles: str) -> Case:
    def build(ctx: Ctx):
        acts = make(ctx, ctx.inputs / "acts.parquet")
        out = ctx.out / "directions.parquet"
        argv = ["directions", "--activations", str(acts), "--out", str(out)]
        return argv, [out], ["acts.parquet", *needles]

    return Case(f"directions-{case_id}", build)


def _model_copy(ctx: Ctx, name: str) -> Path:
    copy = ctx.inputs / name
    shutil.copytree(ctx.fixture("tiny_model_dir"), copy)
    return copy


def _no_weights(ctx: Ctx) -> Path:
    copy = _model_copy(ctx, "ckpt-no-weights")
    (copy / "model.safetensors").unlink()
    return copy


def _without(ctx: Ctx, name: str, *files: str) -> Path:
    copy = _model_copy(ctx, name)
    for f in files:
        (copy / f).unlink(missing_ok=True)
    return copy


def _no_chat_template(ctx: Ctx) -> Path:
    copy = _model_copy(ctx, "ckpt-no-template")
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return copy


def generate_case(
    case_id: str, model: Callable[[Ctx], Path], needles: Callable[[Path], list[str]]
) -> Case:
    def build(ctx: Ctx):
        model_dir = model(ctx)
        out = ctx.out / "gen.parquet"
        argv = ["generate", "--model", str(model_dir), "--prompts", str(ctx.fixture("prompts"))]
        argv += ["--out", str(out), "--params", json.dumps({"model": {"device": "cpu"}})]
        return argv, [out], needles(model_dir)

    return Case(f"generate-{case_id}", build)


def _other_tokenizer(ctx: Ctx) -> Path:
    """The tiny model with one more token in its vocabulary (same chat template)."""
    from rgeom.models import load_tokenizer

    copy = _model_copy(ctx, "other-tokenizer")
    tok = load_tokenizer(copy)
    tok.add_tokens(["<|rgeom_extra|>"])
    tok.save_pretrained(copy)
    return copy


def carriers_mismatch(ctx: Ctx):
    if "carriers" not in COMMANDS:
        pytest.skip("no `rgeom carriers` stage to check activations against a model")
    cell = ctx.fixture("cell")
    model_dir = _other_tokenizer(ctx)
    out = ctx.out / "carriers.parquet"
    argv = ["carriers", "--model", str(model_dir), "--directions", str(cell["directions"])]
    argv += ["--val-harmful", str(cell["harmful"]), "--val-harmless", str(cell["harmless"])]
    argv += ["--out", str(out), "--params", json.dumps({"model": {"device": "cpu"}})]
    return argv, [out], ["directions.parquet", "tokenizer_hash", "differs"]


def params_case(case_id: str, params: str, *needles: str) -> Case:
    def build(ctx: Ctx):
        out = ctx.out / "set.parquet"
        argv = ["prepare-data", "--name", "s", "--out", str(out), "--params", params]
        return argv, [out], needles

    return Case(f"params-{case_id}", build)


STAGE_CASES = [
    judge_case("truncated-parquet", lambda p: _truncate(_generations(p)), "truncated or corrupt"),
    judge_case("missing-column", lambda p: _generations(p, drop="completion"), "'completion'"),
    judge_case("not-parquet", lambda p: (p.write_text("a,b\n1,2\n"), p)[1], "not a readable"),
    directions_case(
        "truncated-parquet", lambda c, p: _truncate(_activations(c, p)), "truncated or corrupt"
    ),
    directions_case(
        "missing-column", lambda c, p: _activations(c, p, drop="vector"), "missing", "vector"
    ),
    generate_case(
        "checkpoint-without-weights",
        _no_weights,
        lambda m: [m.name, "no safetensors weights"],
    ),
    generate_case(
        "model-folder-empty",
        lambda ctx: (ctx.inputs / "empty-model").mkdir() or ctx.inputs / "empty-model",
        lambda m: [str(m), "is empty", "config.json", "tokenizer files"],
    ),
    generate_case(
        "model-folder-without-tokenizer",
        lambda ctx: _without(ctx, "ckpt-no-tokenizer", "tokenizer.json", "tokenizer_config.json"),
        lambda m: [str(m), "no tokenizer files"],
    ),
    generate_case(
        "model-path-missing",
        lambda ctx: ctx.inputs / "no-such-model",
        lambda m: [m.name, "does not exist"],
    ),
    generate_case(
        "tokenizer-without-chat-template",
        _no_chat_template,
        lambda m: [m.name, "no chat template"],
    ),
    Case("carriers-activations-from-another-tokenizer", carriers_mismatch),
    # argparse reports a malformed --params as a usage error (exit 2, see test below).
    params_case("missing-spec", "{}", "--params", "'spec'"),
    params_case(
        "unknown-format",
        json.dumps({"spec": {"format": "csv", "path": "p.csv"}}),
        "dataset format 'csv'",
        "xstest_csv",
    ),
]

CASES = CONFIG_CASES + DATA_CASES + STAGE_CASES


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from rgeom.data import prepare_set

    out = tmp_path_factory.mktemp("prompts") / "harmful.parquet"
    spec = {"format": "builtin", "path": "harmful", "split": "test", "limit": 2}
    prepare_set("harmbench", spec, ".", 0, out, {})
    return out


@pytest.fixture(scope="module")
def cell(tmp_path_factory, tiny) -> dict[str, Path]:
    """Prompt sets, activations and directions of the tiny model, made in process."""
    from rgeom.activations import extract_activations
    from rgeom.data import prepare_set
    from rgeom.geometry import diff_in_means_table

    root = tmp_path_factory.mktemp("cell")
    paths = {}
    for name, piece, split in (
        ("dir_harmful", "harmful", "train"),
        ("dir_harmless", "harmless", "train"),
        ("harmful", "harmful", "val"),
        ("harmless", "harmless", "val"),
    ):
        spec = {"format": "builtin", "path": piece, "split": split, "limit": 3}
        paths[name] = root / f"{name}.parquet"
        prepare_set(name, spec, ".", 0, paths[name], {})
    model, tokenizer = tiny
    acts = root / "activations.parquet"
    sets = {"dir_harmful": paths["dir_harmful"], "dir_harmless": paths["dir_harmless"]}
    extract_activations(model, tokenizer, sets, acts, {}, {})
    paths["activations"] = acts
    paths["directions"] = root / "directions.parquet"
    diff_in_means_table(acts, paths["directions"], {})
    return paths


# --- tests -------------------------------------------------------------------------------


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_clear_line(case, tmp_path, request):
    argv, outputs, needles = case.build(Ctx(tmp_path, request))
    command = argv[0]
    res = run(*argv)
    assert res.returncode == 1, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = error_lines(res, command)
    assert len(errors) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    for out in outputs:
        assert not out.exists(), f"{out} was written"
        assert not list(out.parent.glob(f".{out.name}.*")), f"temporary {out.name} left behind"
    if command == "check-config":
        assert res.stdout == "", "a rejected config must not be printed as resolved"


def test_the_intact_inputs_pass(tmp_path, request, tiny_model_dir, prompts):
    """Controls: the matrix's judge, directions and generate inputs minus the defect work."""
    ctx = Ctx(tmp_path, request)
    gen = _generations(ctx.inputs / "gen.parquet")
    labels, metrics = ctx.out / "labels.parquet", ctx.out / "metrics.parquet"
    res = run("judge", "--generations", str(gen), "--labels", str(labels), "--metrics", metrics)
    assert res.returncode == 0 and metrics.exists(), res.stderr[-3000:]
    acts = _activations(ctx, ctx.inputs / "acts.parquet")
    directions = ctx.out / "directions.parquet"
    res = run("directions", "--activations", str(acts), "--out", str(directions))
    assert res.returncode == 0 and directions.exists(), res.stderr[-3000:]
    out = ctx.out / "gen.parquet"
    params = json.dumps({"model": {"device": "cpu"}, "generate": {"max_new_tokens": 2}})
    argv = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out)]
    res = run("generate", *argv, "--params", params)
    assert res.returncode == 0 and out.exists(), res.stderr[-3000:]


@pytest.mark.parametrize(
    ("params", "needle"),
    [("{spec: xstest}", "not valid JSON"), ('["spec"]', "must be a JSON object")],
    ids=["not-json", "not-an-object"],
)
def test_params_that_are_not_a_json_object_are_a_usage_error(tmp_path, params, needle):
    out = tmp_path / "set.parquet"
    res = run("prepare-data", "--name", "s", "--out", str(out), "--params", params)
    # argparse's convention: 2 for a malformed command line, 1 for bad input files.
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = error_lines(res, "prepare-data")
    assert len(errors) == 1, res.stderr
    assert "--params" in errors[0] and needle in errors[0]
    assert not out.exists()


def _prepare(tmp_path: Path, name: str, content: bytes, spec: dict) -> pa.Table:
    from rgeom.data import read_prompts

    (tmp_path / name).write_bytes(content)
    out = tmp_path / "set.parquet"
    params = {"spec": {**spec, "path": name}, "shared_dir": str(tmp_path)}
    res = run("prepare-data", "--name", "s", "--out", str(out), "--params", json.dumps(params))
    assert res.returncode == 0, res.stderr[-3000:]
    assert error_lines(res, "prepare-data") == []
    return read_prompts(out)


def test_crlf_csv_is_accepted_and_normalised(tmp_path):
    body = (
        HB_HEADER
        + 'Summarize the text,contextual,illegal,context,"line one\r\nline two",x1\r\n'
        + '"Two\r\nlines",standard,illegal,,,x2\r\n'
    )
    table = _prepare(tmp_path, "hb.csv", body.encode(), {"format": "harmbench_csv"})
    cols = table.to_pydict()
    assert cols["prompt_id"] == ["x1", "x2"]
    assert cols["context"] == ["line one\nline two", None]
    assert cols["text"] == ["Summarize the text", "Two\nlines"]
    for column in ("prompt_id", "text", "context", "category", "split", "label"):
        assert not any("\r" in (v or "") for v in cols[column]), column


def test_bom_csv_is_accepted(tmp_path):
    body = "id,prompt,type\n1,Kill a process?,homonyms\n2,Kill a person?,contrast_homonyms\n"
    table = _prepare(tmp_path, "xs.csv", b"\xef\xbb\xbf" + body.encode(), {"format": "xstest_csv"})
    cols = table.to_pydict()
    # The BOM must not stick to the first header (which would hide the `id` column).
    assert cols["prompt_id"] == ["xstest-1", "xstest-2"]
    assert cols["label"] == ["safe", "contrast"]
    assert not any(t.startswith("\ufeff") for t in cols["text"] + cols["prompt_id"])


# --- profiles ----------------------------------------------------------------------------


def test_workflow_rules_are_found(repo_root):
    rules = rule_names(repo_root / "workflow" / "rules")
    assert {"generate", "judge", "train", "prepare_data", "summary"} <= rules


@pytest.mark.parametrize("profile", ["slurm", "local"])
def test_profiles_name_only_workflow_rules(repo_root, profile):
    path = repo_root / "profiles" / profile / "config.yaml"
    checked = check_profile(path, repo_root / "workflow" / "rules")
    if profile == "slurm":
        # Every GPU rule must get its resources from the profile.
        assert {"train", "generate", "sft_data", "extract_activations"} <= set(checked)


def test_unknown_rule_in_a_profile_is_named(repo_root, tmp_path):
    import yaml

    source = repo_root / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(source.read_text())
    assert profile["set-resources"], "the slurm profile sets per-rule resources"
    profile["set-resources"]["genrate"] = {"mem_mb": 1000}
    bad = tmp_path / "slurm" / "config.yaml"
    bad.parent.mkdir()
    bad.write_text(yaml.safe_dump(profile))
    with pytest.raises(RgeomError) as err:
        check_profile(bad.parent, repo_root / "workflow" / "rules")
    msg = str(err.value)
    assert "genrate" in msg and str(bad) in msg and "set-resources" in msg
    assert "\n" not in msg


def test_a_rules_dir_without_rules_is_an_error(repo_root, tmp_path):
    with pytest.raises(RgeomError, match="no \\*.smk"):
        check_profile(repo_root / "profiles" / "slurm", tmp_path)
