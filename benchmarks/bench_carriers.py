"""Time the carrier search with and without reusing cached prefix activations.

Arditi et al.'s search scores every candidate direction with three passes over the
validation prompts: ablation on the harmful and on the harmless ones, and an addition at the
candidate's layer on the harmless ones. An addition at layer l leaves blocks < l unchanged,
so :class:`rgeom.interventions.PrefixCache` runs them once and restarts each addition at
block l. This runs ``select_carrier`` both ways, side by side in one process on the same
prompts and candidates (the order alternates between repeats so neither always runs warm),
checks that every candidate's bypass / induce / KL agree (allclose), and reports:

* ``search``: the whole search (what the ``carriers`` stage pays per cell);
* ``addition``: the addition passes alone, the only part the cache can shorten.

    python benchmarks/bench_carriers.py                  # tiny random Llama (8 layers)
    python benchmarks/bench_carriers.py --smollm2        # SmolLM2-135M-Instruct (30 layers)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def builtin_texts(label: str, n: int, split: str) -> list[str]:
    text = resources.files("rgeom.data").joinpath("builtin", f"{label}.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    # The workflow's validation sets are the val split; fall back to any split when short.
    picked = [r["text"] for r in rows if r.get("split") == split]
    picked += [r["text"] for r in rows if r.get("split") != split]
    return picked[:n]


def load(args):
    import torch

    from rgeom.models import (
        build_tiny_model,
        build_tiny_tokenizer,
        load_model,
        load_tokenizer,
        prepare_model,
    )

    torch.set_num_threads(args.threads)
    if not args.smollm2 and args.model is None:
        tokenizer = build_tiny_tokenizer()
        tokenizer.padding_side = "left"
        model = build_tiny_model(tokenizer, seed=args.seed, layers=args.tiny_layers)
        return model.eval(), tokenizer, f"tiny random Llama ({args.tiny_layers} layers)"
    model_dir = args.model
    if model_dir is None:
        # The finished embedded run's converted model, else a fresh conversion (~40 s).
        model_dir = REPO / "results" / "model" / "base"
        if not (model_dir / "config.json").exists():
            model_dir = Path(tempfile.mkdtemp()) / "model"
            prepare_model("smollm2_gguf", model_dir)
    return load_model(model_dir), load_tokenizer(model_dir), str(model_dir)


def directions(model, tokenizer, harmful, harmless, layers):
    """Difference-in-means at the last prompt position of each candidate layer."""
    import torch

    from rgeom.activations import padded_positions
    from rgeom.models import decoder_layers, encode_chat, left_pad

    captured: dict[int, list] = {layer: [] for layer in layers}
    blocks = decoder_layers(model)

    def saver(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer].append(hidden[:, -1].double())

        return hook

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    handles = [
        blocks[lay].register_forward_pre_hook(saver(lay), with_kwargs=True) for lay in layers
    ]
    try:
        with torch.inference_mode():
            for texts in (harmful, harmless):
                ids, mask = left_pad([encode_chat(tokenizer, t).ids for t in texts], pad, device)
                pos = padded_positions(mask)
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=False,
                    logits_to_keep=1,
                )
    finally:
        for h in handles:
            h.remove()
    n = len(harmful)
    out = {}
    for layer in layers:
        x = torch.cat(captured[layer])
        out[(layer, -1)] = (x[:n].mean(0) - x[n:].mean(0)).cpu().numpy()
    return out


def time_additions(model, tokenizer, dirs, harmless, batch_size, cached: bool) -> float:
    from rgeom.interventions import PrefixCache, addition, last_logits

    start = time.perf_counter()
    if cached:
        cache = PrefixCache(model, tokenizer, harmless, [k[0] for k in dirs], batch_size)
        assert cache.usable
        for (layer, _), vec in dirs.items():
            cache.logits_with_addition(layer, vec)
    else:
        last_logits(model, tokenizer, harmless, batch_size)  # the base pass the cache replaces
        for (layer, _), vec in dirs.items():
            with addition(model, vec, layer):
                last_logits(model, tokenizer, harmless, batch_size)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct")
    ap.add_argument("--model", help="any Hugging Face model directory instead")
    ap.add_argument("--tiny-layers", type=int, default=8, help="layers of the tiny model")
    ap.add_argument("--n", type=int, default=12, help="harmful and harmless prompts each")
    ap.add_argument("--stride", type=int, default=1, help="every stride-th layer below 0.8 L")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from rgeom.interventions import select_carrier
    from rgeom.models import decoder_layers

    model, tokenizer, name = load(args)
    n_layers = len(decoder_layers(model))
    layers = [lay for lay in range(n_layers) if lay < 0.8 * n_layers and lay % args.stride == 0]
    harmful = builtin_texts("harmful", args.n, "val")
    harmless = builtin_texts("harmless", args.n, "val")
    dirs = directions(model, tokenizer, harmful, harmless, layers)
    print(
        f"{name}: {len(dirs)} candidates, {len(harmful)} harmful + {len(harmless)} harmless "
        f"prompts, {args.threads} threads"
    )

    def search(reuse: bool):
        start = time.perf_counter()
        result = select_carrier(
            model,
            tokenizer,
            dirs,
            harmful,
            harmless,
            kl_max=float("inf"),
            batch_size=args.batch_size,
            reuse_prefix=reuse,
        )
        return time.perf_counter() - start, result

    times: dict[str, list[float]] = {"full": [], "cached": []}
    add_times: dict[str, list[float]] = {"full": [], "cached": []}
    results = {}
    for rep in range(args.repeats):
        order = ("full", "cached") if rep % 2 == 0 else ("cached", "full")
        for method in order:
            elapsed, results[method] = search(method == "cached")
            times[method].append(elapsed)
            add_times[method].append(
                time_additions(
                    model, tokenizer, dirs, harmless, args.batch_size, method == "cached"
                )
            )
    assert results["cached"].reused_prefix and not results["full"].reused_prefix
    worst = 0.0
    for a, b in zip(results["full"].candidates, results["cached"].candidates, strict=True):
        for key in ("bypass", "induce", "kl"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-4, err_msg=key)
            worst = max(worst, abs(a[key] - b[key]))
    assert results["full"].carrier == results["cached"].carrier
    summary = {
        "model": name,
        "candidates": len(dirs),
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "search_full_s": min(times["full"]),
        "search_cached_s": min(times["cached"]),
        "search_speedup": min(times["full"]) / min(times["cached"]),
        "addition_full_s": min(add_times["full"]),
        "addition_cached_s": min(add_times["cached"]),
        "addition_speedup": min(add_times["full"]) / min(add_times["cached"]),
        "max_abs_score_diff": worst,
    }
    print(
        f"search:   full {summary['search_full_s']:.2f} s, cached {summary['search_cached_s']:.2f}"
        f" s -> {summary['search_speedup']:.2f}x\n"
        f"addition: full {summary['addition_full_s']:.2f} s, cached "
        f"{summary['addition_cached_s']:.2f} s -> {summary['addition_speedup']:.2f}x\n"
        f"scores equal (allclose 1e-4); largest difference {worst:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
