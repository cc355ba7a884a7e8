"""Both embedded judges against the prefix matcher, on the held-out split of our own set.

Scores, on the ``test`` split of ``src/rgeom/judges/judge_validation.jsonl`` (prompts and
responses we wrote; no judge was tuned on that split):

* refusal (XSTest's compliance / full / partial): ``refusal_matcher`` (this version), the
  XSTest-style prefix matcher, and optionally the previous ``refusal_matcher`` (``--old
  FILE``, e.g. ``git show main:src/rgeom/judges/refusal.py > /tmp/old_refusal.py``):
  per-class precision and recall, 3-way and any-refusal accuracy and Cohen's kappa;
* harmfulness (HarmBench's yes/no, harmful prompts only): ``harmfulness_judge`` against
  "neither refused nor degenerate" (the old embedded ASR rule) and "not a prefix refusal",
  on the full responses, on the same responses cut to 12, 24 and 48 words (about 16, 32 and
  64 tokens; labels by ``harmfulness.truncated_label``) and on the short hand-written rows
  of ``judge_validation_short.jsonl``; optionally also a previous harmfulness judge
  (``--old-harmfulness FILE``, e.g. ``git show main:src/rgeom/judges/harmfulness.py``);
* speed per response.

The set is synthetic and written by the same people as the judges, so read these numbers
as an upper bound on agreement with people on real model outputs.

    python benchmarks/bench_refusal_judge.py [--split test] [--old /tmp/old_refusal.py]
        [--old-harmfulness /tmp/old_harmfulness.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

from rgeom.judges import agreement, harmfulness
from rgeom.judges.refusal import FULL, NONE, PARTIAL, classify, prefix_refusal

CLASSES = (NONE, FULL, PARTIAL)
NAMES = {"compliance": NONE, "full": FULL, "partial": PARTIAL}


def per_class(pred: list[str], gold: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for c in CLASSES:
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        n_pred, n_gold = pred.count(c), gold.count(c)
        out[c] = (tp / n_pred if n_pred else float("nan"), tp / n_gold if n_gold else float("nan"))
    return out


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _load_old(path: str):
    return _load_module(path, "old_refusal").classify


def harm_conditions(split: str) -> dict[str, list[tuple[str, str, int]]]:
    """(behaviour, response, label) of the harmful-prompt rows, per length condition."""
    rows = [r for r in harmfulness.load_rows(split) if r.get("harmful") is not None]
    out = {"full": [(r["prompt"], r["response"], int(r["harmful"])) for r in rows]}
    for n in harmfulness.TRUNCATE_WORDS:
        out[f"cut to {n} words"] = [
            (r["prompt"], harmfulness.truncate(r["response"], n), harmfulness.truncated_label(r, n))
            for r in rows
        ]
    short = harmfulness.load_rows(split, harmfulness.SHORT_FILE)
    out["short hand-written"] = [(r["prompt"], r["response"], int(r["harmful"])) for r in short]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--old", help="a previous refusal.py to compare (its classify)")
    ap.add_argument("--old-harmfulness", help="a previous harmfulness.py to compare (its judge)")
    args = ap.parse_args()
    rows = harmfulness.load_rows(args.split)
    gold = [NAMES[r["refusal"]] for r in rows]
    texts = [r["response"] for r in rows]
    t0 = time.perf_counter()
    ours = [classify(t) for t in texts]
    ms = (time.perf_counter() - t0) / len(texts) * 1e3
    judges = {"refusal_matcher": [v.refusal for v in ours]}
    if args.old:
        old = _load_old(args.old)
        judges["refusal_matcher (old)"] = [old(t).refusal for t in texts]
    judges["prefix_matcher"] = [prefix_refusal(t) for t in texts]

    counts = ", ".join(f"{k}={gold.count(k)}" for k in CLASSES)
    print(f"## Refusal, split={args.split}: {len(rows)} responses ({counts})\n")
    print(
        "| judge | acc 3-way | kappa 3-way | acc any-refusal | kappa any-refusal | "
        "P/R none | P/R full | P/R partial |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def binary(labels: list[str]) -> list[str]:
        return ["refused" if lab != NONE else "complied" for lab in labels]

    for name, pred in judges.items():
        three, two = agreement(pred, gold), agreement(binary(pred), binary(gold))
        pr = per_class(pred, gold)
        cells = " | ".join(f"{pr[c][0]:.2f}/{pr[c][1]:.2f}" for c in CLASSES)
        print(
            f"| {name} | {three['accuracy']:.3f} | {three['kappa']:.3f} | {two['accuracy']:.3f}"
            f" | {two['kappa']:.3f} | {cells} |"
        )
    print(f"\nrefusal_matcher: {ms:.2f} ms/response")

    judges = {"harmfulness_judge": harmfulness.judge}
    if args.old_harmfulness:
        judges["harmfulness_judge (old)"] = _load_module(args.old_harmfulness, "old_harm").judge

    def rule(_: str, text: str) -> int:
        v = classify(text)
        return int(not (v.refused or v.degenerate))

    judges["refusal_matcher: neither refused nor degenerate"] = rule
    judges["prefix_matcher: no refusal prefix"] = lambda _, t: int(prefix_refusal(t) == NONE)
    harmfulness.judge("", "")  # the one-off fit, outside the timing
    for cond, items in harm_conditions(args.split).items():
        hgold = [g for _, _, g in items]
        print(
            f"\n## Harmfulness, split={args.split}, {cond}: {len(items)} responses to harmful "
            f"prompts (harmful={sum(hgold)})\n"
        )
        print("| judge | accuracy | kappa | sensitivity | specificity | judged harmful |")
        print("|---|---|---|---|---|---|")
        for name, fn in judges.items():
            t0 = time.perf_counter()
            pred = [fn(b, t) for b, t, _ in items]
            ms = (time.perf_counter() - t0) / len(items) * 1e3
            a = agreement(pred, hgold)
            tp = sum(p and g for p, g in zip(pred, hgold, strict=True))
            tn = sum(not p and not g for p, g in zip(pred, hgold, strict=True))
            sens, spec = tp / max(1, sum(hgold)), tn / max(1, len(hgold) - sum(hgold))
            print(
                f"| {name} | {a['accuracy']:.3f} | {a['kappa']:.3f} | {sens:.3f} | {spec:.3f} | "
                f"{sum(pred) / len(pred):.3f} (people: {sum(hgold) / len(hgold):.3f}) |"
            )
            if name == "harmfulness_judge" and cond == "full":
                hms = ms
    print(f"\nharmfulness_judge: {hms:.2f} ms/response (after a one-off fit)")


if __name__ == "__main__":
    main()
