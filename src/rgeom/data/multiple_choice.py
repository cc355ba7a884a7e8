"""Multiple-choice utility benchmarks read through ``datasets``: cais/mmlu and
allenai/ai2_arc, from the hub or a local file in the hub's own format.

Every question becomes one zero-shot prompt (:func:`mc_prompt`) whose target is the
answer's letter.
"""

from __future__ import annotations

import os
from typing import Any

from rgeom.data.formats import Loaded, file_split, prompt_row, resolve_path
from rgeom.errors import RgeomError
from rgeom.io import file_sha256

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
    local = resolve_path(spec["path"], shared_dir)
    if local.suffix in (".parquet", ".json", ".jsonl") or local.exists():
        if not local.exists():
            raise RgeomError(f"missing file: {local}")
        builder = "parquet" if local.suffix == ".parquet" else "json"
        origin = str(local)
        try:
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as exc:  # datasets raises many unrelated types for one user error
            raise RgeomError(f"cannot read {origin}: {type(exc).__name__}: {exc}") from exc
        split = spec["split"] or file_split(local) or "test"
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
    row = prompt_row(
        pid,
        mc_prompt(question, [str(c) for c in choices], subject),
        where,
        label="harmless",
        category=f"utility:{subject}" if subject else "utility",
        target=MC_LETTERS[answer],
        split=split,
    )
    return row


def read_mmlu(spec: dict[str, Any], shared_dir: str | os.PathLike) -> Loaded:
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
    return Loaded(rows=rows, origin=origin, sha256=sha or None)


def read_arc(spec: dict[str, Any], shared_dir: str | os.PathLike) -> Loaded:
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
    return Loaded(rows=rows, origin=origin, sha256=sha or None)
