"""Load: a 10,000-case generation + judge cell, and the activation writer on 100,000 prompts.

Both run the real stage functions (``rgeom.stages.generate``/``judge``/``extract``, sharding
and all) on the tiny random model, each size in its own subprocess so its peak resident
memory (``ru_maxrss``) is its own. Memory is "flat" when the peak barely moves while the
input grows tenfold; the report gives the peak right after loading the model too, so the
growth is the stage's own.

    python benchmarks/bench_load.py gen --sizes 1000 10000
    python benchmarks/bench_load.py extract --sizes 10000 100000
    python benchmarks/bench_load.py extract --sizes 10000 100000 --bound-mib 1024

``--bound-mib`` makes the run fail when a size's peak exceeds the bound (the fixed memory
bound the issue asks for); ``--json`` writes every measurement to a file.
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

SEED = 0


def maxrss_mib() -> float:
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def builtin_texts() -> list[tuple[str, str]]:
    rows = []
    for name in ("harmful.jsonl", "harmless.jsonl"):
        path = resources.files("rgeom.data").joinpath("builtin", name)
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append((row["text"], row.get("label", "harmful")))
    return rows


def write_prompts(path: Path, n: int, seed: int = SEED) -> None:
    """``n`` prompts cycled from the embedded sets, each made unique by a numbered suffix,
    so every row is a distinct test case of realistic length."""
    import numpy as np
    import pyarrow as pa

    from rgeom.data import PROMPT_SCHEMA
    from rgeom.io import write_table

    base = builtin_texts()
    pick = np.random.default_rng(seed).integers(0, len(base), n)
    texts = [f"{base[j][0]} (case {i})" for i, j in enumerate(pick)]
    labels = [base[j][1] for j in pick]
    table = pa.table(
        {
            "prompt_id": [f"case-{i:06d}" for i in range(n)],
            "source": ["bench"] * n,
            "split": ["test"] * n,
            "text": texts,
            "context": pa.array([None] * n, pa.string()),
            "category": ["bench"] * n,
            "label": labels,
            "target": [""] * n,
        }
    )
    write_table(path, table, PROMPT_SCHEMA, {"dataset": "bench", "seed": seed})


def child(args) -> None:
    """One measurement, in this (fresh) process; prints one JSON line."""
    import torch

    from rgeom.io import read_meta
    from rgeom.models import load_model
    from rgeom.stages import extract, generate, judge

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    prompts = work / f"prompts-{args.n}.parquet"
    write_prompts(prompts, args.n)
    # Importing torch and loading the model once is the floor every stage stands on.
    load_model(args.model)
    floor = maxrss_mib()
    params = {"seed": SEED, "model": {"device": "cpu"}, "arm": "base", "step": 0}
    t0 = time.perf_counter()
    if args.mode == "gen":
        gen = work / f"gen-{args.n}.parquet"
        params["generate"] = {
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "shard_size": args.shard_size,
        }
        params["benchmark"] = "bench"
        generate.run(str(args.model), str(prompts), str(gen), params)
        t_gen = time.perf_counter() - t0
        after_gen = maxrss_mib()
        judge.run(
            str(gen),
            str(work / f"labels-{args.n}.parquet"),
            str(work / f"metrics-{args.n}.parquet"),
            {"seed": SEED, "judge": {"bootstrap": args.bootstrap}},
        )
        rows = read_meta(gen)["num_rows"]
        extra = {"generate_s": round(t_gen, 1), "peak_after_generate_mib": round(after_gen)}
    else:
        out = work / f"acts-{args.n}.parquet"
        params["activations"] = {"batch_size": args.batch_size, "shard_size": args.shard_size}
        # The activation writer alone: no baseline refusal scores (the source model's
        # extra forward, which the schema's carrier.filter_prompts default would ask for).
        params["carrier"] = {"filter_prompts": False}
        half = args.n // 2
        # Two sets, as in the workflow (dir_harmful, dir_harmless): the same file twice
        # would duplicate ids, so the benchmark splits one file in two.
        import pyarrow.parquet as pq

        table = pq.read_table(prompts)
        sets = []
        for key, part in (("dir_harmful", table[:half]), ("dir_harmless", table[half:])):
            path = work / f"{key}-{args.n}.parquet"
            pq.write_table(part, path)
            sets.append((key, str(path)))
        extract.run(str(args.model), sets, str(out), params)
        rows = read_meta(out)["num_rows"]
        extra = {"file_mib": round(out.stat().st_size / 2**20)}
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": args.mode,
                "n": args.n,
                "rows": rows,
                "seconds": round(seconds, 1),
                "per_s": round((args.n if args.mode == "gen" else rows) / seconds, 1),
                "floor_mib": round(floor),
                "peak_mib": round(maxrss_mib()),
                **extra,
            }
        )
    )


def _print_table(mode: str, results: list[dict]) -> None:
    unit = "cases/s" if mode == "gen" else "rows/s"
    print(f"\n{'n':>8} {'rows':>9} {'s':>7} {unit:>9} {'floor MiB':>10} {'peak MiB':>9}")
    for r in results:
        print(
            f"{r['n']:>8} {r['rows']:>9} {r['seconds']:>7} {r['per_s']:>9} "
            f"{r['floor_mib']:>10} {r['peak_mib']:>9}"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        grow = (last["peak_mib"] - first["peak_mib"]) / max(1, last["n"] - first["n"]) * 1024
        print(f"peak grows {grow:.2f} KiB per extra prompt from n={first['n']} to n={last['n']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=("gen", "extract"))
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--model", default=None, help="model folder (default: tiny random)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=None, help="default: the schema's")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bound-mib", type=float, default=None, help="fail above this peak RSS")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch_size is None:
        args.batch_size = 32 if args.mode == "gen" else 64
    if args.shard_size is None:
        from rgeom import activations, generation

        args.shard_size = (
            generation.DEFAULT_SHARD_SIZE if args.mode == "gen" else activations.DEFAULT_SHARD_SIZE
        )
    if args.child is not None:
        args.n = args.child
        child(args)
        return
    sizes = args.sizes or ([1000, 10000] if args.mode == "gen" else [10000, 100000])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        if args.model is None:
            from rgeom.models import prepare_model

            args.model = str(Path(tmp) / "tiny")
            prepare_model("tiny_random", args.model, seed=SEED)
        for n in sizes:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            cmd = [sys.executable, __file__, args.mode, "--child", str(n), "--work", str(work)]
            for flag in ("model", "batch_size", "shard_size", "max_new_tokens", "bootstrap"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"size {n} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            print(json.dumps(row), flush=True)
    _print_table(args.mode, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.bound_mib is not None:
        over = [r for r in results if r["peak_mib"] > args.bound_mib]
        if over:
            sys.exit(f"peak RSS above the {args.bound_mib} MiB bound: {over}")
        print(f"every size stayed under the {args.bound_mib:.0f} MiB bound")


if __name__ == "__main__":
    main()
