#!/usr/bin/env bash
# GPU smoke test: the paper's GPU code paths on SmolLM2-135M in bf16 on one CUDA GPU, through
# the real workflow (so every stage runs exactly as on the cluster), in well under 8 minutes.
# Prints one line per figure:
#   generate_hf        seconds and tokens/s of one generate cell (HF backend)
#   generate_vllm      the same with the vLLM backend (only when vllm is installed)
#   train_r2d2_zero2   seconds of a 2-step R2D2 segment under DeepSpeed ZeRO-2 (torchrun)
#   extract            seconds of activation extraction at every layer
#   carriers           seconds of the causal carrier search
#   total              wall seconds
# Use:   benchmarks/gpu_smoke.sh [WORKDIR]      (RGEOM_SMOLLM2_DIR=<converted HF folder>
#        skips the GGUF conversion; GPU_SMOKE_DRYRUN=1 only builds the DAG, on any machine)
# Put the figures in README.md with the date and the GPU (nvidia-smi -L).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/rgeom-gpu-smoke.XXXXXX)}"
mkdir -p "$WORK"
DRY=()
[[ "${GPU_SMOKE_DRYRUN:-0}" == 1 ]] && DRY=(-n)
DEVICE="${GPU_SMOKE_DEVICE:-cuda}"
if [[ ${#DRY[@]} -eq 0 && "$DEVICE" == cuda ]]; then
    python - <<'PY' || { echo "gpu_smoke: no CUDA device visible to torch" >&2; exit 1; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
fi
if [[ -n "${RGEOM_SMOLLM2_DIR:-}" ]]; then
    MODEL="{source: hf, path: ${RGEOM_SMOLLM2_DIR}, dtype: bfloat16, device: ${DEVICE}}"
else
    MODEL="{source: smollm2_gguf, dtype: bfloat16, device: ${DEVICE}}"
fi

config() {  # $1 = generate backend
    cat <<YAML
seed: 0
model: ${MODEL}
arms: [r2d2]
anchors: [0, 2]
benchmarks: [xstest]
data:
  sets:
    train_harmful: {format: builtin, path: harmful, split: train}
    train_harmless: {format: builtin, path: harmless, split: train}
    dir_harmful: {format: builtin, path: harmful, split: train}
    dir_harmless: {format: builtin, path: harmless, split: train}
    val_harmful: {format: builtin, path: harmful, split: val}
    val_harmless: {format: builtin, path: harmless, split: val}
    xstest: {format: builtin, path: xstest, limit: 64}
    harmbench: {format: builtin, path: harmful, split: test, limit: 8}
train:
  max_steps: 2
  batch_size: 4
  max_length: 256
  zero_stage: 2
  num_gpus: 1
  helpful_max_new_tokens: 32
r2d2:
  behaviours: []
  targets: []
  pool_size: 8
  updates_per_step: 2
  gcg_steps: 2
  search_width: 64
  topk: 64
attacks: {enabled: false}
validate: {enabled: false}
utility_shift: {enabled: false}
generate: {batch_size: 32, max_new_tokens: 64, backend: $1}
carrier: {filter_prompts: false}
YAML
}

run() {  # $1 = folder, $2 = backend, rest = targets
    local name="$1" dir="$WORK/$1" backend="$2"
    shift 2
    mkdir -p "$dir"
    config "$backend" > "$dir/config.yaml"
    # --forceall: a rerun measures again instead of finding everything up to date.
    snakemake --snakefile "$REPO/Snakefile" --directory "$dir" --configfile "$dir/config.yaml" \
        --cores 8 --resources gpu=1 --forceall "${DRY[@]}" "$@" > "$dir/snakemake.log" 2>&1 ||
        { tail -40 "$dir/snakemake.log" >&2; echo "gpu_smoke: $name failed ($dir)" >&2; exit 1; }
}

seconds() {  # Snakemake's benchmark TSV of one job: its wall seconds
    awk 'NR == 2 { printf "%.1f", $1 }' "$1"
}

t0=$SECONDS
GEN=results/base/step-000000/generations/xstest.parquet
run hf hf "$GEN" results/r2d2/checkpoints/step-000002 \
    results/base/step-000000/directions.parquet results/base/step-000000/carriers.parquet
if [[ ${#DRY[@]} -gt 0 ]]; then
    grep -A30 "^Job stats" "$WORK/hf/snakemake.log" | sed -n '1,30p'
    echo "gpu_smoke: dry run ok ($WORK)"
    exit 0
fi
tps() {
    python -c "import sys; from rgeom.io import read_table; t = read_table(sys.argv[1]); \
c = t.column('tokens_per_s').to_pylist(); print(f'{sum(c) / max(len(c), 1):.0f}')" "$1"
}
B="$WORK/hf/results/benchmarks"
echo "generate_hf        $(seconds "$B"/generate/base-000000-xstest.tsv) s, $(tps "$WORK/hf/$GEN") tokens/s (64 prompts x 64 tokens, bf16)"
if python -c "import vllm" 2> /dev/null; then
    run vllm vllm "$GEN"
    V="$WORK/vllm/results/benchmarks"
    echo "generate_vllm      $(seconds "$V"/generate/base-000000-xstest.tsv) s, $(tps "$WORK/vllm/$GEN") tokens/s"
else
    echo "generate_vllm      skipped (vllm not installed: pip install -e .[vllm])"
fi
echo "train_r2d2_zero2   $(seconds "$B"/train/r2d2-000002.tsv) s (2 steps, DeepSpeed ZeRO-2, 1 GPU)"
echo "extract            $(seconds "$B"/extract_activations/base-000000.tsv) s"
echo "carriers           $(seconds "$B"/carriers/base-000000.tsv) s"
echo "total              $((SECONDS - t0)) s (limit 480)"
