#!/usr/bin/env bash
# Submits all of the paper's Section 7.2 to SLURM: ResNet-18, VGG-16 and WideResNet-16-4 on CIFAR-10
# with CD-Adam, EF21, 1-bit Adam and AMSGrad, 8 GPU workers each: one slurm/train.sbatch job per
# configs/cifar10/<model>_<algorithm>.toml (12 jobs by default), each resuming itself across time limits.
#
#   slurm/reproduce_cifar10.sh
#   DRY_RUN=1 slurm/reproduce_cifar10.sh           # print the sbatch commands only
#   MODELS=resnet18 GPUS_PER_TASK=0 SBATCH_ARGS="--gres=gpu:8 --partition=gpu" slurm/reproduce_cifar10.sh
#
# Environment:
#   MODELS         (resnet18 vgg16 wrn16_4)
#   ALGORITHMS     (cdadam ef21 onebit_adam amsgrad)
#   WORKERS        (8; the configs' n)        GPUS_PER_TASK  --gpus-per-task, 0 leaves it out (1)
#   CPUS_PER_TASK  data loading and the server's work (4)
#   TIME           per-job time limit; longer runs requeue and resume (24:00:00)
#   OUT_DIR        results, logs and checkpoints (runs/cifar10-slurm)
#   SBATCH_ARGS    more sbatch options, e.g. --partition, --account ("")
#   and everything train.sbatch takes (PYTHON, LAUNCHER, MPI_PLUGIN, RESUME, SET, ...).
# Afterwards: cdmpi report OUT_DIR/*.h5
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/{/^#SBATCH/{p;d};/^#/s/^# \{0,1\}//p}' "$0"; exit 0; fi

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    echo "reproduce_cifar10.sh: this submits jobs; run it on a login node, not inside job $SLURM_JOB_ID" >&2
    exit 2
fi
DRY_RUN=${DRY_RUN:-0}
if [[ $DRY_RUN != 1 ]] && ! command -v sbatch >/dev/null; then
    echo "reproduce_cifar10.sh: sbatch not found: this script submits to SLURM (DRY_RUN=1 prints the submissions)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."

MODELS=${MODELS:-resnet18 vgg16 wrn16_4}
ALGORITHMS=${ALGORITHMS:-cdadam ef21 onebit_adam amsgrad}
WORKERS=${WORKERS:-8}
GPUS_PER_TASK=${GPUS_PER_TASK:-1}
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
TIME=${TIME:-24:00:00}
OUT_DIR=${OUT_DIR:-runs/cifar10-slurm}
SBATCH_ARGS=${SBATCH_ARGS:-}

configs=()
for model in $MODELS; do
    for algorithm in $ALGORITHMS; do configs+=("configs/cifar10/${model}_${algorithm}.toml"); done
done
missing=()
for config in "${configs[@]}"; do [[ -f $config ]] || missing+=("$config"); done
if (( ${#missing[@]} )); then
    echo "reproduce_cifar10.sh: config(s) not found: ${missing[*]}" >&2
    exit 2
fi

mkdir -p "$OUT_DIR"
gpus=()
(( GPUS_PER_TASK > 0 )) && gpus=(--gpus-per-task="$GPUS_PER_TASK")
export WORKERS
for config in "${configs[@]}"; do
    name=$(basename "${config%.toml}")
    # shellcheck disable=SC2206  # SBATCH_ARGS is a list of options
    cmd=(sbatch --ntasks=$((WORKERS + 1)) --cpus-per-task="$CPUS_PER_TASK" "${gpus[@]}" --time="$TIME"
         --job-name="cdmpi-$name" --output="$OUT_DIR/%x-%j.out" $SBATCH_ARGS slurm/train.sbatch)
    if [[ $DRY_RUN == 1 ]]; then
        echo "CONFIG=$config OUT=$OUT_DIR/$name.h5 ${cmd[*]}"
    else
        CONFIG=$config OUT=$OUT_DIR/$name.h5 "${cmd[@]}"
    fi
done
