"""rgeom fetch-data / fetch-models: pinned downloads, one error naming what is missing,
reruns that touch nothing, the hub ids paper.yaml needs, and RGEOM_SHARED_DATA."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import yaml

from rgeom.config import load_yaml, validate
from rgeom.errors import RgeomError
from rgeom.fetch import (
    IGNORE_PATTERNS,
    config_files,
    fetch_data,
    fetch_models,
    hub_sets,
    load_manifest,
    manifest_markdown,
    manifest_table_in,
    model_repos,
)

PAPER = Path(__file__).resolve().parents[1] / "config" / "paper.yaml"
FAKE = {
    "alpha/a.csv": b"id,prompt\n1,hello\n",
    "alpha/deep/b.json": b'[{"instruction": "x"}]\n',
    "c.txt": b"plain\n",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _paper() -> dict:
    return validate(load_yaml(PAPER), source=str(PAPER), check_files=False)


# --- a fake upstream: files in tmp_path, served over HTTP from a thread -----------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def upstream(tmp_path):
    root = tmp_path / "upstream"
    for rel, data in FAKE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(path: Path, base: str, pins: dict[str, str] | None = None) -> Path:
    pins = pins or {}
    files = [
        {
            "path": rel,
            "sha256": pins.get(rel, _sha(data)),
            "urls": [f"{base}/{rel}"],
            "source": "fake",
            "licence": "MIT",
        }
        for rel, data in FAKE.items()
    ]
    path.write_text(yaml.safe_dump({"files": files}))
    return path


def test_downloads_over_http_and_verifies_every_pin(upstream, tmp_path, capsys):
    _root, base = upstream
    manifest = _manifest(tmp_path / "m.yaml", base)
    dest = tmp_path / "data"
    done = fetch_data(dest=str(dest), manifest=str(manifest))
    assert sorted(done) == sorted(FAKE)
    for rel, data in FAKE.items():
        assert (dest / rel).read_bytes() == data
    assert not list(dest.rglob("*.part"))
    assert "3 fetched, 0 already present" in capsys.readouterr().out


def test_a_mirror_folder_or_base_url_replaces_the_upstream_urls(upstream, tmp_path):
    root, base = upstream
    dead = f"http://127.0.0.1:{_closed_port()}"
    manifest = _manifest(tmp_path / "m.yaml", dead)
    fetch_data(dest=str(tmp_path / "d1"), manifest=str(manifest), source=str(root))
    fetch_data(dest=str(tmp_path / "d2"), manifest=str(manifest), source=base)
    for rel, data in FAKE.items():
        assert (tmp_path / "d1" / rel).read_bytes() == data
        assert (tmp_path / "d2" / rel).read_bytes() == data


def test_later_urls_are_tried_when_the_first_fails(upstream, tmp_path):
    _root, base = upstream
    dead = f"http://127.0.0.1:{_closed_port()}"
    manifest = _manifest(tmp_path / "m.yaml", base)
    raw = yaml.safe_load(manifest.read_text())
    for item in raw["files"]:
        item["urls"] = [f"{dead}/{item['path']}", *item["urls"]]
    manifest.write_text(yaml.safe_dump(raw))
    assert sorted(fetch_data(dest=str(tmp_path / "d"), manifest=str(manifest))) == sorted(FAKE)


def test_sha256_mismatch_is_an_error_naming_the_file(upstream, tmp_path):
    root, base = upstream
    (root / "alpha/a.csv").write_bytes(b"id,prompt\n1,tampered\n")
    manifest = _manifest(tmp_path / "m.yaml", base, pins={"alpha/a.csv": _sha(FAKE["alpha/a.csv"])})
    dest = tmp_path / "data"
    with pytest.raises(RgeomError) as err:
        fetch_data(dest=str(dest), manifest=str(manifest))
    msg = str(err.value)
    assert "1 of 3" in msg and "alpha/a.csv" in msg and "sha256 mismatch" in msg
    assert "c.txt" not in msg  # the good files arrived and are not reported
    assert not (dest / "alpha/a.csv").exists()
    assert (dest / "c.txt").read_bytes() == FAKE["c.txt"]
    assert not list(dest.rglob("*.part"))


def test_unreachable_source_is_one_error_naming_every_missing_file(tmp_path):
    manifest = _manifest(tmp_path / "m.yaml", f"http://127.0.0.1:{_closed_port()}")
    dest = tmp_path / "data"
    with pytest.raises(RgeomError) as err:
        fetch_data(dest=str(dest), manifest=str(manifest))
    msg = str(err.value)
    assert "3 of 3" in msg and "unreachable" in msg
    assert all(rel in msg for rel in FAKE)
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_the_cli_reports_an_offline_fetch_on_one_line(tmp_path):
    manifest = _manifest(tmp_path / "m.yaml", f"http://127.0.0.1:{_closed_port()}")
    res = subprocess.run(
        [sys.executable, "-m", "rgeom.cli", "fetch-data", "--dest", str(tmp_path / "d")]
        + ["--manifest", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and all(rel in errors[0] for rel in FAKE), res.stderr


def test_a_rerun_skips_verified_files_and_guards_changed_ones(upstream, tmp_path, capsys):
    root, base = upstream
    manifest = _manifest(tmp_path / "m.yaml", base)
    dest = tmp_path / "data"
    fetch_data(dest=str(dest), manifest=str(manifest))
    capsys.readouterr()
    for rel in FAKE:  # with no source at all, a rerun still succeeds: nothing is fetched
        (root / rel).unlink()
    fetch_data(dest=str(dest), manifest=str(manifest))
    assert "0 fetched, 3 already present" in capsys.readouterr().out

    (dest / "c.txt").write_bytes(b"edited by hand\n")
    with pytest.raises(RgeomError, match=r"c\.txt: present at .* other bytes.*--force"):
        fetch_data(dest=str(dest), manifest=str(manifest))
    (root / "c.txt").write_bytes(FAKE["c.txt"])
    fetch_data(dest=str(dest), manifest=str(manifest), force=True)
    assert (dest / "c.txt").read_bytes() == FAKE["c.txt"]
    assert "1 fetched, 2 already present" in capsys.readouterr().out


def test_a_config_fetches_its_files_and_names_those_rgeom_cannot(upstream, tmp_path, monkeypatch):
    _root, base = upstream
    manifest = _manifest(tmp_path / "m.yaml", base)
    sets = validate({}, check_files=False)["data"]["sets"]  # the builtin role sets
    sets["xstest"] = {"format": "xstest_csv", "path": "alpha/a.csv"}
    cfg = {
        "arms": ["sft"],
        "data": {"shared_dir": str(tmp_path / "data"), "sets": sets},
        "validate": {"prompts": "mine/own.csv"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    calls = []
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: calls.append((a, k)))
    with pytest.raises(RgeomError) as err:
        fetch_data(configfile=str(tmp_path / "c.yaml"), manifest=str(manifest))
    msg = str(err.value)
    assert "1 of 2" in msg
    assert "mine/own.csv (read by validate.prompts): not in rgeom's manifest" in msg
    # Only the file the config reads, into the config's data.shared_dir.
    assert (tmp_path / "data/alpha/a.csv").read_bytes() == FAKE["alpha/a.csv"]
    assert not (tmp_path / "data/c.txt").exists()
    assert calls == []  # no hub sets in this config


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"path": "a.csv", "urls": ["https://x/a.csv"]}, "files entry 1: missing sha256"),
        ({"path": "../a.csv", "sha256": "0" * 64, "urls": ["u"]}, "entry ../a.csv: path must"),
        ({"path": "a.csv", "sha256": "abc", "urls": ["u"]}, "entry a.csv: sha256 is not 64"),
        ({"path": "a.csv", "sha256": "0" * 64, "urls": "u"}, "entry a.csv: urls must be a list"),
    ],
)
def test_a_bad_manifest_entry_is_named(tmp_path, entry, needle):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"files": [entry]}))
    with pytest.raises(RgeomError, match=re.escape(f"{path}: {needle}")):
        load_manifest(path)
    twice = {"path": "a.csv", "sha256": "0" * 64, "urls": ["u"]}
    path.write_text(yaml.safe_dump({"files": [twice, twice]}))
    with pytest.raises(RgeomError, match="entry a.csv: listed twice"):
        load_manifest(path)


# --- the real manifest against the reference files and config/paper.yaml ----------------


def test_manifest_pins_are_the_reference_files(shared_data):
    entries = load_manifest()
    for e in entries:
        got = hashlib.sha256((shared_data / e.path).read_bytes()).hexdigest()
        assert got == e.sha256, e.path
        assert e.urls and all(u.startswith("https://") for u in e.urls), e.path
        assert e.source and e.licence, e.path
    sums = (shared_data / "SHA256SUMS").read_text().split()
    listed = {p.removeprefix("./") for p in sums[1::2]}
    assert listed == {e.path for e in entries}


def test_manifest_covers_every_file_paper_yaml_reads_with_its_keys():
    read = config_files(_paper())
    entries = {e.path: e for e in load_manifest()}
    assert set(read) <= set(entries), set(read) - set(entries)
    for path, entry in entries.items():
        assert sorted(entry.read_by) == sorted(read.get(path, [])), path


def test_docs_carry_the_manifest_table(repo_root):
    table = manifest_table_in((repo_root / "docs" / "data.md").read_text())
    assert table is not None, "docs/data.md lost its manifest markers"
    assert table == manifest_markdown(), (
        "docs/data.md's file table is stale: regenerate it with the command in docs/data.md"
    )
    assert "docs/data.md" in (repo_root / "README.md").read_text()


def test_fetching_paper_yaml_from_a_mirror_folder_and_its_hub_sets(
    shared_data, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: calls.append((a, k)))
    dest = tmp_path / "data"
    done = fetch_data(configfile=str(PAPER), dest=str(dest), source=str(shared_data))
    assert sorted(done) == sorted(config_files(_paper()))
    assert calls == [
        (("HuggingFaceH4/ultrachat_200k",), {"split": "train_sft"}),
        (("cais/mmlu", "all"), {"split": "test"}),
    ]


def test_hub_sets_are_cached_with_the_loaders_own_call(monkeypatch):
    """The datasets cache is keyed by the call's arguments: fetch-data must make the call
    prepare_data makes offline, or the cached copy is never found."""
    from rgeom.data.loaders import load_set
    from rgeom.fetch import _cache_hub_set

    cfg = _paper()

    class Stop(Exception):
        pass

    calls = []

    def record(*a, **k):
        calls.append((a, k))
        raise Stop

    monkeypatch.setattr("datasets.load_dataset", record)
    for hs in hub_sets(cfg):
        with pytest.raises(Stop):
            _cache_hub_set(hs)
        with pytest.raises((Stop, RgeomError)):
            load_set(cfg["data"]["sets"][hs.set_name], ".", 0)
        assert calls[-1] == calls[-2], hs
    assert len(calls) == 4


def test_an_unreachable_hub_set_is_named(shared_data, tmp_path, monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(RgeomError) as err:
        fetch_data(configfile=str(PAPER), dest=str(tmp_path / "d"), source=str(shared_data))
    msg = str(err.value)
    assert f"2 of {len(config_files(_paper())) + 2} data items" in msg
    assert "hub dataset 'cais/mmlu', config 'all', split 'test' (data.sets.utility)" in msg
    assert "'HuggingFaceH4/ultrachat_200k', split 'train_sft' (data.sets.train_harmless)" in msg
    fetch_data(configfile=str(PAPER), dest=str(tmp_path / "d"), hub=False)  # files in place


# --- fetch-models ---------------------------------------------------------------------

PAPER_REPOS = [
    "mistralai/Mistral-7B-v0.1",
    "cais/HarmBench-Llama-2-13b-cls",
    "meta-llama/Llama-3.1-8B-Instruct",
    "google/gemma-2b",
    "qylu4156/strongreject-15k-v1",
]


def test_fetch_models_downloads_every_hub_model_paper_yaml_names(monkeypatch, capsys):
    calls = []

    def snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return f"/cache/{repo_id}"

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot)
    done = fetch_models(str(PAPER))
    assert [c[0] for c in calls] == PAPER_REPOS
    assert done == {r: f"/cache/{r}" for r in PAPER_REPOS}
    kwargs = dict(calls)
    # safetensors only for models; the LoRA adapter comes whole
    assert kwargs["google/gemma-2b"]["ignore_patterns"] == list(IGNORE_PATTERNS)
    assert "ignore_patterns" not in kwargs["qylu4156/strongreject-15k-v1"]
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().out


def test_fetch_models_names_gated_and_unreachable_repos(monkeypatch):
    from huggingface_hub import errors as hf

    response = types.SimpleNamespace(headers={}, request=None)

    def snapshot(repo_id, **kwargs):
        if repo_id.startswith(("meta-llama/", "google/")):
            raise hf.GatedRepoError(f"Access to model {repo_id} is restricted", response=response)
        if repo_id.startswith("cais/"):
            raise hf.LocalEntryNotFoundError("cannot reach the hub and nothing cached")
        return f"/cache/{repo_id}"

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot)
    with pytest.raises(RgeomError) as err:
        fetch_models(str(PAPER))
    msg = str(err.value)
    assert msg.startswith("3 of 5 hub models")
    for rid in ("meta-llama/Llama-3.1-8B-Instruct", "google/gemma-2b"):
        assert f"{rid} (judge." in msg and f"https://huggingface.co/{rid}" in msg
    assert msg.count("gated") == 2 and "HF_TOKEN" in msg
    assert (
        "cais/HarmBench-Llama-2-13b-cls (judge.harmbench_model.path): not in the local cache" in msg
    )
    assert "mistralai" not in msg


def test_local_model_folders_are_not_hub_ids(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    cfg = _paper()
    cfg["model"]["path"] = str(local)
    cfg["judge"]["strongreject"] = "none"
    cfg["judge"]["xstest_model"]["path"] = "./judges/xstest"
    ids = [r.repo_id for r in model_repos(cfg)]
    assert ids == ["cais/HarmBench-Llama-2-13b-cls"]


def test_fetch_models_dry_run_lists_ids_and_keys(monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.snapshot_download", pytest.fail)
    fetch_models(str(PAPER), dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == PAPER_REPOS
    assert lines[-1].split("\t")[1:] == ["adapter", "judge.strongreject_model.adapter"]


# --- RGEOM_SHARED_DATA ------------------------------------------------------------------


def test_shared_dir_precedence_config_then_env_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("RGEOM_SHARED_DATA", raising=False)
    assert validate({}, check_files=False)["data"]["shared_dir"] == "../shared/data"
    monkeypatch.setenv("RGEOM_SHARED_DATA", str(tmp_path))
    assert validate({}, check_files=False)["data"]["shared_dir"] == str(tmp_path)
    assert validate({"data": {"max_prompt_tokens": 64}}, check_files=False)["data"] == {
        **validate({}, check_files=False)["data"],
        "max_prompt_tokens": 64,
    }
    explicit = {"data": {"shared_dir": "elsewhere"}}
    assert validate(explicit, check_files=False)["data"]["shared_dir"] == "elsewhere"
    assert explicit == {"data": {"shared_dir": "elsewhere"}}  # the caller's dict untouched
    # paper.yaml leaves the key to the variable, so one export moves the paper run's data
    assert _paper()["data"]["shared_dir"] == str(tmp_path)


def test_fetch_data_without_dest_fills_rgeom_shared_data(upstream, tmp_path, monkeypatch):
    _root, base = upstream
    monkeypatch.setenv("RGEOM_SHARED_DATA", str(tmp_path / "env-data"))
    fetch_data(manifest=str(_manifest(tmp_path / "m.yaml", base)))
    for rel, data in FAKE.items():
        assert (tmp_path / "env-data" / rel).read_bytes() == data
