#!/usr/bin/env bash
# Regenerates results/digits/{accuracy.png,table.md}: four runs of configs/digits/small_cnn.toml
# (in-process backend, which is bit-identical to MPI), then the figure. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-runs/digits}
mkdir -p "$RUNS"; rm -f "$RUNS"/*.h5  # a stale run would join the figure
# name:algorithm:compressor:lr:nu. 1-bit Adam runs twice: with the common nu = 1e-8, with which it diverges
# a few steps after its variance is frozen, and with nu = 1e-4.
for spec in cdadam:cdadam:scaled_sign:0.001:1e-8 amsgrad:amsgrad:identity:0.001:1e-8 \
            onebit-adam:onebit-adam:scaled_sign:0.001:1e-8 onebit-adam_nu1e-4:onebit-adam:scaled_sign:0.001:1e-4 \
            ef21:ef21:topk:0.1:1e-8; do
    IFS=: read -r name algorithm compressor lr nu <<< "$spec"
    "$BIN/cdmpi" train configs/digits/small_cnn.toml --backend local --quiet --overwrite \
        --set optim.algorithm="\"$algorithm\"" --set compress.name="\"$compressor\"" --set optim.lr=$lr --set optim.nu=$nu \
        --out "$RUNS/$name.h5"
done
"$BIN/python" results/digits/figure.py "$RUNS" results/digits
