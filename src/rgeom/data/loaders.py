"""Read prompt sets from upstream benchmark files, the built-in suite or the hub.

Every loader turns its source into rows of :data:`PROMPT_SCHEMA`; one validation pass then
checks them all the same way, so a bad file fails with a single :class:`RgeomError` that
names the file and the row, and nothing is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from rgeom.errors import RgeomError
from rgeom.io import file_sha256, read_table, write_table
from rgeom.schemas import CHAT_PROMPT_SCHEMA, PROMPT_SCHEMA

MESSAGES_FIELD = "messages"

# "utility" is accepted because the config schema allows it as a label override.
LABELS = ("harmful", "harmless", "safe", "contrast", "utility")
HARMBENCH_CATEGORIES = (
    "chemical_biological",
    "illegal",
    "misinformation_disinformation",
    "harmful",
    "harassment_bullying",
    "cybercrime_intrusion",
)
BUILTIN_PIECES = ("harmful", "harmless", "xstest", "utility")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
# Splits kept in a file of their own, ``{piece}_{split}.jsonl``, read only when a set asks
# for that split. A piece read without a split (the spec default, builtin_corpus) stays the
# suite that existing configs, R2D2 targets and their caches were built on; the direction
# prompts carry no targets and exist only to make difference-in-means estimates less noisy.
BUILTIN_OPT_IN_SPLITS = {"harmful": ("direction",), "harmless": ("direction",)}
FORMATS = (
    "builtin",
    "harmbench_csv",
    "strongreject_csv",
    "xstest_csv",
    "jbb_csv",
    "advbench_csv",
    "arditi_json",
    "jsonl",
    "hf",
    "mmlu_hf",
    "arc_hf",
)
# Multiple-choice utility benchmarks read through ``datasets`` (hub id or a local file in
# the hub's own format): cais/mmlu and allenai/ai2_arc.
MC_FORMATS = ("mmlu_hf", "arc_hf")
# Mirrors definitions.dataset in config.schema.yaml, for specs that bypassed validation.
SPEC_DEFAULTS: dict[str, Any] = {
    "format": "builtin",
    "path": "harmful",
    "split": None,
    "label": None,
    "limit": None,
    "offset": 0,
    "contextual": True,
    "copyright": False,
    "hf_split": "train",
    "text_field": "prompt",
    "hf_config": None,
}
CONTEXT_SEPARATOR = "\n\n---\n\n"
_SPLIT_SUFFIX = re.compile(r"[_-](train|val|test)$")


@dataclass
class _Loaded:
    rows: list[dict[str, Any]]  # PROMPT_SCHEMA fields plus "_where", a locator for messages
    origin: str  # the file (or hub id) named in error messages
    sha256: str | None
    source_rows: int = 0


def prompt_text(text: str, context: str | None) -> str:
    """The user message for a prompt; HarmBench puts the context before the behaviour."""
    if context:
        return f"{context}{CONTEXT_SEPARATOR}{text}"
    return text


def _fill_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    filled = dict(SPEC_DEFAULTS)
    filled.update(spec or {})
    for key, default in SPEC_DEFAULTS.items():
        if filled[key] is None:
            filled[key] = default
    if filled["format"] not in FORMATS:
        raise RgeomError(
            f"dataset format {filled['format']!r} is unknown; expected one of {', '.join(FORMATS)}"
        )
    limit = filled["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RgeomError(f"dataset limit must be a positive integer or null, got {limit!r}")
    offset = filled["offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise RgeomError(f"dataset offset must be an integer >= 0, got {offset!r}")
    if filled["label"] is not None and filled["label"] not in LABELS:
        raise RgeomError(
            f"dataset label {filled['label']!r} is unknown; expected one of {', '.join(LABELS)}"
        )
    return filled


def _newlines(value: str | None) -> str | None:
    # Two HarmBench ContextStrings carry CRLF; a prompt must not depend on the file's origin.
    if value is None:
        return None
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _opt(value: Any) -> str | None:
    """An optional text field: empty means absent; numbers (e.g. a target of 12) become text."""
    if value is None:
        return None
    value = _newlines(value if isinstance(value, str) else str(value))
    return value if value.strip() else None


def _resolve(path: str, shared_dir: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else Path(shared_dir) / p


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RgeomError(f"missing file: {path}") from None
    except IsADirectoryError:
        raise RgeomError(f"{path} is a directory, expected a data file") from None
    except OSError as exc:
        raise RgeomError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops a leading BOM, which spreadsheet exports like to add.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RgeomError(
            f"{path} is not UTF-8 (bad byte 0x{raw[exc.start]:02x} at offset {exc.start}, "
            f"line {line}); re-save it as UTF-8"
        ) from None


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV as (row number counting data rows from 1, row), checking the header."""
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise RgeomError(f"{path}: malformed CSV header: {exc}") from None
    if not header:
        raise RgeomError(f"{path}: empty file, expected a CSV header with {', '.join(required)}")
    reader.fieldnames = [name.strip() for name in header]
    missing = [c for c in required if c not in reader.fieldnames]
    if missing:
        raise RgeomError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(found {', '.join(reader.fieldnames)})"
        )
    i = 0
    try:
        for i, row in enumerate(reader, 1):
            yield i, {k: ("" if v is None else v) for k, v in row.items() if k is not None}
    except csv.Error as exc:
        raise RgeomError(f"{path}: malformed CSV at row {i + 1}: {exc}") from None


def _row(
    prompt_id: Any,
    text: Any,
    where: str,
    *,
    label: str | None,
    context: Any = None,
    category: Any = None,
    target: Any = None,
    split: Any = None,
) -> dict[str, Any]:
    return {
        "prompt_id": None if prompt_id is None else str(prompt_id).strip(),
        "text": _newlines(text) if isinstance(text, str) else text,
        "context": _opt(context),
        "category": _opt(category),
        "label": label,
        "target": _opt(target),
        "split": _opt(split),
        "messages": None,
        "_where": where,
    }


def _file_split(path: Path) -> str | None:
    m = _SPLIT_SUFFIX.search(path.stem)
    return m.group(1) if m else None


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_")


def copyright_left_out(spec: Mapping[str, Any] | None, shared_dir: str | os.PathLike) -> int:
    """How many copyright behaviours (HarmBench's ``hash_check`` rows) a HarmBench CSV set
    with ``copyright: false`` leaves out, counted over the whole file; 0 for other sets.
    The judge stage reports them in ``n_copyright_excluded``: HarmBench scores them by
    hashing, not with its classifier, so rgeom leaves them out of the ASR and says so."""
    filled = _fill_spec(spec)
    if filled["format"] != "harmbench_csv" or filled["copyright"]:
        return 0
    path = _resolve(filled["path"], shared_dir)
    required = ("Behavior", "Tags", "ContextString", "BehaviorID")
    n = 0
    for _, r in _read_csv(path, required):
        tags = {t.strip().lower() for t in r["Tags"].split(",") if t.strip()}
        functional = r.get("FunctionalCategory", "").strip().lower()
        n += "hash_check" in tags or functional == "copyright"
    return n


def _harmbench(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, r in _read_csv(path, ("Behavior", "Tags", "ContextString", "BehaviorID")):
        tags = {t.strip().lower() for t in r["Tags"].split(",") if t.strip()}
        functional = r.get("FunctionalCategory", "").strip().lower()
        tagged_context = "context" in tags or functional == "contextual"
        context = _opt(r["ContextString"])
        if tagged_context and context is None:
            raise RgeomError(
                f"{path}: row {i} ({r['BehaviorID']!r}) is a contextual behaviour "
                "with an empty ContextString"
            )
        if context is not None and not spec["contextual"]:
            continue
        if ("hash_check" in tags or functional == "copyright") and not spec["copyright"]:
            continue
        rows.append(
            _row(
                r["BehaviorID"],
                r["Behavior"],
                f"row {i}",
                label="harmful",
                context=context,
                category=r.get("SemanticCategory") or r.get("Category"),
            )
        )
    return rows


def _strongreject(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _row(
            f"strongreject-{i:04d}",
            r["forbidden_prompt"],
            f"row {i}",
            label="harmful",
            category=r["category"],
        )
        for i, r in _read_csv(path, ("category", "forbidden_prompt"))
    ]


def _xstest(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, r in _read_csv(path, ("id", "prompt", "type")):
        kind = r["type"].strip()
        rows.append(
            _row(
                f"xstest-{r['id'].strip()}",
                r["prompt"],
                f"row {i}",
                # XSTest's own label column says "unsafe"; the contrast_ type is the definition.
                label="contrast" if kind.startswith("contrast_") else "safe",
                category=kind,
            )
        )
    return rows


def _jbb(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for i, r in _read_csv(path, ("goal",)):
        index = r.get("index", "").strip() or str(i)
        base = f"jbb-{_slug(r.get('behavior', '')) or index}"
        # Behaviour names are unique in JBB, but a user's file may repeat one.
        prompt_id = base if base not in seen else f"{base}-{index}"
        seen.add(prompt_id)
        rows.append(
            _row(
                prompt_id,
                r["goal"],
                f"row {i}",
                label="harmful",
                category=r.get("category"),
                target=r.get("target"),
            )
        )
    return rows


def _advbench(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _row(f"advbench-{i:04d}", r["goal"], f"row {i}", label="harmful", target=r.get("target"))
        for i, r in _read_csv(path, ("goal",))
    ]


def _parse_json(path: Path, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # A JSONL line is one line: its own "line 1" would contradict the line in `what`.
        at = f"line {exc.lineno}, column {exc.colno}" if "\n" in text else f"column {exc.colno}"
        raise RgeomError(f"{path}: {what} does not parse as JSON ({at}: {exc.msg})") from None


def _arditi(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    data = _parse_json(path, _read_text(path), "the file")
    if not isinstance(data, list):
        raise RgeomError(f"{path}: expected a JSON list of {{instruction, category}} objects")
    label = None
    for prefix in ("harmful", "harmless"):
        if path.stem.startswith(prefix + "_"):
            label = prefix
    if label is None and spec["label"] is None:
        raise RgeomError(
            f"{path}: cannot tell harmful from harmless by the file name; set the set's label"
        )
    rows = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or "instruction" not in item:
            raise RgeomError(f"{path}: item {i} is not an object with an 'instruction' key")
        rows.append(
            _row(
                f"{path.stem}-{i:05d}",
                item["instruction"],
                f"item {i}",
                label=label,
                category=item.get("category"),
            )
        )
    return rows


def _messages(value: Any, where: str, origin: str) -> str | None:
    """A chat (``[{"role", "content"}, ...]``, UltraChat's ``messages``) as canonical JSON."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RgeomError(f"{origin}: {where} has a 'messages' field that is not a list of turns")
    turns = []
    for n, turn in enumerate(value, 1):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise RgeomError(
                f"{origin}: {where} messages turn {n} is not a {{role, content}} object of text"
            )
        turns.append({"role": turn["role"], "content": _newlines(turn["content"])})
    if not any(t["role"] == "assistant" for t in turns):
        raise RgeomError(f"{origin}: {where} messages hold no assistant turn")
    return json.dumps(turns, ensure_ascii=False)


def _record(obj: Any, where: str, default_id: str, text_field: str, origin: str) -> dict:
    """One JSONL line or hub row; optional fields follow PROMPT_SCHEMA's names."""
    if not isinstance(obj, dict):
        raise RgeomError(f"{origin}: {where} is not a JSON object")
    if text_field not in obj:
        raise RgeomError(f"{origin}: {where} has no {text_field!r} field (the set's text_field)")
    prompt_id = obj.get("prompt_id", obj.get("id"))
    label = obj.get("label")
    row = _row(
        default_id if prompt_id is None or str(prompt_id).strip() == "" else prompt_id,
        obj[text_field],
        where,
        label=None if label is None else str(label),
        context=obj.get("context"),
        category=obj.get("category"),
        target=obj.get("target"),
        split=obj.get("split"),
    )
    row["messages"] = _messages(obj.get(MESSAGES_FIELD), where, origin)
    return row


def _jsonl(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        obj = _parse_json(path, line, f"line {n}")
        rows.append(
            _record(obj, f"line {n}", f"{path.stem}-{n:05d}", spec["text_field"], str(path))
        )
    return rows


def _hf(spec: dict[str, Any]) -> _Loaded:
    name, hf_split = spec["path"], spec["hf_split"]
    origin = f"hub dataset {name!r} (split {hf_split!r})"
    try:
        import datasets
    except ImportError as exc:
        raise RgeomError(f"{origin}: the 'datasets' package is not installed") from exc
    try:
        ds = datasets.load_dataset(name, split=hf_split)
    except Exception as exc:  # datasets raises many unrelated types for one user error
        raise RgeomError(f"cannot load {origin}: {type(exc).__name__}: {exc}") from exc
    if spec["text_field"] not in ds.column_names:
        raise RgeomError(
            f"{origin}: no column {spec['text_field']!r} (the set's text_field); "
            f"columns are {', '.join(ds.column_names)}"
        )
    rows = [
        _record(obj, f"row {i}", f"hf-{i:05d}", spec["text_field"], origin)
        for i, obj in enumerate(ds, 1)
    ]
    for r in rows:
        r["split"] = r["split"] or hf_split
    return _Loaded(rows=rows, origin=origin, sha256=None)


MC_LETTERS = "ABCDEFGHIJ"
# One fixed zero-shot prompt for every multiple-choice question; the judge stage reads the
# letter the model answers with (rgeom.judges.metrics.check_answer) against the key.
MC_PROMPT = (
    "The following is a multiple choice question{about}. Answer with the letter of the "
    "correct option only.\n\n{question}\n{options}\nAnswer:"
)


def mc_prompt(question: str, choices: list[str], subject: str | None = None) -> str:
    """The multiple-choice utility prompt: the question, lettered options, "Answer:"."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    options = "\n".join(f"{MC_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return MC_PROMPT.format(about=about, question=question.strip(), options=options)


def _mc_dataset(spec: dict[str, Any], shared_dir: str | os.PathLike) -> tuple[Any, str, str, str]:
    """The rows of a multiple-choice set through ``datasets``: a local .parquet / .json /
    .jsonl file in the hub's format (resolved like any data path), else a hub id with
    ``hf_config`` and ``hf_split``. Returns (dataset, origin, sha256 or "", split)."""
    try:
        import datasets
    except ImportError as exc:
        raise RgeomError(
            f"format {spec['format']}: the 'datasets' package is not installed"
        ) from exc
    local = _resolve(spec["path"], shared_dir)
    if local.suffix in (".parquet", ".json", ".jsonl") or local.exists():
        if not local.exists():
            raise RgeomError(f"missing file: {local}")
        builder = "parquet" if local.suffix == ".parquet" else "json"
        origin = str(local)
        try:
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as exc:  # datasets raises many unrelated types for one user error
            raise RgeomError(f"cannot read {origin}: {type(exc).__name__}: {exc}") from exc
        split = spec["split"] or _file_split(local) or "test"
        return ds, origin, file_sha256(local), split
    name, config, hf_split = spec["path"], spec["hf_config"], spec["hf_split"]
    origin = f"hub dataset {name!r} (config {config!r}, split {hf_split!r})"
    try:
        ds = datasets.load_dataset(name, config, split=hf_split)
    except Exception as exc:  # as above
        raise RgeomError(f"cannot load {origin}: {type(exc).__name__}: {exc}") from exc
    return ds, origin, "", hf_split


def _mc_columns(ds, origin: str, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise RgeomError(
            f"{origin}: missing column(s) {', '.join(missing)}; columns are "
            f"{', '.join(ds.column_names)}"
        )


def _mc_row(origin, where, pid, question, choices, answer, subject, split) -> dict[str, Any]:
    if not isinstance(question, str) or not question.strip():
        raise RgeomError(f"{origin}: {where} has no question text")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(MC_LETTERS):
        raise RgeomError(f"{origin}: {where} needs 2-{len(MC_LETTERS)} choices, got {choices!r}")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise RgeomError(f"{origin}: {where} answer {answer!r} is not a choice index")
    row = _row(
        pid,
        mc_prompt(question, [str(c) for c in choices], subject),
        where,
        label="harmless",
        category=f"utility:{subject}" if subject else "utility",
        target=MC_LETTERS[answer],
        split=split,
    )
    return row


def _mmlu(spec: dict[str, Any], shared_dir: str | os.PathLike) -> _Loaded:
    """cais/mmlu: question, subject, choices (list of 4), answer (index 0-3)."""
    ds, origin, sha, split = _mc_dataset(spec, shared_dir)
    _mc_columns(ds, origin, ("question", "subject", "choices", "answer"))
    rows = []
    for i, r in enumerate(ds):
        subject = r["subject"] or None
        pid = f"mmlu-{subject or 'x'}-{i:05d}"
        rows.append(
            _mc_row(
                origin, f"row {i}", pid, r["question"], r["choices"], r["answer"], subject,
                split,
            )
        )  # fmt: skip
    return _Loaded(rows=rows, origin=origin, sha256=sha or None)


def _arc(spec: dict[str, Any], shared_dir: str | os.PathLike) -> _Loaded:
    """allenai/ai2_arc: id, question, choices {text, label}, answerKey (one of the labels,
    "A".."E" or "1".."5"); options are re-lettered A, B, ... in the file's order."""
    ds, origin, sha, split = _mc_dataset(spec, shared_dir)
    _mc_columns(ds, origin, ("id", "question", "choices", "answerKey"))
    rows = []
    for i, r in enumerate(ds):
        choices = r["choices"] or {}
        texts, labels = choices.get("text") or [], choices.get("label") or []
        if len(texts) != len(labels):
            raise RgeomError(
                f"{origin}: row {i} ({r['id']!r}) has {len(texts)} texts and {len(labels)} labels"
            )
        key = str(r["answerKey"]).strip()
        if key not in labels:
            raise RgeomError(
                f"{origin}: row {i} ({r['id']!r}) answerKey {key!r} is not one of its "
                f"labels {labels}"
            )
        rows.append(
            _mc_row(
                origin, f"row {i}", str(r["id"]), r["question"], list(texts),
                labels.index(key), None, split,
            )
        )  # fmt: skip
    for r in rows:
        r["category"] = "utility:arc"
    return _Loaded(rows=rows, origin=origin, sha256=sha or None)


def _builtin(spec: dict[str, Any]) -> _Loaded:
    piece = spec["path"]
    if piece not in BUILTIN_PIECES:
        raise RgeomError(
            f"unknown builtin piece {piece!r}; expected one of {', '.join(BUILTIN_PIECES)}"
        )
    split = spec.get("split")
    if split in BUILTIN_OPT_IN_SPLITS.get(piece, ()):
        path = BUILTIN_DIR / f"{piece}_{split}.jsonl"
    else:
        path = BUILTIN_DIR / f"{piece}.jsonl"
    rows = _jsonl(path, {"text_field": "text"})
    return _Loaded(rows=rows, origin=str(path), sha256=None)


_FILE_LOADERS = {
    "harmbench_csv": _harmbench,
    "strongreject_csv": _strongreject,
    "xstest_csv": _xstest,
    "jbb_csv": _jbb,
    "advbench_csv": _advbench,
    "arditi_json": _arditi,
    "jsonl": _jsonl,
}


def _subsample(
    rows: list[dict[str, Any]], limit: int | None, seed: int, offset: int = 0
) -> list[dict[str, Any]]:
    """Keep ``limit`` rows chosen by a seeded hash of each id, in their original order,
    after skipping the first ``offset`` of that seeded order: two sets of one file with
    offsets 0 / limit 128 and offset 128 / limit 32 are disjoint by construction.

    Hashing ids rather than drawing positions keeps a row's fate independent of the file's
    order and of Python's RNG implementation, so a seed picks the same prompts everywhere.
    """
    if offset == 0 and (limit is None or limit >= len(rows)):
        return rows

    def rank(row: dict[str, Any]) -> bytes:
        return hashlib.sha256(f"{seed}\0{row['prompt_id']}".encode()).digest()

    end = None if limit is None else offset + limit
    keep = {r["prompt_id"] for r in sorted(rows, key=rank)[offset:end]}
    return [r for r in rows if r["prompt_id"] in keep]


def _validate(loaded: _Loaded) -> None:
    seen: dict[str, str] = {}
    for r in loaded.rows:
        where = r["_where"]
        if not isinstance(r["text"], str):
            raise RgeomError(f"{loaded.origin}: {where} has a prompt that is not text")
        if not r["text"].strip():
            raise RgeomError(f"{loaded.origin}: {where} ({r['prompt_id']!r}) has an empty prompt")
        if not r["prompt_id"]:
            raise RgeomError(f"{loaded.origin}: {where} has an empty prompt id")
        if r["prompt_id"] in seen:
            raise RgeomError(
                f"{loaded.origin}: duplicate prompt id {r['prompt_id']!r} "
                f"at {where} (first at {seen[r['prompt_id']]})"
            )
        seen[r["prompt_id"]] = where
        if r["label"] not in LABELS:
            raise RgeomError(
                f"{loaded.origin}: {where} ({r['prompt_id']!r}) has label {r['label']!r}; "
                f"expected one of {', '.join(LABELS)} (or set the set's label)"
            )


def _load(spec: Mapping[str, Any] | None, shared_dir: str | os.PathLike, seed: int) -> _Loaded:
    spec = _fill_spec(spec)
    fmt = spec["format"]
    if fmt == "builtin":
        loaded = _builtin(spec)
        source = f"builtin:{spec['path']}"
    elif fmt == "hf":
        loaded = _hf(spec)
        source = f"hf:{spec['path']}"
    elif fmt in MC_FORMATS:
        loaded = _mmlu(spec, shared_dir) if fmt == "mmlu_hf" else _arc(spec, shared_dir)
        source = f"{fmt}:{spec['path']}"
    else:
        path = _resolve(spec["path"], shared_dir)
        rows = _FILE_LOADERS[fmt](path, spec)
        # Hash after parsing: a missing or unreadable file has already been reported.
        loaded = _Loaded(rows=rows, origin=str(path), sha256=file_sha256(path))
        source = f"{fmt}:{path.name}"
        default_split = spec["split"] or _file_split(path) or "test"
        for r in loaded.rows:
            r["split"] = spec["split"] or r["split"] or default_split
    for r in loaded.rows:
        r["source"] = source
        if spec["label"] is not None:
            r["label"] = spec["label"]
    _validate(loaded)
    if fmt in ("builtin", "hf", *MC_FORMATS):
        for r in loaded.rows:
            r["split"] = r["split"] or "test"
        if spec["split"] is not None:
            loaded.rows = [r for r in loaded.rows if r["split"] == spec["split"]]
    loaded.source_rows = len(loaded.rows)
    if not loaded.rows:
        raise RgeomError(f"{loaded.origin}: no prompts left after filtering by {_describe(spec)}")
    loaded.rows = _subsample(loaded.rows, spec["limit"], seed, spec["offset"])
    if not loaded.rows:
        raise RgeomError(
            f"{loaded.origin}: offset {spec['offset']} skips all {loaded.source_rows} prompts"
        )
    return loaded


def _describe(spec: dict[str, Any]) -> str:
    keys = ("split", "contextual", "copyright")
    return ", ".join(f"{k}={spec[k]!r}" for k in keys)


def _schema(rows: list[dict[str, Any]]) -> pa.Schema:
    return CHAT_PROMPT_SCHEMA if any(r.get("messages") for r in rows) else PROMPT_SCHEMA


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = _schema(rows)
    return pa.Table.from_pylist(
        [{name: r[name] for name in schema.names} for r in rows], schema=schema
    )


def load_set(spec: Mapping[str, Any] | None, shared_dir: str | os.PathLike, seed: int) -> pa.Table:
    """Load, normalise, validate and subsample one prompt set (see :func:`prepare_set`)."""
    return _table(_load(spec, shared_dir, seed).rows)


def prepare_set(
    name: str,
    spec: Mapping[str, Any] | None,
    shared_dir: str | os.PathLike,
    seed: int,
    out: str | os.PathLike,
    meta: Mapping[str, Any],
    tokenizer=None,
    max_prompt_tokens: int = 2048,
) -> None:
    """Write prompt set ``name`` to ``out`` (Parquet, :data:`PROMPT_SCHEMA`) with provenance.

    With a tokenizer, a prompt whose chat-templated encoding exceeds ``max_prompt_tokens``
    is an error rather than a silent truncation, which would change what is being measured.
    """
    filled = _fill_spec(spec)
    loaded = _load(filled, shared_dir, seed)
    if tokenizer is not None:
        from rgeom.models import encode_chat_batch

        encoded = encode_chat_batch(
            tokenizer, [prompt_text(r["text"], r["context"]) for r in loaded.rows]
        )
        for r, enc in zip(loaded.rows, encoded, strict=True):
            n = len(enc.ids)
            if n > max_prompt_tokens:
                raise RgeomError(
                    f"{loaded.origin}: {r['_where']} ({r['prompt_id']!r}) is {n} tokens in the "
                    f"chat template, over data.max_prompt_tokens = {max_prompt_tokens}"
                )
    record = dict(meta) | {
        "dataset": name,
        "dataset_sha256": loaded.sha256,
        "dataset_spec": filled,
        "dataset_source_rows": loaded.source_rows,
        "dataset_copyright_left_out": copyright_left_out(filled, shared_dir),
    }
    write_table(out, _table(loaded.rows), _schema(loaded.rows), record)


def read_prompts(path: str | os.PathLike) -> pa.Table:
    """A prompt table written by :func:`prepare_set`, schema-checked."""
    return read_table(path, PROMPT_SCHEMA)


@lru_cache(maxsize=1)
def _builtin_texts() -> tuple[str, ...]:
    return tuple(r["text"] for piece in BUILTIN_PIECES for r in _builtin({"path": piece}).rows)


def builtin_corpus() -> list[str]:
    """Every prompt text of the built-in suite, piece by piece in file order (the opt-in
    splits of :data:`BUILTIN_OPT_IN_SPLITS` apart)."""
    return list(_builtin_texts())
