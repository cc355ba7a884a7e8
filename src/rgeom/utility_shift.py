"""Benign-utility audit: how far a checkpoint's distribution has moved from the base model's
on harmless answers.

The reference is the BASE model's own greedy completion of each harmless/utility prompt
(the base cell's generation tables). For every completion token y_t after the chat-templated
prompt, with p the base and q the checkpoint's next-token distributions:

* ``utility_ce``: mean of -log q(y_t): the checkpoint's cross-entropy on the base answers;
* ``utility_ce_base``: mean of -log p(y_t), the same for the base (``utility_ce`` minus it
  is the excess loss);
* ``utility_kl``: mean of KL(p || q) over the full vocabulary at those positions.

Each is averaged over a prompt's completion tokens, then over prompts; the bootstrap CI
resamples prompts. The completion is re-tokenized from its decoded text, so a token or two
may differ from the ids the base actually sampled; both models see the same ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rgeom.config import schema_default, section_with_defaults
from rgeom.errors import RgeomError
from rgeom.io import read_meta, read_table, write_table
from rgeom.judges.metrics import bootstrap_mean_ci, metric_rng
from rgeom.models import encode_chat, encode_response
from rgeom.schemas import METRIC_SCHEMA

log = logging.getLogger(__name__)

BENCHMARK = "utility_shift"
REFERENCE = "base_greedy"
METRICS = ("utility_kl", "utility_ce", "utility_ce_base")
# The metrics table's schema: the summary reads these rows beside the judges' metrics,
# with the "judge" column naming what the numbers are measured on.
SHIFT_SCHEMA = METRIC_SCHEMA
DEFAULT_BATCH_SIZE = schema_default("utility_shift.batch_size")


def reference_rows(paths: Sequence[str], labels: Sequence[str], limit: int | None):
    """(prompt, completion, ended) per prompt id from the base generation tables.

    ``ended``: the base stopped on its end-of-turn token (fewer new tokens than the
    generation's max_new_tokens), which is then scored as the answer's last token; an
    immediately ended (empty) answer is that one token.
    """
    seen: set[str] = set()
    pairs: list[tuple[str, str, bool]] = []
    for path in paths:
        t = read_table(path)
        for name in ("prompt_id", "label", "prompt", "completion"):
            if name not in t.column_names:
                raise RgeomError(f"{path}: missing column {name!r} (generation table)")
        cols = t.to_pydict()
        methods = cols.get("method", [None] * t.num_rows)
        cap = read_meta(path).get("max_new_tokens")
        n_new = cols.get("n_new_tokens", [None] * t.num_rows)
        for pid, lab, prompt, comp, method, n in zip(
            cols["prompt_id"],
            cols["label"],
            cols["prompt"],
            cols["completion"],
            methods,
            n_new,
            strict=True,
        ):
            ended = cap is None or n is None or int(n) < int(cap)
            # Plain prompts only (attack test cases carry a method) with something to score.
            if lab not in labels or method is not None or pid in seen or not (comp or ended):
                continue
            seen.add(pid)
            pairs.append((prompt, comp or "", ended))
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        # A base model whose answers are all empty (whitespace) leaves nothing to score.
        log.warning("no %s rows to score in %s", "/".join(labels), ", ".join(paths))
    return pairs


@torch.inference_mode()
def token_shift(
    model, base, tokenizer, pairs, batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[str, np.ndarray]:
    """Per prompt: mean CE of ``model``, of ``base``, and mean KL(base || model) per token.

    Sequences are batched by length (little padding); when ``base is model`` (the base
    cell) one forward pass serves both.
    """
    seqs, starts = [], []
    for prompt, completion, *ended in pairs:
        pre = encode_chat(tokenizer, prompt).ids
        body = encode_response(tokenizer, completion, eos=bool(ended and ended[0]))
        seqs.append(pre + body)
        starts.append(len(pre))
    out = {m: np.full(len(seqs), np.nan) for m in ("ce", "ce_base", "kl")}
    n_tokens = np.zeros(len(seqs), dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev_q = next(model.parameters()).device
    dev_p = next(base.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for lo in range(0, len(seqs), batch_size):
        rows = order[lo : lo + batch_size]
        width = max(len(seqs[i]) for i in rows)
        # Right padding: positions line up with each sequence's own indices.
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        lq = model(input_ids=ids.to(dev_q), attention_mask=mask.to(dev_q)).logits.float().cpu()
        if base is model:
            lp = lq
        else:
            lp = base(input_ids=ids.to(dev_p), attention_mask=mask.to(dev_p)).logits.float().cpu()
        for r, i in enumerate(rows):
            # Logits at t-1 predict token t, for every completion token t.
            pos = torch.arange(starts[i] - 1, len(seqs[i]) - 1)
            tgt = torch.tensor(seqs[i][starts[i] :])
            if tgt.numel() == 0:
                continue
            # Normalised at the completion positions only: the prompt's positions are most
            # of the batch (vocabulary-wide rows), and each row's log-softmax is its own.
            q = torch.log_softmax(lq[r, pos], -1)
            p = q if lp is lq else torch.log_softmax(lp[r, pos], -1)
            out["ce"][i] = float(-q.gather(1, tgt[:, None]).mean())
            out["ce_base"][i] = float(-p.gather(1, tgt[:, None]).mean())
            out["kl"][i] = float((p.exp() * (p - q)).sum(-1).clamp_min(0).mean())
            n_tokens[i] = tgt.numel()
    out["n_tokens"] = n_tokens
    return out


def utility_shift_table(
    model,
    base,
    tokenizer,
    references: Sequence[str],
    out: str,
    params: dict[str, Any],
    seed: int,
    meta: dict[str, Any],
) -> pa.Table:
    """Write the cell's utility_kl / utility_ce / utility_ce_base rows (metrics format);
    ``params`` is the utility_shift section."""
    params = section_with_defaults("utility_shift", params)
    labels = tuple(params["labels"])
    pairs = reference_rows(references, labels, params["limit"])
    if pairs:
        shift = token_shift(model, base, tokenizer, pairs, int(params["batch_size"]))
    else:
        shift = {k: np.zeros(0) for k in ("ce", "ce_base", "kl")}
        shift["n_tokens"] = np.zeros(0, dtype=np.int64)
    ok = shift["n_tokens"] > 0
    arm, step = str(meta.get("arm")), int(meta.get("step") or 0)
    n_boot = int(params["bootstrap"])
    rows: dict[str, list] = {f.name: [] for f in SHIFT_SCHEMA}
    for metric, key in zip(METRICS, ("kl", "ce", "ce_base"), strict=True):
        values = shift[key][ok]
        lo, hi = bootstrap_mean_ci(values, n_boot, metric_rng(seed, arm, str(step), metric))
        for name, v in (
            ("arm", arm),
            ("step", step),
            ("benchmark", BENCHMARK),
            ("metric", metric),
            ("value", float(values.mean()) if values.size else float("nan")),
            ("ci_low", lo),
            ("ci_high", hi),
            ("n", int(ok.sum())),
            ("judge", REFERENCE),
        ):
            rows[name].append(v)
    table = pa.table(rows, schema=SHIFT_SCHEMA)
    record = {
        **meta,
        "references": list(references),
        "n_tokens": int(shift["n_tokens"].sum()),
        "labels": list(labels),
    }
    write_table(out, table, SHIFT_SCHEMA, record)
    log.info(
        "utility shift %s step %d: KL %s, CE %s (base %s) over %d prompts",
        arm,
        step,
        *rows["value"],
        int(ok.sum()),
    )
    return table
