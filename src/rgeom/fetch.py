"""Bring the upstream data files and the hub weights a config needs onto this machine.

``rgeom fetch-data`` downloads the files of the manifest (``schemas/data_manifest.yaml``)
into the data folder, each checked against its sha256 pin, and loads the config's hub
datasets once so that ``datasets`` keeps them in its cache. ``rgeom fetch-models``
downloads every hub model the config names into the Hugging Face cache. Both run on a
machine with internet (a login node); afterwards the workflow runs with
``HF_HUB_OFFLINE=1`` (docs/data.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rgeom.config import dataset_file, load_yaml, validate
from rgeom.errors import RgeomError

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).resolve().parent / "schemas" / "data_manifest.yaml"
# Seconds without a byte before a download counts as unreachable; a dead mirror must fail
# the run quickly, not hang a login-node session.
TIMEOUT_S = 60
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Entry:
    """One upstream file: where it goes, its pin and where it comes from."""

    path: str
    sha256: str
    urls: tuple[str, ...]
    source: str
    licence: str
    read_by: tuple[str, ...]


def load_manifest(path: str | os.PathLike | None = None) -> list[Entry]:
    """The manifest's entries, each checked (one error naming the file and the entry)."""
    path = Path(path) if path else MANIFEST_PATH
    raw = load_yaml(path)
    files = raw.get("files")
    if not isinstance(files, list) or not files:
        raise RgeomError(f"{path}: needs a non-empty list under 'files'")
    entries, seen = [], set()
    for i, item in enumerate(files, 1):
        where = f"{path}: files entry {i}"
        if not isinstance(item, dict):
            raise RgeomError(f"{where}: not a mapping")
        missing = [k for k in ("path", "sha256", "urls") if not item.get(k)]
        if missing:
            raise RgeomError(f"{where}: missing {', '.join(missing)}")
        rel = str(item["path"])
        where = f"{path}: entry {rel}"
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise RgeomError(f"{where}: path must be relative and stay inside the data folder")
        if rel in seen:
            raise RgeomError(f"{where}: listed twice")
        seen.add(rel)
        sha = str(item["sha256"]).lower()
        if not _SHA256.match(sha):
            raise RgeomError(f"{where}: sha256 is not 64 hex digits")
        urls = item["urls"]
        if isinstance(urls, str) or not all(isinstance(u, str) for u in urls):
            raise RgeomError(f"{where}: urls must be a list of URLs")
        entries.append(
            Entry(
                path=rel,
                sha256=sha,
                urls=tuple(urls),
                source=str(item.get("source", "")),
                licence=str(item.get("licence", "")),
                read_by=tuple(item.get("read_by") or ()),
            )
        )
    return entries


# --- what a config reads ---------------------------------------------------------------


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def config_files(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """{path as the config names it: the config keys that read it}, for every file under
    ``data.shared_dir`` a validated config reads (the files workflow/rules/common.smk
    resolves with shared_path)."""
    out: dict[str, list[str]] = {}

    def add(path: str | None, key: str) -> None:
        if path:
            out.setdefault(str(path), []).append(key)

    for name, spec in cfg["data"]["sets"].items():
        if dataset_file(spec, ".") is not None:
            add(spec["path"], f"data.sets.{name}.path")
    r2d2 = cfg["r2d2"]
    # The pool files only feed the r2d2 arm, and its targets only beside behaviour files.
    if "r2d2" in cfg["arms"] and _as_list(r2d2["behaviours"]):
        for path in _as_list(r2d2["behaviours"]):
            add(path, "r2d2.behaviours")
        for path in _as_list(r2d2["targets"]):
            add(path, "r2d2.targets")
    add(cfg["attacks"]["gcg"]["targets"], "attacks.gcg.targets")
    if cfg["validate"]["enabled"]:
        labelled = cfg["validate"]["labelled"]
        if not labelled.startswith("builtin:"):
            add(labelled, "validate.labelled")
        add(cfg["validate"]["prompts"], "validate.prompts")
    return out


@dataclass(frozen=True)
class HubSet:
    """A data set read from the hub through ``datasets.load_dataset``."""

    set_name: str
    name: str
    config: str | None
    split: str

    def describe(self) -> str:
        config = f", config {self.config!r}" if self.config else ""
        where = f"data.sets.{self.set_name}"
        return f"hub dataset {self.name!r}{config}, split {self.split!r} ({where})"


def hub_sets(cfg: Mapping[str, Any]) -> list[HubSet]:
    """The config's hub data sets, with the arguments rgeom.data.loaders passes."""
    out = []
    for name, spec in cfg["data"]["sets"].items():
        fmt = spec["format"]
        if fmt == "hf":
            out.append(HubSet(name, spec["path"], None, spec["hf_split"]))
        elif fmt in ("mmlu_hf", "arc_hf") and dataset_file(spec, ".") is None:
            out.append(HubSet(name, spec["path"], spec["hf_config"], spec["hf_split"]))
    return out


def _cache_hub_set(hub: HubSet) -> None:
    import datasets

    # The same call as the loader's, so the cache entry it leaves is the one prepare_data
    # looks up offline (the cache key includes whether a config name was passed).
    if hub.config is None:
        datasets.load_dataset(hub.name, split=hub.split)
    else:
        datasets.load_dataset(hub.name, hub.config, split=hub.split)


# --- downloading ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_urls(entry: Entry, source: str | None) -> list[str]:
    """Where to look for ``entry``: the manifest's URLs, or the same relative path under a
    mirror (a base URL, or a local folder laid out like the data folder)."""
    if not source:
        return list(entry.urls)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        return [f"{source.rstrip('/')}/{entry.path}"]
    return [(Path(source).expanduser().resolve() / entry.path).as_uri()]


def _download(url: str, tmp: Path) -> str:
    """Stream ``url`` into ``tmp``; the sha256 of what arrived."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(tmp, "wb") as out:
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
    return f"{type(exc).__name__}: {exc}"


def _fetch_one(entry: Entry, dest: Path, source: str | None) -> str | None:
    """Put ``entry`` at ``dest/entry.path``; None on success, else why it is missing."""
    target = dest / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    tried = []
    for url in _source_urls(entry, source):
        try:
            got = _download(url, tmp)
        except (OSError, ValueError) as exc:  # urllib's errors are OSErrors; bad URLs ValueErrors
            tried.append(f"{url}: {_reason(exc)}")
            continue
        if got != entry.sha256:
            tried.append(f"{url}: sha256 mismatch (got {got[:12]}…, pinned {entry.sha256[:12]}…)")
            continue
        os.replace(tmp, target)
        log.info("fetched %s from %s", entry.path, url)
        return None
    tmp.unlink(missing_ok=True)
    return "; ".join(tried)


def _dest_for(configfile: str | None, dest: str | None) -> tuple[dict[str, Any] | None, Path]:
    cfg = None
    if configfile:
        cfg = validate(load_yaml(configfile), source=str(configfile), check_files=False)
    if dest:
        return cfg, Path(dest).expanduser()
    # No --dest: where the config (or, without one, RGEOM_SHARED_DATA or the schema
    # default) says the data lives, so a later run finds it without further settings.
    resolved = cfg or validate({}, source="defaults", check_files=False)
    return cfg, Path(resolved["data"]["shared_dir"]).expanduser()


@dataclass
class _FetchTally:
    """What a fetch_data run has put in place so far, and every problem on the way."""

    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fetched: int = 0
    present: int = 0
    hub_done: int = 0


@dataclass(frozen=True)
class _FetchPlan:
    """Where fetch_data puts files and how: the manifest's entries by path, the data folder,
    the --source override and whether a file with other bytes is replaced."""

    entries: Mapping[str, Entry]
    dest_dir: Path
    source: str | None
    force: bool


def _place_file(rel: str, keys: Sequence[str], plan: _FetchPlan, tally: _FetchTally) -> None:
    """Check or fetch one file the config reads (every manifest file without a config)."""
    read_by = f" (read by {', '.join(keys)})" if keys else ""
    path = Path(rel).expanduser()
    if path.is_absolute():  # the user's own file, outside the data folder
        if not path.is_file():
            tally.problems.append(f"{rel}{read_by}: does not exist and is not rgeom's to fetch")
        return
    target = plan.dest_dir / rel
    entry = plan.entries.get(Path(os.path.normpath(rel)).as_posix())  # "./x/y.csv" is x/y.csv
    if entry is None:
        if target.is_file():
            tally.done.append(rel)
        else:
            tally.problems.append(
                f"{rel}{read_by}: not in rgeom's manifest, so not fetched; put it at {target}"
            )
        return
    if target.is_file():
        if _sha256(target) == entry.sha256:
            tally.present += 1
            tally.done.append(rel)
            return
        if not plan.force:
            tally.problems.append(
                f"{rel}: present at {target} with other bytes than the pinned sha256 "
                f"{entry.sha256[:12]}… (move it away, or --force to replace it)"
            )
            return
    why = _fetch_one(entry, plan.dest_dir, plan.source)
    if why is None:
        tally.fetched += 1
        tally.done.append(rel)
    else:
        tally.problems.append(f"{rel}{read_by} from {why}")


def _cache_hub_sets(sets: Iterable[HubSet], tally: _FetchTally) -> None:
    for hs in sets:
        try:
            _cache_hub_set(hs)
        except Exception as exc:  # datasets raises many unrelated types for "cannot reach"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            tally.problems.append(f"{hs.describe()}: {type(exc).__name__}: {first}")
        else:
            tally.hub_done += 1


def fetch_data(
    configfile: str | None = None,
    dest: str | None = None,
    source: str | None = None,
    manifest: str | None = None,
    force: bool = False,
    hub: bool = True,
) -> list[str]:
    """Fetch the data files (and hub sets) a config reads, or every manifest file.

    Files already present with the pinned sha256 are skipped, so a rerun touches no
    network. A present file with other bytes is left alone unless ``force``. Every problem
    is collected and raised as one error naming each missing file. Returns the relative
    paths now in place.
    """
    entries = {e.path: e for e in load_manifest(manifest)}
    cfg, dest_dir = _dest_for(configfile, dest)
    wanted = {rel: [] for rel in entries} if cfg is None else config_files(cfg)
    plan = _FetchPlan(entries, dest_dir, source, force)
    tally = _FetchTally()
    for rel, keys in wanted.items():
        _place_file(rel, keys, plan, tally)
    sets = hub_sets(cfg) if (cfg is not None and hub) else []
    _cache_hub_sets(sets, tally)
    if tally.problems:
        total = len(wanted) + len(sets)
        raise RgeomError(
            f"{len(tally.problems)} of {total} data items missing under {dest_dir} (offline? "
            "run this where the sources are reachable, or pass --source a mirror or a folder "
            "holding them): " + " | ".join(tally.problems)
        )
    print(
        f"OK: {len(tally.done)} data files in {dest_dir} ({tally.fetched} fetched, "
        f"{tally.present} already present and verified)"
        + (f"; {tally.hub_done} hub data set(s) in the datasets cache" if tally.hub_done else "")
    )
    return tally.done


def fetch_data_cmd(configfile=None, dest=None, source=None, manifest=None, force=False, hub=True):
    fetch_data(configfile, dest, source, manifest, force, hub)


# --- model weights ------------------------------------------------------------------------

#: Weight formats rgeom never loads (it reads safetensors only, rgeom.models.load_model):
#: left out of model downloads, which halves many repos and skips Llama's original/*.pth
#: and Gemma's GGUF copy. Adapters are downloaded whole (peft reads what they ship).
IGNORE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.gguf")


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    kind: str  # "model" or "adapter"
    keys: tuple[str, ...]


def _is_hub_id(path: str | None) -> bool:
    from rgeom.models import _looks_local

    return bool(path) and not _looks_local(str(path)) and not Path(str(path)).exists()


def model_repos(cfg: Mapping[str, Any]) -> list[HubRepo]:
    """Every hub model the config's jobs load: the studied model, the attacks' source
    model, and the judge models (and adapters) of the judges that are on. Local folders
    are left out; each id appears once, with every key that names it."""
    found: dict[str, tuple[str, list[str]]] = {}

    def add(path: str | None, kind: str, key: str) -> None:
        if _is_hub_id(path):
            found.setdefault(str(path), (kind, []))[1].append(key)

    if cfg["model"]["source"] == "hf":
        add(cfg["model"]["path"], "model", "model.path")
    add(cfg["attacks"]["source_model"], "model", "attacks.source_model")
    judge = cfg["judge"]
    on = {
        "harmbench_model": judge["harmbench"] == "harmbench_classifier",
        "xstest_model": judge["xstest"] == "xstest_llm",
        "strongreject_model": judge["strongreject"] != "none",
    }
    for key, active in on.items():
        if active:
            add(judge[key]["path"], "model", f"judge.{key}.path")
            add(judge[key]["adapter"], "adapter", f"judge.{key}.adapter")
    return [HubRepo(rid, kind, tuple(keys)) for rid, (kind, keys) in found.items()]


def _hub_reason(exc: BaseException, repo_id: str) -> str:
    from huggingface_hub import errors as hf

    login = "set HF_TOKEN or run `hf auth login` (`huggingface-cli login` before hub 1.0)"
    if isinstance(exc, hf.GatedRepoError):
        return (
            f"gated: accept its terms at https://huggingface.co/{repo_id} with your account, "
            f"then {login}"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return f"not found on the hub (or private: {login})"
    if isinstance(exc, hf.RevisionNotFoundError):
        return "revision not found on the hub"
    if isinstance(exc, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled):
        return "not in the local cache, and the hub is not reachable (offline, HF_HUB_OFFLINE=1?)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def fetch_models(
    configfile: str, cache_dir: str | None = None, dry_run: bool = False
) -> dict[str, str]:
    """Download every hub model of ``configfile`` with huggingface_hub.snapshot_download;
    {repo id: local snapshot folder}. Failures are collected into one error naming each
    repo and why (gated, not found, offline)."""
    import huggingface_hub

    cfg = validate(load_yaml(configfile), source=str(configfile), check_files=False)
    repos = model_repos(cfg)
    if dry_run:
        for repo in repos:
            print(f"{repo.repo_id}\t{repo.kind}\t{', '.join(repo.keys)}")
        return {}
    done, problems = {}, []
    for repo in repos:
        kwargs: dict[str, Any] = {"cache_dir": cache_dir}
        if repo.kind == "model":
            kwargs["ignore_patterns"] = list(IGNORE_PATTERNS)
        try:
            done[repo.repo_id] = str(huggingface_hub.snapshot_download(repo.repo_id, **kwargs))
        except Exception as exc:  # hub and network errors come in many types; all are reported
            why = _hub_reason(exc, repo.repo_id)
            problems.append(f"{repo.repo_id} ({', '.join(repo.keys)}): {why}")
        else:
            log.info("%s -> %s", repo.repo_id, done[repo.repo_id])
    if problems:
        raise RgeomError(
            f"{len(problems)} of {len(repos)} hub models not downloaded for {configfile}: "
            + " | ".join(problems)
        )
    for rid, path in done.items():
        print(f"{rid}\t{path}")
    print(f"OK: {len(done)} hub model(s) in the Hugging Face cache; runs can set HF_HUB_OFFLINE=1")
    return done


def fetch_models_cmd(configfile: str, cache_dir: str | None = None, dry_run: bool = False):
    fetch_models(configfile, cache_dir, dry_run)


def manifest_markdown(entries: Iterable[Entry] | None = None) -> str:
    """The file / source / licence table of docs/data.md, from the manifest."""
    rows = [
        "| file | source | URL at | licence | read by (config/paper.yaml) |",
        "|---|---|---|---|---|",
    ]
    for e in entries if entries is not None else load_manifest():
        read_by = ", ".join(f"`{k}`" for k in e.read_by) or "(not read by paper.yaml)"
        ats = []
        for url in e.urls:
            commit = re.search(r"/([0-9a-f]{40})/", url)
            ats.append(f"[commit {commit.group(1)[:7]}]({url})" if commit else f"[main]({url})")
        rows.append(f"| `{e.path}` | {e.source} | {', '.join(ats)} | {e.licence} | {read_by} |")
    return "\n".join(rows) + "\n"


#: docs/data.md keeps the generated table between these lines.
TABLE_MARKERS = ("<!-- manifest:start -->\n", "<!-- manifest:end -->")


def manifest_table_in(text: str) -> str | None:
    """The generated table inside ``text`` (docs/data.md), or None without the markers."""
    start, end = TABLE_MARKERS
    if start not in text or end not in text.split(start, 1)[1]:
        return None
    return text.split(start, 1)[1].split(end, 1)[0]


def write_manifest_table(path: str | os.PathLike = "docs/data.md") -> None:
    """Regenerate the manifest table of docs/data.md (after editing the manifest)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    old = manifest_table_in(text)
    if old is None:
        raise RgeomError(f"{path}: no {' ... '.join(m.strip() for m in TABLE_MARKERS)} block")
    start = TABLE_MARKERS[0]
    path.write_text(text.replace(start + old, start + manifest_markdown(), 1), encoding="utf-8")
