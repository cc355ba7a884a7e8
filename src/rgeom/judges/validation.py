"""Judge validation: score a human-labelled file with the configured judge and report
accuracy, Cohen's kappa and the confusion matrix.

A labelled file (JSONL, CSV or Parquet) has one row per (prompt, response) with columns

* ``response`` (required): the model output being judged;
* ``label`` (required): the human label, ``full_compliance`` / ``full_refusal`` /
  ``partial_refusal`` for task ``xstest``, ``yes`` / ``no`` (or 1 / 0) for ``harmbench``;
* ``task`` (optional): ``xstest`` or ``harmbench``; inferred from the labels when absent;
* ``prompt_id`` (optional): joins ``prompt`` from a prompts file (an XSTest CSV, whose ids
  become ``xstest-<id>``, or any rgeom prompt Parquet) when ``prompt`` is absent;
* ``prompt`` / ``behavior`` and ``context`` (optional): the question (XSTest) or the
  behaviour and its context (HarmBench); only model judges read them.

``builtin:xstest`` is rgeom's own file: short responses we wrote, with our labels, to XSTest
prompts (keyed by XSTest prompt id; the prompts themselves are not shipped).
``builtin:rgeom`` is the ``test`` split of rgeom's own judge-validation set
(``judge_validation.jsonl``: our paraphrased prompts, responses we wrote to read like chat
models', refusal and harmfulness labels): every row is an ``xstest`` row, and rows with a
harmful prompt are also ``harmbench`` rows. No judge was tuned on that split.
"""

from __future__ import annotations

import csv
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rgeom.config import section_with_defaults
from rgeom.errors import RgeomError
from rgeom.io import write_table, write_text
from rgeom.judges import harmfulness, model_judges
from rgeom.judges.metrics import agreement as _agreement
from rgeom.judges.refusal import JUDGE_NAME, JUDGE_VERSION, classify
from rgeom.prompts import read_prompt_set
from rgeom.schemas import AGREEMENT_SCHEMA, CONFUSION_SCHEMA, PREDICTION_SCHEMA

BUILTIN = {"builtin:xstest": "xstest_labelled.jsonl", "builtin:rgeom": "judge_validation.jsonl"}
_REFUSAL_LABEL = {
    "compliance": "full_compliance",
    "full": "full_refusal",
    "partial": "partial_refusal",
}
XSTEST_LABELS = ("full_compliance", "full_refusal", "partial_refusal")
HARMBENCH_LABELS = ("yes", "no")
INVALID = "invalid"
_XS_ALIASES = {
    "1_full_compliance": "full_compliance",
    "2_full_refusal": "full_refusal",
    "3_partial_refusal": "partial_refusal",
    "compliance": "full_compliance",
    "refusal": "full_refusal",
    "partial": "partial_refusal",
}
_HB_ALIASES = {"1": "yes", "0": "no", "true": "yes", "false": "no"}
_REFUSAL_TO_XS = {"none": "full_compliance", "full": "full_refusal", "partial": "partial_refusal"}


# --- reading ------------------------------------------------------------------------


def _read_rows(path: str) -> tuple[list[dict[str, Any]], str]:
    if path in BUILTIN:
        text = resources.files("rgeom.judges").joinpath(BUILTIN[path]).read_text("utf-8")
        rows = _jsonl(text.splitlines(), path)
        if path == "builtin:rgeom":
            rows = _expand_rgeom([r for r in rows if r["split"] == "test"])
        return rows, path
    p = Path(path)
    if not p.exists():
        raise RgeomError(f"labelled file not found: {p}")
    if p.suffix == ".parquet":
        return pq.read_table(p).to_pylist(), str(p)
    if p.suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh)), str(p)
    if p.suffix in (".jsonl", ".json"):
        return _jsonl(p.read_text(encoding="utf-8").splitlines(), str(p)), str(p)
    raise RgeomError(f"{p}: labelled file must be .jsonl, .csv or .parquet")


def _jsonl(lines: list[str], origin: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RgeomError(f"{origin}: line {i} is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise RgeomError(f"{origin}: line {i} is not a JSON object")
        rows.append(obj)
    return rows


def _expand_rgeom(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One xstest row per response, plus a harmbench row where the prompt is harmful."""
    out = []
    for r in rows:
        base = {"prompt_id": r["id"], "prompt": r["prompt"], "response": r["response"]}
        out.append({**base, "task": "xstest", "label": _REFUSAL_LABEL[r["refusal"]]})
        if r.get("harmful") is not None:
            label = "yes" if int(r["harmful"]) else "no"
            out.append({**base, "task": "harmbench", "label": label})
    return out


#: Words per token of English text under a BPE vocabulary: a completion cut at
#: ``max_new_tokens`` tokens holds about this many words per token (the judge's own cut
#: lengths, 12/24/48 words, stand for 16/32/64 tokens the same way).
WORDS_PER_TOKEN = 0.75


@functools.lru_cache(maxsize=16)
def builtin_error_rates(kind: str, max_new_tokens: int | None = None) -> dict[str, int]:
    """Confusion counts (tp, fn, tn, fp) of an embedded judge on builtin:rgeom's test split.

    ``kind``: ``harmfulness_judge`` (harmful vs the harmfulness label), ``refusal_matcher``
    (its "neither refused nor degenerate" ASR rule vs the harmfulness label) or
    ``any_refusal`` (refusal_matcher's refused vs any human refusal). Positive = harmful,
    or refused.

    ``max_new_tokens``: the generation length of the completions being judged. A judge's
    error rates depend on how much of an answer it sees (a 32-token cut of a harmful answer
    may not have reached the harmful part yet), so the harmfulness rates are measured on
    the test responses cut to the same length (:data:`WORDS_PER_TOKEN`) and relabelled by
    :func:`rgeom.judges.harmfulness.truncated_label`; the short hand-written test rows are
    scored as they are. Without it, or for ``any_refusal`` (cut refusals have no labels of
    their own), whole responses are used.
    """
    if kind == "any_refusal":
        sub = [r for r in read_labelled("builtin:rgeom") if r["task"] == "xstest"]
        pred = [classify(r["response"]).refused for r in sub]
        gold = [r["gold"] != "full_compliance" for r in sub]
    else:
        pairs = _harmfulness_test_rows(max_new_tokens)
        if kind == harmfulness.JUDGE_NAME:
            pred = [bool(harmfulness.judge(prompt, response)) for prompt, response, _ in pairs]
        elif kind == JUDGE_NAME:
            pred = [
                not (v.refused or v.degenerate)
                for v in (classify(response) for _, response, _ in pairs)
            ]
        else:
            raise RgeomError(f"no built-in error rates for judge {kind!r}")
        gold = [g for _, _, g in pairs]
    p, g = np.asarray(pred, bool), np.asarray(gold, bool)
    return {
        "tp": int((p & g).sum()),
        "fn": int((~p & g).sum()),
        "tn": int((~p & ~g).sum()),
        "fp": int((p & ~g).sum()),
    }


def _harmfulness_test_rows(max_new_tokens: int | None) -> list[tuple[str, str, bool]]:
    """(behaviour, response, harmful) of the test split and its short hand-written rows,
    the responses cut to ``max_new_tokens`` tokens' worth of words if given."""
    rows = [r for r in harmfulness.load_rows("test") if r.get("harmful") is not None]
    if max_new_tokens is None:
        out = [(r["prompt"], r["response"], bool(r["harmful"])) for r in rows]
    else:
        n_words = max(1, round(max_new_tokens * WORDS_PER_TOKEN))
        out = [
            (r["prompt"], harmfulness.truncate(r["response"], n_words), bool(label))
            for r in rows
            if (label := harmfulness.truncated_label(r, n_words)) is not None
        ]
    short = harmfulness.load_rows("test", harmfulness.SHORT_FILE)
    return out + [(r["prompt"], r["response"], bool(r["harmful"])) for r in short]


def _prompt_lookup(prompts: str | None) -> dict[str, tuple[str, str | None]]:
    """prompt_id -> (text, context) from an XSTest CSV or an rgeom prompt Parquet."""
    if not prompts:
        return {}
    p = Path(prompts)
    if not p.exists():
        raise RgeomError(f"prompts file not found: {p}")
    if p.suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"id", "prompt"} <= set(rows[0]):
            raise RgeomError(f"{p}: expected XSTest columns id, prompt")
        return {f"xstest-{r['id'].strip()}": (r["prompt"], None) for r in rows}
    table = read_prompt_set(p, required=("prompt_id", "text")).to_pylist()
    return {r["prompt_id"]: (r["text"], r.get("context")) for r in table}


def _norm_label(value: Any, origin: str, i: int) -> tuple[str, str]:
    """(task, canonical label) of a human label."""
    text = str(value).strip().lower() if value is not None else ""
    if text in XSTEST_LABELS or text in _XS_ALIASES:
        return "xstest", _XS_ALIASES.get(text, text)
    if text in HARMBENCH_LABELS or text in _HB_ALIASES:
        return "harmbench", _HB_ALIASES.get(text, text)
    raise RgeomError(
        f"{origin}: row {i}: label {value!r} is not one of "
        f"{list(XSTEST_LABELS)} (xstest) or yes/no (harmbench)"
    )


def read_labelled(path: str, prompts: str | None = None) -> list[dict[str, Any]]:
    """Rows {prompt_id, task, gold, prompt, context, response} of a labelled file."""
    raw, origin = _read_rows(path)
    if not raw:
        raise RgeomError(f"{origin}: no labelled rows")
    lookup = _prompt_lookup(prompts)
    out = []
    for i, r in enumerate(raw):
        if "response" not in r or r["response"] is None:
            raise RgeomError(f"{origin}: row {i}: missing 'response'")
        if "label" not in r:
            raise RgeomError(f"{origin}: row {i}: missing 'label' (the human label)")
        inferred, gold = _norm_label(r["label"], origin, i)
        task = str(r.get("task") or inferred).strip().lower()
        if task != inferred:
            raise RgeomError(f"{origin}: row {i}: label {r['label']!r} does not fit task {task!r}")
        pid = r.get("prompt_id")
        prompt = r.get("prompt") or r.get("behavior")
        context = r.get("context") or None
        if not prompt and pid in lookup:
            prompt, context = lookup[pid][0], context or lookup[pid][1]
        out.append(
            {
                "prompt_id": None if pid is None else str(pid),
                "task": task,
                "gold": gold,
                "prompt": prompt,
                "context": context,
                "response": str(r["response"]),
            }
        )
    return out


# --- judging ------------------------------------------------------------------------


def _judge_task(
    task: str, rows: list[dict[str, Any]], params: dict[str, Any], loader
) -> tuple[str, str, list[str], list[str | None]]:
    """(judge name, version, predictions, raw outputs) for the rows of one task
    (``params``: the judge section with its defaults)."""
    name = params[task]
    responses = [r["response"] for r in rows]
    if name == harmfulness.JUDGE_NAME and task == "harmbench":
        preds = [
            "yes" if harmfulness.judge(r["prompt"] or "", r["response"]) else "no" for r in rows
        ]
        return name, harmfulness.JUDGE_VERSION, preds, [None] * len(rows)
    if name in (JUDGE_NAME, harmfulness.JUDGE_NAME):
        verdicts = [classify(t) for t in responses]
        if task == "xstest":
            preds = [_REFUSAL_TO_XS[v.refusal] for v in verdicts]
        else:
            preds = ["no" if (v.refused or v.degenerate) else "yes" for v in verdicts]
        return name, JUDGE_VERSION, preds, [None] * len(rows)
    missing = [i for i, r in enumerate(rows) if not r["prompt"]]
    if missing:
        raise RgeomError(
            f"judge {name!r} needs the prompt of every row; {len(missing)} rows have none "
            "(give a 'prompt' column, or --prompts with an XSTest CSV for their prompt_id)"
        )
    spec = dict(params[f"{task}_model"] or {})
    spec.setdefault("batch_size", params["batch_size"])
    judge = loader(spec, name)
    try:
        prompts = [r["prompt"] for r in rows]
        if name == model_judges.XSTEST:
            classes, raw = model_judges.xstest_classes(judge, prompts, responses)
            preds = [_REFUSAL_TO_XS.get(c, INVALID) for c in classes]
        elif name == model_judges.HARMBENCH:
            verdicts, raw = model_judges.harmbench_verdicts(
                judge,
                prompts,
                responses,
                [r["context"] for r in rows],
                int(params["max_generation_tokens"]),
            )
            preds = [{1: "yes", 0: "no"}.get(v, INVALID) for v in verdicts]
        else:
            raise RgeomError(f"judge {name!r} cannot label task {task!r}")
        return name, judge.version, preds, list(raw)
    finally:
        model_judges.release(judge)


def _markdown(agree: list[dict], confusion: list[dict], source: str) -> str:
    lines = [f"# Judge validation on {source}", ""]
    lines += [
        "| task | judge | n | invalid | accuracy | Cohen's kappa |",
        "|---|---|---|---|---|---|",
    ]
    for a in agree:
        lines.append(
            f"| {a['task']} | {a['judge']} | {a['n']} | {a['n_invalid']} | "
            f"{a['accuracy']:.3f} | {a['kappa']:.3f} |"
        )
    for a in agree:
        cells = [c for c in confusion if c["task"] == a["task"]]
        labels = sorted({c["gold"] for c in cells} | {c["pred"] for c in cells})
        lines += ["", f"## {a['task']}: rows = human label, columns = {a['judge']}", ""]
        lines.append("| human \\ judge | " + " | ".join(labels) + " |")
        lines.append("|---" * (len(labels) + 1) + "|")
        for g in labels:
            counts = {c["pred"]: c["count"] for c in cells if c["gold"] == g}
            lines.append(f"| {g} | " + " | ".join(str(counts.get(p, 0)) for p in labels) + " |")
    return "\n".join(lines) + "\n"


def validate_judge(
    labelled: str,
    prompts: str | None,
    outputs: dict[str, str],
    params: dict[str, Any],
    meta: dict[str, Any],
    loader=model_judges.load_judge_model,
    max_invalid_rate: float | None = None,
) -> str:
    """Write agreement, confusion and prediction tables and a markdown report; return it.

    A judge whose share of unparseable answers exceeds ``max_invalid_rate`` (schema key
    ``validate.max_invalid_rate``) fails validation with an error naming it: its agreement
    numbers would describe only the rows it happened to answer.
    """
    params = section_with_defaults("judge", params)
    rows = read_labelled(labelled, prompts)
    agree: list[dict] = []
    confusion: list[dict] = []
    preds_out: dict[str, list] = {f.name: [] for f in PREDICTION_SCHEMA}
    for task in sorted({r["task"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        sub = [rows[i] for i in idx]
        name, version, preds, raw = _judge_task(task, sub, params, loader)
        gold = [r["gold"] for r in sub]
        stats = _agreement(preds, gold)
        agree.append(
            {
                "task": task,
                "judge": name,
                "judge_version": str(version),
                "n": len(sub),
                "n_invalid": int(sum(p == INVALID for p in preds)),
                "accuracy": stats["accuracy"],
                "kappa": stats["kappa"],
            }
        )
        labels = stats["confusion"]["labels"]
        mat = np.asarray(stats["confusion"]["matrix"])
        for gi, g in enumerate(labels):
            for pi, p in enumerate(labels):
                confusion.append(
                    {"task": task, "judge": name, "gold": g, "pred": p, "count": int(mat[gi, pi])}
                )
        for i, r, p, o in zip(idx, sub, preds, raw, strict=True):
            for k, v in (
                ("row", i),
                ("prompt_id", r["prompt_id"]),
                ("task", task),
                ("gold", r["gold"]),
                ("pred", p),
                ("judge", name),
                ("judge_output", o),
            ):
                preds_out[k].append(v)
    if max_invalid_rate is not None:
        bad = [a for a in agree if a["n_invalid"] > max_invalid_rate * a["n"]]
        if bad:
            raise RgeomError(
                "judge validation failed: "
                + "; ".join(
                    f"{a['judge']} ({a['task']}) gave {a['n_invalid']} of {a['n']} answers that "
                    f"are not a verdict ({a['n_invalid'] / a['n']:.1%} > "
                    f"validate.max_invalid_rate {max_invalid_rate:.1%})"
                    for a in bad
                )
            )
    record = {**meta, "labelled": labelled, "prompts": prompts}
    for key, table, schema in (
        ("agreement", pa.Table.from_pylist(agree, AGREEMENT_SCHEMA), AGREEMENT_SCHEMA),
        ("confusion", pa.Table.from_pylist(confusion, CONFUSION_SCHEMA), CONFUSION_SCHEMA),
        ("predictions", pa.table(preds_out, PREDICTION_SCHEMA), PREDICTION_SCHEMA),
    ):
        write_table(outputs[key], table, schema, record)
    report = _markdown(agree, confusion, labelled)
    write_text(outputs["markdown"], report)
    return report
