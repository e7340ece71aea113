#!/usr/bin/env bash
# Submits all of the paper's Section 7.1 to SLURM: nonconvex logistic regression on phishing, mushrooms,
# a9a and w8a with n = 20 workers, every method over the paper's step-size grid 0.001, 0.003, ..., 0.009,
# as one job array of slurm/sweep.sbatch (4 datasets x 4 methods x 5 step sizes = 80 runs by default).
#
#   slurm/reproduce_logreg.sh                     # writes OUT_DIR/grid.txt, then sbatch --array
#   DRY_RUN=1 slurm/reproduce_logreg.sh           # writes the grid, prints the sbatch command only
#   DATASETS="a9a w8a" STEPS=2000 slurm/reproduce_logreg.sh
#
# Environment:
#   DATASETS     (phishing mushrooms a9a w8a)
#   ALGORITHMS   (cdadam amsgrad amsgrad-ef amsgrad-naive); amsgrad runs uncompressed (compress.name=identity)
#   LRS          (0.001 0.003 0.005 0.007 0.009)
#   WORKERS      (20)             STEPS  iterations T, the same for every method (the configs' run.steps)
#   OUT_DIR      grid, results, logs and checkpoints (runs/logreg-slurm)
#   MAX_PARALLEL at most this many array tasks at once (8)
#   TIME         per-task time limit (02:00:00)      SBATCH_ARGS  more sbatch options ("")
#   and everything sweep.sbatch / train.sbatch take (PYTHON, LAUNCHER, MPI_PLUGIN, RESUME, ...).
# Afterwards: cdmpi report OUT_DIR/*/*.h5
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/{/^#SBATCH/{p;d};/^#/s/^# \{0,1\}//p}' "$0"; exit 0; fi

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    echo "reproduce_logreg.sh: this submits jobs; run it on a login node, not inside job $SLURM_JOB_ID" >&2
    exit 2
fi
DRY_RUN=${DRY_RUN:-0}
if [[ $DRY_RUN != 1 ]] && ! command -v sbatch >/dev/null; then
    echo "reproduce_logreg.sh: sbatch not found: this script submits to SLURM (DRY_RUN=1 prints the submission;" >&2
    echo "  without SLURM run the configs in configs/logreg/ with mpiexec -n 21 cdmpi train CONFIG)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."

DATASETS=${DATASETS:-phishing mushrooms a9a w8a}
ALGORITHMS=${ALGORITHMS:-cdadam amsgrad amsgrad-ef amsgrad-naive}
LRS=${LRS:-0.001 0.003 0.005 0.007 0.009}
WORKERS=${WORKERS:-20}
STEPS=${STEPS:-}
OUT_DIR=${OUT_DIR:-runs/logreg-slurm}
MAX_PARALLEL=${MAX_PARALLEL:-8}
TIME=${TIME:-02:00:00}
SBATCH_ARGS=${SBATCH_ARGS:-}

mkdir -p "$OUT_DIR"
grid=$OUT_DIR/grid.txt
{
    echo "# Section 7.1 grid, written by slurm/reproduce_logreg.sh: ALGORITHM LR DATASET [KEY=VALUE ...]"
    for dataset in $DATASETS; do
        for algorithm in $ALGORITHMS; do
            extra=""
            [[ $algorithm == amsgrad ]] && extra="compress.name=identity"
            for lr in $LRS; do echo "$algorithm $lr $dataset $extra"; done
        done
    done
} > "$grid"
runs=$(grep -cvE '^[[:space:]]*(#|$)' "$grid")

# shellcheck disable=SC2206  # SBATCH_ARGS is a list of options
cmd=(sbatch --array="1-$runs%$MAX_PARALLEL" --ntasks=$((WORKERS + 1)) --time="$TIME"
     --job-name=cdmpi-logreg --output="$OUT_DIR/%x-%A_%a.out" $SBATCH_ARGS slurm/sweep.sbatch)
export GRID=$grid OUT_DIR WORKERS CONFIG="configs/logreg/{dataset}.toml" SET="${STEPS:+run.steps=$STEPS} ${SET:-}"
echo "reproduce_logreg.sh: $runs runs in $grid; results in $OUT_DIR/<dataset>/<algorithm>-lr<lr>.h5"
if [[ $DRY_RUN == 1 ]]; then
    echo "GRID=$GRID OUT_DIR=$OUT_DIR WORKERS=$WORKERS CONFIG=$CONFIG SET='$SET' ${cmd[*]}"
else
    "${cmd[@]}"
fi
