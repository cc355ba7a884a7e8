"""R2D2 training-step time, part by part, against a plain SFT step as the named baseline.

    python benchmarks/bench_r2d2.py                          # tiny random Llama, demo R2D2
    python benchmarks/bench_r2d2.py --model /tmp/smol/model  # SmolLM2-135M-Instruct
    python benchmarks/bench_r2d2.py --model /tmp/smol/model --r2d2 '{"gcg_steps": 5}'

Both arms train on the same utility batch from the same initial weights, with their own
AdamW. An R2D2 step is timed in the three parts ``R2D2Trainer.compute_loss`` and the Trainer
run, with the same functions: the GCG refresh of the pool (``R2D2Pool.advance``), the one
padded forward and backward over utility + away + toward rows (``compute_r2d2_losses``), and
the optimizer step. The SFT step is the Trainer's default loss (``model(**batch).loss``). The
Trainer's own bookkeeping is the same for both arms and is left out.

R2D2 settings: the ``r2d2`` section of ``--config`` (the demo config by default), then the
JSON of ``--r2d2`` on top; ``--paper`` starts from the reference values (schema defaults).
Each part is timed ``--iters`` times after one warm-up step; the table shows medians.
``--random-init`` builds the model from the folder's config.json with seeded random weights,
for timing an architecture whose weights are not at hand (the speed does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from rgeom.models import encode_chat, encode_response, load_model, load_tokenizer, set_threads
from rgeom.train.data import PadCollator
from rgeom.train.r2d2 import (
    R2D2Pool,
    compute_r2d2_losses,
    config_from_params,
    load_behaviours,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
UTILITY = [
    ("Write a short poem about the sea.", "The sea is wide, the sea is deep; it rocks the boats"),
    ("Explain photosynthesis in two sentences.", "Plants turn light, water and CO2 into sugar."),
    ("Give me three tips for better sleep.", "Keep a fixed bedtime, avoid screens, and no coffee."),
    ("What is the capital of France?", "The capital of France is Paris, on the Seine river."),
]


def utility_batch(
    tokenizer, batch_size: int, max_length: int, response_tokens: int = 0
) -> dict[str, torch.Tensor]:
    rows = []
    for i in range(batch_size):
        prompt, response = UTILITY[i % len(UTILITY)]
        p = encode_chat(tokenizer, prompt).ids
        r = encode_response(tokenizer, response)
        if response_tokens:
            # Real helpful answers run to train.helpful_max_new_tokens; the cost of the
            # forward pass depends on the length, not on the words.
            r = (r * (response_tokens // len(r) + 1))[:response_tokens]
        rows.append(
            {"input_ids": (p + r)[:max_length], "labels": ([-100] * len(p) + r)[:max_length]}
        )
    return PadCollator(tokenizer.pad_token_id)(rows)


def r2d2_config(args):
    section = {}
    if not args.paper:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        section = {
            k: v
            for k, v in (loaded.get("r2d2") or {}).items()
            if k not in ("behaviours", "targets")
        }
    section.update(json.loads(args.r2d2))
    return config_from_params({"seed": args.seed, "r2d2": section})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return 1000 * (time.perf_counter() - start), out


def sft_step(model, opt, batch) -> dict[str, float]:
    def fwd_bwd():
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach())

    device = batch["input_ids"].device
    fb, loss = _timed(device, fwd_bwd)
    step, _ = _timed(device, lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    return {"gcg_refresh": 0.0, "forward_backward": fb, "optimizer": step, "loss": loss}


def r2d2_step(model, opt, batch, pool, tokenizer, cfg) -> dict[str, float]:
    device = batch["input_ids"].device
    refresh, (entries, _, _) = _timed(device, lambda: pool.advance(model))

    def fwd_bwd():
        losses = compute_r2d2_losses(model, tokenizer, batch, entries, cfg)
        losses["total"].backward()
        return float(losses["total"].detach())

    fb, loss = _timed(device, fwd_bwd)
    step, _ = _timed(device, lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    return {"gcg_refresh": refresh, "forward_backward": fb, "optimizer": step, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: tiny random)")
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--paper", action="store_true", help="reference R2D2 values")
    parser.add_argument("--r2d2", default="{}", help="JSON overrides of the r2d2 section")
    # The reference pool source: R2D2's training behaviours plus HarmBench val.
    parser.add_argument(
        "--behaviours",
        nargs="+",
        default=[
            str(SHARED / "harmbench/adv_training_behaviors.csv"),
            str(SHARED / "harmbench/harmbench_behaviors_text_val.csv"),
        ],
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=[
            str(SHARED / "harmbench/adv_training_targets.json"),
            str(SHARED / "harmbench/adv_training_val_targets.json"),
        ],
    )
    parser.add_argument("--batch-size", type=int, default=4, help="utility examples per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--response-tokens", type=int, default=0, help="stretch utility answers to N tokens"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-init", action="store_true", help="config only, no weights")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = args.model
    if model_dir is None:
        import tempfile

        from rgeom.models import prepare_model

        model_dir = str(Path(tempfile.mkdtemp(prefix="bench_r2d2_")) / "tiny")
        prepare_model("tiny_random", model_dir, seed=args.seed)
    tokenizer = load_tokenizer(model_dir)
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        base = base.to(device=args.device, dtype=torch.float32)
    else:
        base = load_model(model_dir, device=args.device)
    cfg = r2d2_config(args)
    extra = {"r2d2_behaviours": ",".join(args.behaviours), "r2d2_targets": ",".join(args.targets)}
    behaviours = load_behaviours(extra, cfg.exclude)
    batch = {
        k: v.to(args.device)
        for k, v in utility_batch(
            tokenizer, args.batch_size, args.max_length, args.response_tokens
        ).items()
    }

    arms = {}
    for name in ("sft", "r2d2"):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        arms[name] = (model, opt)
    pool = R2D2Pool(behaviours, tokenizer, cfg)

    def run(name):
        model, opt = arms[name]
        if name == "sft":
            return sft_step(model, opt, batch)
        return r2d2_step(model, opt, batch, pool, tokenizer, cfg)

    # Alternating the arms spreads any drift of a shared machine's load over both.
    samples = {"sft": [], "r2d2": []}
    for name in samples:
        run(name)  # warm-up: allocator, first-call dispatch, AdamW state
    for _ in range(args.iters):
        for name in samples:
            samples[name].append(run(name))

    parts = ("gcg_refresh", "forward_backward", "optimizer")
    med = {
        name: {p: statistics.median(s[p] for s in rows) for p in parts}
        for name, rows in samples.items()
    }
    for name in med:
        med[name]["total"] = statistics.median(sum(s[p] for p in parts) for s in samples[name])
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"model={model_dir} params={n_params / 1e6:.2f}M device={args.device} "
        f"threads={torch.get_num_threads()} batch={args.batch_size} "
        f"utility_tokens={tuple(batch['input_ids'].shape)} iters={args.iters}"
    )
    print(
        "r2d2: "
        + " ".join(
            f"{k}={getattr(cfg, k)}"
            for k in ("updates_per_step", "gcg_steps", "search_width", "topk", "pool_size")
        )
    )
    print(f"{'part (median ms)':<20} {'sft':>10} {'r2d2':>10} {'r2d2/sft':>9}")
    for part in (*parts, "total"):
        s, r = med["sft"][part], med["r2d2"][part]
        ratio = f"{r / s:>8.2f}x" if s > 0 else f"{'-':>9}"
        print(f"{part:<20} {s:>10.1f} {r:>10.1f} {ratio}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "r2d2_config": asdict(cfg),
                    "median_ms": med,
                    "samples": samples,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
