#!/usr/bin/env bash
# The embedded demo's workflow, timed side by side: a baseline commit against a new one on
# the same machine, each from an empty results/, one after the other (never at once: they
# would share the cores). Prints both wall times and new / baseline.
#
#   benchmarks/bench_demo.sh                    # a3428b0 (the baseline of issue 20) vs HEAD
#   benchmarks/bench_demo.sh BASE NEW           # any two commits (or branches, tags)
#   benchmarks/bench_demo.sh -- -n              # dry run of both: checks the setup in seconds
#   benchmarks/bench_demo.sh a3428b0 HEAD -- results/config.json   # one small target
#   CORES=2 KEEP=1 WORK=/tmp/bench VENV=.venv benchmarks/bench_demo.sh ...
#
# Each commit is cloned (git clone --shared, then checked out) into $WORK/<label>/repo, with
# $WORK/<label>/shared linked to this checkout's ../shared, so data.shared_dir
# (../shared/data) resolves as in the checkout. One virtualenv serves both: the repository's
# .venv (or $VENV), with PYTHONPATH=<clone>/src in front so that every `rgeom` job imports
# the clone's package, not the one the venv installed (an editable install is a .pth path
# entry, which PYTHONPATH precedes). Both runs therefore use the same torch, transformers
# and Snakemake; only rgeom and the workflow differ.
#
# What is timed: `snakemake --cores $CORES --configfile config/config.yaml` from an empty
# results/ (model conversion included, `make demo`'s install, report and summary not), under
# `rgeom warm` for a commit that has it (src/rgeom/warm.py), as `make run` runs it.
# Arguments after `--` go to both snakemake calls (-n, a target, ...). KEEP=1 keeps $WORK.
# Timings on a shared machine are noisy: the load average before each run is printed.
set -euo pipefail

REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
BASE=a3428b0
NEW=HEAD
if [[ $# -gt 0 && $1 != -- ]]; then BASE=$1; shift; fi
if [[ $# -gt 0 && $1 != -- ]]; then NEW=$1; shift; fi
if [[ $# -gt 0 ]]; then
    [[ $1 == -- ]] || { echo "usage: $0 [BASE [NEW]] [-- SNAKEMAKE_ARGS...]" >&2; exit 2; }
    shift
fi
EXTRA=("$@")
CORES=${CORES:-2}
VENV=${VENV:-$REPO/.venv}
SHARED=${SHARED:-$(cd "$REPO/.." && pwd)/shared}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/rgeom-bench-demo.XXXXXX")}

[[ -x $VENV/bin/snakemake ]] || { echo "no snakemake in $VENV (make install, or VENV=...)" >&2; exit 1; }
[[ -d $SHARED/data ]] || { echo "no benchmark data at $SHARED/data (SHARED=...)" >&2; exit 1; }
if [[ -z ${KEEP:-} ]]; then trap 'rm -rf "$WORK"' EXIT; fi

# Resolved up front: HEAD means this checkout's HEAD, not the clone's.
BASE_SHA=$(git -C "$REPO" rev-parse --verify "$BASE^{commit}")
NEW_SHA=$(git -C "$REPO" rev-parse --verify "$NEW^{commit}")

run_one() {  # label sha -> prints seconds on the last line of stdout
    local label=$1 sha=$2 dir=$WORK/$1
    mkdir -p "$dir"
    git clone --quiet --shared --no-checkout "$REPO" "$dir/repo"
    git -C "$dir/repo" checkout --quiet "$sha"
    ln -sfn "$SHARED" "$dir/shared"
    echo "== $label ${sha:0:12}: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    local start end
    start=$(date +%s.%N)
    (
        cd "$dir/repo"
        # As `make run` runs it: behind the warm fork server where the commit has one.
        local warm=()
        [[ -f src/rgeom/warm.py ]] && warm=("$VENV/bin/python" -m rgeom.cli warm --)
        # The extra arguments first: --configfile would swallow a target after it.
        PYTHONPATH="$dir/repo/src" "${warm[@]}" "$VENV/bin/snakemake" "${EXTRA[@]}" \
            --cores "$CORES" --configfile config/config.yaml >"$dir/snakemake.log" 2>&1
    ) || { echo "$label: snakemake failed:" >&2; tail -n 40 "$dir/snakemake.log" >&2; exit 1; }
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f\n", b - a }'
}

base_s=$(run_one baseline "$BASE_SHA")
new_s=$(run_one new "$NEW_SHA")
printf 'baseline %s: %8.1f s\n' "${BASE_SHA:0:12}" "$base_s"
printf 'new      %s: %8.1f s\n' "${NEW_SHA:0:12}" "$new_s"
awk -v a="$base_s" -v b="$new_s" 'BEGIN { printf "ratio new/baseline: %.3f\n", b / a }'
[[ -n ${KEEP:-} ]] && echo "runs kept in $WORK (snakemake.log, results/benchmarks/ in each)"
exit 0
