#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# 2-core machines: one OpenMP thread per process avoids oversubscription stalls.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# One pytest worker per core, at most 4 (pytest-xdist; every test writes under its own tmp_path and servers take
# free ports). PYTEST_WORKERS=0 runs in one process, e.g. to debug with -x or pdb.
# (GNU nproc honours OMP_NUM_THREADS, set to 1 above: count the cores without it)
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)"
workers="${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec .venv/bin/python -m pytest -q -n "$workers" --durations=15 "$@"
