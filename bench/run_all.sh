#!/usr/bin/env bash
# Runs the ten benchmarks one after the other and rebuilds results/bench/README.md (about 15 minutes on
# 2 cores). Usage: bench/run_all.sh  (from anywhere; uses .venv unless PYTHON and MPIEXEC are set)
#   BASELINE=DIR  also time benchmarks 6 and 8 on another cdmpi checkout (e.g. a worktree of an older commit)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec}
export PATH="$(dirname "$PYTHON"):$PATH"  # cdmpi and mpiexec of the same environment for the subprocesses
if [[ -z ${CDMPI_DATA_DIR:-} && -f ../shared/data/libsvm/MANIFEST.tsv ]]; then  # as the Makefile does
    export CDMPI_DATA_DIR=$(cd ../shared/data/libsvm && pwd)
fi
"$PYTHON" bench/compress_pack.py --reps 21
"$PYTHON" bench/server_aggregate.py --reps 11
"$PYTHON" bench/worker_step.py --reps 11
"$MPIEXEC" -n 5 "$PYTHON" bench/end_to_end.py --steps 10
"$PYTHON" bench/project_table.py
"$PYTHON" bench/local_throughput.py ${BASELINE:+--baseline "$BASELINE"}
"$PYTHON" bench/topology_scaling.py --workers 2 4 8 16 --dim 1000000 --steps 10
"$PYTHON" bench/metrics_flush.py ${BASELINE:+--baseline "$BASELINE"}
"$PYTHON" bench/watchdog_cost.py
"$PYTHON" bench/startup.py
"$PYTHON" bench/engine_phases.py
"$PYTHON" bench/collect.py
