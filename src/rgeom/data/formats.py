"""One reader per upstream prompt format: HarmBench, StrongREJECT, XSTest, JailbreakBench
and AdvBench CSVs, Arditi et al.'s JSON, JSONL and hub datasets.

Each turns its source into rows of :data:`~rgeom.schemas.PROMPT_SCHEMA` plus ``_where``, a
locator for messages; :mod:`rgeom.data.loaders` validates them all the same way.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rgeom.errors import RgeomError

MESSAGES_FIELD = "messages"
_SPLIT_SUFFIX = re.compile(r"[_-](train|val|test)$")


@dataclass
class Loaded:
    """One set's rows as read, before validation, with where they came from."""

    rows: list[dict[str, Any]]  # PROMPT_SCHEMA fields plus "_where", a locator for messages
    origin: str  # the file (or hub id) named in error messages
    sha256: str | None
    source_rows: int = 0


def normalise_newlines(value: str | None) -> str | None:
    # Two HarmBench ContextStrings carry CRLF; a prompt must not depend on the file's origin.
    if value is None:
        return None
    return value.replace("\r\n", "\n").replace("\r", "\n")


def optional_text(value: Any) -> str | None:
    """An optional text field: empty means absent; numbers (e.g. a target of 12) become text."""
    if value is None:
        return None
    value = normalise_newlines(value if isinstance(value, str) else str(value))
    return value if value.strip() else None


def resolve_path(path: str, shared_dir: str | os.PathLike) -> Path:
    """A data path as configured: ``~`` expanded, relative paths under ``shared_dir``."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else Path(shared_dir) / p


def read_text(path: Path) -> str:
    """A data file's text, each way it can be unreadable reported in one line."""
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


def read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV as (row number counting data rows from 1, row), checking the header."""
    text = read_text(path)
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


def prompt_row(
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
    """One prompt in the loaders' row form, its text fields normalised."""
    return {
        "prompt_id": None if prompt_id is None else str(prompt_id).strip(),
        "text": normalise_newlines(text) if isinstance(text, str) else text,
        "context": optional_text(context),
        "category": optional_text(category),
        "label": label,
        "target": optional_text(target),
        "split": optional_text(split),
        "messages": None,
        "_where": where,
    }


def file_split(path: Path) -> str | None:
    """The split a file's name ends with (``harmful_val.json`` -> ``val``), if any."""
    m = _SPLIT_SUFFIX.search(path.stem)
    return m.group(1) if m else None


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_")


HARMBENCH_COLUMNS = ("Behavior", "Tags", "ContextString", "BehaviorID")


def _harmbench_marks(row: dict[str, str]) -> tuple[set[str], str]:
    """A HarmBench row's tags and functional category, lower case."""
    tags = {t.strip().lower() for t in row["Tags"].split(",") if t.strip()}
    return tags, row.get("FunctionalCategory", "").strip().lower()


def _is_copyright(tags: set[str], functional: str) -> bool:
    return "hash_check" in tags or functional == "copyright"


def count_harmbench_copyright(path: Path) -> int:
    """How many copyright behaviours (``hash_check`` rows) a HarmBench CSV holds."""
    return sum(_is_copyright(*_harmbench_marks(r)) for _, r in read_csv(path, HARMBENCH_COLUMNS))


def _harmbench(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, r in read_csv(path, HARMBENCH_COLUMNS):
        tags, functional = _harmbench_marks(r)
        tagged_context = "context" in tags or functional == "contextual"
        context = optional_text(r["ContextString"])
        if tagged_context and context is None:
            raise RgeomError(
                f"{path}: row {i} ({r['BehaviorID']!r}) is a contextual behaviour "
                "with an empty ContextString"
            )
        if context is not None and not spec["contextual"]:
            continue
        if _is_copyright(tags, functional) and not spec["copyright"]:
            continue
        rows.append(
            prompt_row(
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
        prompt_row(
            f"strongreject-{i:04d}",
            r["forbidden_prompt"],
            f"row {i}",
            label="harmful",
            category=r["category"],
        )
        for i, r in read_csv(path, ("category", "forbidden_prompt"))
    ]


def _xstest(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, r in read_csv(path, ("id", "prompt", "type")):
        kind = r["type"].strip()
        rows.append(
            prompt_row(
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
    for i, r in read_csv(path, ("goal",)):
        index = r.get("index", "").strip() or str(i)
        base = f"jbb-{_slug(r.get('behavior', '')) or index}"
        # Behaviour names are unique in JBB, but a user's file may repeat one.
        prompt_id = base if base not in seen else f"{base}-{index}"
        seen.add(prompt_id)
        rows.append(
            prompt_row(
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
        prompt_row(
            f"advbench-{i:04d}", r["goal"], f"row {i}", label="harmful", target=r.get("target")
        )
        for i, r in read_csv(path, ("goal",))
    ]


def _parse_json(path: Path, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # A JSONL line is one line: its own "line 1" would contradict the line in `what`.
        at = f"line {exc.lineno}, column {exc.colno}" if "\n" in text else f"column {exc.colno}"
        raise RgeomError(f"{path}: {what} does not parse as JSON ({at}: {exc.msg})") from None


def _arditi(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    data = _parse_json(path, read_text(path), "the file")
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
            prompt_row(
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
        turns.append({"role": turn["role"], "content": normalise_newlines(turn["content"])})
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
    row = prompt_row(
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


def read_jsonl(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        obj = _parse_json(path, line, f"line {n}")
        rows.append(
            _record(obj, f"line {n}", f"{path.stem}-{n:05d}", spec["text_field"], str(path))
        )
    return rows


def read_hub(spec: dict[str, Any]) -> Loaded:
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
    return Loaded(rows=rows, origin=origin, sha256=None)


FILE_READERS = {
    "harmbench_csv": _harmbench,
    "strongreject_csv": _strongreject,
    "xstest_csv": _xstest,
    "jbb_csv": _jbb,
    "advbench_csv": _advbench,
    "arditi_json": _arditi,
    "jsonl": read_jsonl,
}
