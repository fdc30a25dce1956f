#!/usr/bin/env bash
# Run the benchmarks at full size (meant for a GPU machine) from the repository root.
#
#   benchmarks/run_all.sh                      # every stage
#   benchmarks/run_all.sh purifier train       # some stages: purifier compile e2e io train experiments
#   BENCH_OUT=/tmp/r PYTHON=python3 benchmarks/run_all.sh
#   QUICK=1 benchmarks/run_all.sh              # the --quick smoke versions (CPU, seconds)
#
# A failing stage does not stop the others; the exit status is non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${BENCH_OUT:-benchmarks/results}
QUICK_FLAG=${QUICK:+--quick}
export PYTHONUNBUFFERED=1
# the settings that the compile and experiments stages compare (quick: the --quick defaults)
FAST=(--presets paper,small --steps 100,10 --batch-sizes 256 --precisions bf16)
[ -n "$QUICK_FLAG" ] && FAST=()

# Without a git checkout (the device machine gets a copy of the tree), take the commit recorded
# beside the carried data: git rev-parse HEAD > carry/git-commit (see benchmarks/device_run.md).
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -f carry/git-commit ]; then
    export BENCH_GIT_COMMIT=$(cat carry/git-commit)
    [ -f carry/git-dirty ] && export BENCH_GIT_DIRTY=$(cat carry/git-dirty)
fi

run() {
    echo "=== $* ==="
    "$PY" -m "$@" $QUICK_FLAG --out "$OUT" || { echo "FAILED: $*"; failed+=("$1"); }
}

failed=()
for stage in ${*:-purifier compile e2e io train}; do
    case $stage in
        purifier) run benchmarks.bench_purifier --baseline ;;
        compile)  run benchmarks.bench_purifier "${FAST[@]}" --compile ;;
        experiments)  # what the library could gain: cuDNN autotuning, channels_last, CUDA graphs
                  run benchmarks.bench_purifier "${FAST[@]}" --cudnn-benchmark
                  run benchmarks.bench_purifier "${FAST[@]}" --cudnn-benchmark --channels-last
                  run benchmarks.bench_purifier "${FAST[@]}" --compile --compile-mode reduce-overhead ;;
        e2e)      run benchmarks.bench_end_to_end ;;
        io)       run benchmarks.bench_io ;;
        train)    run benchmarks.bench_train ;;
        *) echo "unknown stage $stage (purifier compile e2e io train experiments)"; failed+=("$stage") ;;
    esac
done
[ ${#failed[@]} -eq 0 ] || { echo "failed stages: ${failed[*]}"; exit 1; }
