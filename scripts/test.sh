#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# 2-core machines: one OpenMP thread per process avoids oversubscription stalls.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q --durations=15 "$@"
