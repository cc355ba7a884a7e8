"""Agreement of the refusal judges with hand labels (full / partial / none).

Compares ``rgeom.judges.refusal.classify`` (phrase lists + position features) with the
plain XSTest-style prefix matcher (start-of-response check only) on
``src/rgeom/judges/refusal_examples.jsonl``. Also reports the binary refused/not-refused
agreement, which is what ASR and over-refusal depend on, and the classifier's speed.

Caveat: the examples were written together with the classifier, so its numbers are
in-sample; read them as a regression check, not as an estimate of accuracy on new models.

    python benchmarks/bench_refusal_judge.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rgeom.judges import agreement
from rgeom.judges.refusal import NONE, classify, prefix_refusal

EXAMPLES = Path(__file__).resolve().parents[1] / "src/rgeom/judges/refusal_examples.jsonl"


def load_examples(path: Path = EXAMPLES) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> None:
    rows = load_examples()
    gold = [r["label"] for r in rows]
    texts = [r["response"] for r in rows]
    t0 = time.perf_counter()
    ours = [classify(t).refusal for t in texts]
    per_item_ms = (time.perf_counter() - t0) / len(texts) * 1e3
    prefix = [prefix_refusal(t) for t in texts]

    def binary(labels: list[str]) -> list[str]:
        return ["refused" if lab != NONE else "complied" for lab in labels]

    counts = ", ".join(f"{k}={gold.count(k)}" for k in ("full", "partial", "none"))
    print(f"{len(rows)} labelled responses ({counts})")
    print(f"{'judge':<16} {'acc(3-way)':>10} {'kappa':>7} {'acc(bin)':>9} {'kappa':>7}")
    for name, pred in (("refusal_matcher", ours), ("prefix_matcher", prefix)):
        three = agreement(pred, gold)
        two = agreement(binary(pred), binary(gold))
        print(
            f"{name:<16} {three['accuracy']:>10.3f} {three['kappa']:>7.3f} "
            f"{two['accuracy']:>9.3f} {two['kappa']:>7.3f}"
        )
    conf = agreement(ours, gold)["confusion"]
    print("refusal_matcher confusion (rows gold, cols pred):", conf["labels"], conf["matrix"])
    print(f"refusal_matcher speed: {per_item_ms:.3f} ms/response")
    for r, p in zip(rows, ours, strict=True):
        if p != r["label"]:
            print(f"  miss: gold={r['label']} pred={p} ({r['note']})")


if __name__ == "__main__":
    main()
