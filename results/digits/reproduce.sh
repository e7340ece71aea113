#!/usr/bin/env bash
# Regenerates results/digits/{accuracy.png,table.md}: six runs of configs/digits/small_cnn.toml
# (in-process backend, which is bit-identical to MPI), then the figure. About 1 to 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-runs/digits}
mkdir -p "$RUNS"; rm -f "$RUNS"/*.h5  # a stale run would join the figure
# name:algorithm:compressor:lr:nu:topology. 1-bit Adam runs twice: with the common nu = 1e-8, with which it
# diverges a few steps after its variance is frozen, and with nu = 1e-4. CD-Adam also runs with the sharded
# server (one scale per slice of the vector).
for spec in cdadam:cdadam:scaled_sign:0.001:1e-8:star amsgrad:amsgrad:identity:0.001:1e-8:star \
            onebit-adam:onebit-adam:scaled_sign:0.001:1e-8:star \
            onebit-adam_nu1e-4:onebit-adam:scaled_sign:0.001:1e-4:star \
            ef21:ef21:topk:0.1:1e-8:star cdadam_sharded:cdadam:scaled_sign:0.001:1e-8:sharded; do
    IFS=: read -r name algorithm compressor lr nu topology <<< "$spec"
    status=0
    "$BIN/cdmpi" train configs/digits/small_cnn.toml --backend local --quiet --overwrite \
        --set optim.algorithm="\"$algorithm\"" --set compress.name="\"$compressor\"" --set optim.lr=$lr --set optim.nu=$nu \
        --set comm.topology="\"$topology\"" --out "$RUNS/$name.h5" || status=$?
    # A diverging run stops with exit 1 at its first non-finite gradient; its rows up to there are kept
    # and the table marks where it stopped. Any other failure ends the script.
    if [[ $status != 0 && ! ( $status == 1 && -f "$RUNS/$name.h5" ) ]]; then exit "$status"; fi
done
"$BIN/python" results/digits/figure.py "$RUNS" results/digits
