"""Time resid_pre extraction three ways on the same prompts and check they agree.

1. ``loop``:    one prompt at a time, ``output_hidden_states=True``, slice the suffix.
2. ``batched``: left-padded batches, ``output_hidden_states=True``, slice the suffix.
3. ``hooks``:   ``rgeom.activations.extract_activations`` (pre-hooks, early stop, streaming
                Parquet writes included).

Each method runs in its own subprocess, so the peak resident memory it reports
(``ru_maxrss`` above the level right after loading the model) is its own; torch allocates
outside Python's allocator, so tracemalloc would miss most of it.

    python benchmarks/bench_extraction.py                      # tiny random model
    python benchmarks/bench_extraction.py --model /tmp/smol/model --n 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

METHODS = ("loop", "batched", "hooks")


def maxrss_mib() -> float:
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def builtin_prompts(n: int, seed: int) -> list[dict]:
    rows = []
    for name in ("harmful.jsonl", "harmless.jsonl"):
        text = resources.files("rgeom.data").joinpath("builtin", name).read_text()
        rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.permutation(len(rows))[:n]]
    return [{"prompt_id": r["prompt_id"], "text": r["text"], "label": r["label"]} for r in picked]


def write_prompt_file(prompts: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(prompts)
    table = pa.table(
        {
            "prompt_id": [p["prompt_id"] for p in prompts],
            "source": ["builtin"] * n,
            "split": ["bench"] * n,
            "text": [p["text"] for p in prompts],
            "context": pa.array([None] * n, pa.string()),
            "category": ["bench"] * n,
            "label": [p["label"] for p in prompts],
            "target": [None] * n,
        }
    )
    pq.write_table(table, path)


def load(model_dir: str | None, threads: int):
    import torch

    from rgeom.models import build_tiny_model, build_tiny_tokenizer, load_model, load_tokenizer

    torch.set_num_threads(threads)
    if model_dir is None:
        tokenizer = build_tiny_tokenizer()
        tokenizer.padding_side = "left"
        return build_tiny_model(tokenizer, seed=0).eval(), tokenizer
    return load_model(model_dir), load_tokenizer(model_dir)


def run_child(args) -> None:
    """Run one method, save its activations as {prompt_id: [layers, suffix, d]}, report."""
    import torch

    from rgeom.activations import extract_activations, padded_positions, resolve_layers
    from rgeom.models import encode_chat, left_pad

    model, tokenizer = load(args.model, args.threads)
    prompts = json.loads(Path(args.work, "prompts.json").read_text())
    n_layers = model.config.num_hidden_layers
    layers = resolve_layers(args.layers, n_layers)
    encs = {p["prompt_id"]: encode_chat(tokenizer, p["text"]) for p in prompts}
    suffix = next(iter(encs.values())).suffix_len
    # Every child imports what the hook path needs before the baseline, so import-time
    # memory is not charged to one method.
    import pyarrow.parquet  # noqa: F401
    import tqdm.auto  # noqa: F401

    # Warm up kernels and allocator once so the first method is not charged for them.
    with torch.inference_mode():
        first = next(iter(encs.values()))
        model(input_ids=torch.tensor([first.ids]), use_cache=False)
    base_rss = maxrss_mib()
    out: dict[str, np.ndarray] = {}

    start = time.perf_counter()
    if args.child == "loop":
        with torch.inference_mode():
            for pid, enc in encs.items():
                hs = model(
                    input_ids=torch.tensor([enc.ids]), output_hidden_states=True, use_cache=False
                ).hidden_states
                out[pid] = torch.stack([hs[ly][0, -suffix:] for ly in layers]).float().numpy()
    elif args.child == "batched":
        order = sorted(encs, key=lambda pid: -len(encs[pid].ids))
        with torch.inference_mode():
            for i in range(0, len(order), args.batch_size):
                chunk = order[i : i + args.batch_size]
                ids, mask = left_pad([encs[p].ids for p in chunk], tokenizer.pad_token_id)
                hs = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=padded_positions(mask),
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states
                block = torch.stack([hs[ly][:, -suffix:] for ly in layers], 1).float().numpy()
                out.update(zip(chunk, block, strict=True))
    else:
        import pyarrow.parquet as pq

        table_path = Path(args.work, "hooks.parquet")
        extract_activations(
            model,
            tokenizer,
            {"bench_all": str(Path(args.work, "prompts.parquet"))},
            table_path,
            {"batch_size": args.batch_size, "layers": args.layers, "dtype": "float32"},
            {},
        )
        elapsed = time.perf_counter() - start
        peak = maxrss_mib() - base_rss
        # Reading back for the comparison is not part of the measured work.
        t = pq.read_table(table_path).to_pydict()
        vec = np.stack(t["vector"]).astype(np.float32)
        d = vec.shape[1]
        for pid in encs:
            out[pid] = np.zeros((len(layers), suffix, d), np.float32)
        for i, (pid, ly, pos) in enumerate(
            zip(t["prompt_id"], t["layer"], t["position"], strict=True)
        ):
            out[pid][layers.index(ly), suffix + pos] = vec[i]
    if args.child != "hooks":
        elapsed = time.perf_counter() - start
        peak = maxrss_mib() - base_rss
    np.savez(Path(args.work, f"{args.child}.npz"), **out)
    print(json.dumps({"method": args.child, "seconds": elapsed, "peak_rss_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="Hugging Face model directory (default: tiny random model)")
    ap.add_argument("--n", type=int, default=32, help="number of prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="*", help="layers to capture (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return

    with tempfile.TemporaryDirectory(prefix="rgeom-bench-") as work:
        prompts = builtin_prompts(args.n, args.seed)
        Path(work, "prompts.json").write_text(json.dumps(prompts))
        write_prompt_file(prompts, Path(work, "prompts.parquet"))
        passthrough = ["--n", str(args.n), "--batch-size", str(args.batch_size)]
        passthrough += ["--threads", str(args.threads), "--work", work]
        if args.model:
            passthrough += ["--model", args.model]
        if args.layers:
            passthrough += ["--layers", *map(str, args.layers)]
        results = {}
        for method in METHODS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", method, *passthrough],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stderr}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

        ref = np.load(Path(work, "loop.npz"))
        print(
            f"model: {args.model or 'tiny random'}  prompts: {len(prompts)}  "
            f"batch: {args.batch_size}  threads: {args.threads}"
        )
        scale = max(float(np.abs(ref[k]).max()) for k in ref.files)
        print(f"max |activation| {scale:.1f}; diffs are against the one-at-a-time loop")
        print(f"{'method':<9}{'seconds':>9}{'x loop':>8}{'peak MiB':>10}{'max |diff|':>12}")
        for method in METHODS:
            got = np.load(Path(work, f"{method}.npz"))
            diff = max(float(np.abs(got[k] - ref[k]).max()) for k in ref.files)
            r = results[method]
            speedup = results["loop"]["seconds"] / r["seconds"]
            print(
                f"{method:<9}{r['seconds']:>9.2f}{speedup:>8.2f}{r['peak_rss_mib']:>10.1f}"
                f"{diff:>12.2e}"
            )


if __name__ == "__main__":
    main()
