#!/usr/bin/env bash
# cdmpi GPU check, under 5 minutes on one GPU:
#   1. the test suite with its device tests on CUDA (CDMPI_TEST_DEVICE=cuda);
#   2. sign-packing throughput against a device-to-device copy of the same size;
#   3. 200 steps of ResNet-18 on CIFAR-shaped synthetic data, 1 server + 2 workers sharing the GPU,
#      reporting steps per second and bytes per step;
#   4. one epoch of the same with comm.topology = "sharded" (the workers exchange slices on the GPU).
# Usage: bench/gpu_check.sh [OUT_DIR]      (default results/gpu; everything printed also goes to OUT_DIR/log.txt)
# Overrides: PYTHON=python3  MPIEXEC=<next to PYTHON, else on PATH>  CUDA_AWARE=auto|true|false
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v "${PYTHON:-python3}")  # absolute: mpiexec may search another PATH
OUT=${1:-results/gpu}
CUDA_AWARE=${CUDA_AWARE:-auto}
if [[ -z "${MPIEXEC:-}" ]]; then
    MPIEXEC="$(dirname "$(command -v "$PYTHON")")/mpiexec"
    [[ -x "$MPIEXEC" ]] || MPIEXEC=$(command -v mpiexec || true)
fi
[[ -n "$MPIEXEC" && -x "$MPIEXEC" ]] || { echo "gpu_check: no mpiexec found; set MPIEXEC" >&2; exit 2; }
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: torch sees no CUDA device" >&2; exit 2; }
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "== gpu_check $(date -u +%FT%TZ), commit ${CDMPI_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import torch, mpi4py; from mpi4py import MPI; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| mpi4py', mpi4py.__version__, '|', MPI.Get_library_version().splitlines()[0])"

echo "== 1. tests, device tests on CUDA"
status=0
CDMPI_TEST_DEVICE=cuda timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests || status=$?

echo "== 2. sign packing vs device-to-device copy"
timeout 60 "$PYTHON" bench/pack_throughput.py cuda || status=$?

echo "== 3. ResNet-18, 200 steps, 1 server + 2 workers on one GPU (comm.cuda_aware=$CUDA_AWARE)"
timeout 240 "$MPIEXEC" -n 3 "$PYTHON" -m cdmpi train bench/resnet18_synthetic.toml --quiet --overwrite \
    --set "comm.cuda_aware=\"$CUDA_AWARE\"" --out "$OUT/resnet18_synthetic.h5"
"$PYTHON" - "$OUT/resnet18_synthetic.h5" <<'PY'
import sys, json
from cdmpi import metrics
r = metrics.read(sys.argv[1])
t, a = r["train"], r["attrs"]
steps = int(t["step"][-1])
# steps/s over the steps after the first logged row (excludes start-up and CUDA warm-up)
first = 1
rate = (t["step"][-1] - t["step"][first]) / (t["wall_time"][-1] - t["wall_time"][first])
print(f"steps {steps}, d {a['dim']}, devices and paths {json.loads(a['comm_paths'])}")
print(f"steps/s {rate:.2f} (steps {int(t['step'][first])}..{steps}); wall {t['wall_time'][-1]:.1f} s in all")
print(f"bytes/step: up {t['bits_up'][-1] / 8 / steps:.0f} (all workers), down {t['bits_down'][-1] / 8 / steps:.0f} "
      f"(all workers); fp32 gradients would be {4 * a['dim'] * a['n_workers']} each way")
print(f"train loss {t['loss'][0]:.4f} -> {t['loss'][-1]:.4f}; test accuracy {r['eval']['accuracy'].tolist()}")
PY
echo "== 4. the sharded topology on the GPU: ResNet-18, 1 epoch (50 steps), Alltoallv + Allgatherv of slices"
timeout 180 "$MPIEXEC" -n 3 "$PYTHON" -m cdmpi train bench/resnet18_synthetic.toml --quiet --overwrite \
    --set "comm.cuda_aware=\"$CUDA_AWARE\"" --set 'comm.topology="sharded"' --set run.epochs=1 \
    --out "$OUT/resnet18_sharded.h5" || status=$?
"$PYTHON" -c "import sys; from cdmpi import metrics; r = metrics.read(sys.argv[1]); t = r['train']
print('sharded:', r['attrs']['comm_path'], 'steps', int(t['step'][-1]), 'loss', round(float(t['loss'][0]), 4), '->',
      round(float(t['loss'][-1]), 4), 'inbound bytes/step per rank', r['comm']['inbound_nbytes_per_step'].tolist())" \
    "$OUT/resnet18_sharded.h5" || status=$?
echo "== gpu_check done (status $status: nonzero when the tests, the packing benchmark or the sharded run failed)"
exit $status
