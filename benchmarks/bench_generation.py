"""Generation throughput: rgeom's batched path against a one-prompt-at-a-time loop.

    python benchmarks/bench_generation.py --model results/model/base
    python benchmarks/bench_generation.py --prompts 32 --batch-size 16 --max-new-tokens 32

Both arms run in the same process, on the same model, the same chat-encoded prompts
(rgeom's built-in harmful and harmless prompts, of varied lengths) and the same greedy
settings:

* **batched**: :func:`rgeom.generation.generate_from_ids`, which length-sorts the prompts,
  left-pads each batch of ``--batch-size`` and decodes with the KV cache;
* **loop**: one ``model.generate`` call per prompt, no padding (the KV cache is on, as it is
  by default, so the speed-up measured is batching and sorting, not caching).

Tokens/s counts generated tokens up to and excluding the first EOS, so neither arm is
credited for padding steps. The greedy outputs are compared token by token; left padding
changes the floating-point summation order, so a near-tie can flip a token, and the script
reports how many completions match exactly rather than assuming they all do.

With no ``--model``, SmolLM2-135M-Instruct is converted to ``--cache`` first (about 40 s).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from rgeom.generation import generate_from_ids
from rgeom.models import encode_chat, load_model, load_tokenizer, prepare_model, set_threads

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "rgeom" / "data" / "builtin"


def bench_prompts(n: int) -> list[str]:
    """``n`` built-in prompts, alternating harmful and harmless so lengths vary."""
    sets = []
    for name in ("harmful", "harmless"):
        lines = (BUILTIN / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        sets.append([json.loads(line)["text"] for line in lines if line.strip()])
    out = [p for pair in zip(*sets, strict=False) for p in pair]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} built-in prompts, asked for {n}")
    return out[:n]


def _trim(seq: list[int], eos: int) -> list[int]:
    return seq[: seq.index(eos)] if eos in seq else seq


@torch.inference_mode()
def loop_generate(model, tokenizer, encoded, max_new_tokens):
    """The baseline: one ``generate`` call per prompt, in input order."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out = []
    for ids in encoded:
        x = torch.tensor([ids], device=device)
        seq = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        out.append(_trim(seq[0, x.shape[1] :].tolist(), eos))
    return out


def batched_generate(model, tokenizer, encoded, batch_size, max_new_tokens):
    """rgeom's path, returning token ids (re-encoded from its text output is lossy)."""
    texts, _, n_new = generate_from_ids(
        model, tokenizer, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    return texts, n_new


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="converted HF model dir (default: SmolLM2)")
    ap.add_argument("--cache", default="/tmp/rgeom-bench-smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per arm (best kept)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        model_dir = args.cache
        if not Path(model_dir, "config.json").exists():
            prepare_model("smollm2_gguf", model_dir)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompts = bench_prompts(args.prompts)
    encoded = [encode_chat(tokenizer, p).ids for p in prompts]

    # One warm-up call each, untimed: the first forward pays for lazy initialisation.
    loop_generate(model, tokenizer, encoded[:1], 2)
    batched_generate(model, tokenizer, encoded[:2], 2, 2)

    def timed(fn):
        best, result = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        return best, result

    loop_s, loop_ids = timed(lambda: loop_generate(model, tokenizer, encoded, args.max_new_tokens))
    batch_s, (batch_texts, batch_new) = timed(
        lambda: batched_generate(model, tokenizer, encoded, args.batch_size, args.max_new_tokens)
    )
    loop_texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in loop_ids]
    loop_tokens = sum(len(s) for s in loop_ids)
    batch_tokens = sum(batch_new)
    equal = [a == b for a, b in zip(loop_texts, batch_texts, strict=True)]
    first_diff = next((i for i, e in enumerate(equal) if not e), None)
    diff = None
    if first_diff is not None:
        diff = {"prompt": first_diff, "loop": loop_texts[first_diff]}
        diff["batched"] = batch_texts[first_diff]
    result = {
        "model": str(model_dir),
        "prompts": len(prompts),
        "prompt_tokens": [min(map(len, encoded)), max(map(len, encoded))],
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "loop": {"seconds": loop_s, "tokens": loop_tokens, "tokens_per_s": loop_tokens / loop_s},
        "batched": {
            "seconds": batch_s,
            "tokens": batch_tokens,
            "tokens_per_s": batch_tokens / batch_s,
        },
        "equal_outputs": sum(equal),
        "first_difference": diff,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
    }
    result["speedup_tokens_per_s"] = (
        result["batched"]["tokens_per_s"] / result["loop"]["tokens_per_s"]
    )
    print(
        f"loop    : {loop_tokens} tokens in {loop_s:.1f} s = "
        f"{result['loop']['tokens_per_s']:.1f} tok/s\n"
        f"batched : {batch_tokens} tokens in {batch_s:.1f} s = "
        f"{result['batched']['tokens_per_s']:.1f} tok/s (batch {args.batch_size})\n"
        f"speed-up: {result['speedup_tokens_per_s']:.2f}x; "
        f"equal greedy outputs: {sum(equal)}/{len(equal)}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
