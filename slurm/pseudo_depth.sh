#!/bin/bash
# Depth-Anything-V2 pseudo-depth shards (data_prep/pseudo_depth.py) on SLURM: an array job, one GPU per task.
#
#   sbatch --array=0-3 slurm/pseudo_depth.sh --source mvtec_ad --root /data/mvtec_ad --out /shared/shards
#   sbatch --array=0-7 slurm/pseudo_depth.sh --source visa --root /data/visa --out /shared/shards \
#       --visa-split-csv /data/visa/split_csv/1cls.csv
#
# Task k of an array of N tasks converts part k of N (--num-parts N --part k) of the selected images:
# parts are disjoint slices of one fixed shuffle, written as separate shard sequences of the same
# source and merged into OUT/manifest.json under a lock, so all tasks may share --out. The array runs
# over parts, not categories: the category selection is a conversion parameter of the source, and
# tasks with different selections of one source would replace each other's shards. To convert a
# subset, pass the same --categories to every task. Several sources (mvtec_ad, visa, ...) are
# separate array jobs into the same --out.
#
# Preemption / node failure: the job is requeued (--requeue) and each part resumes after its last
# complete shard. Rerunning a finished part is a no-op.
#
# Environment knobs: PYTHON (default <repo>/.venv/bin/python, else python3); NUM_PARTS / PART to
# override the array-derived values; DRY_RUN=1 prints the command instead of running it.
#
#SBATCH --job-name=pseudo_depth
#SBATCH --array=0-3                # one task per part: --array=0-(N-1) splits the images into N parts
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1          # Depth-Anything-V2 inference: one GPU per task
#SBATCH --cpus-per-task=8          # image decoding workers (pass --workers 7 to use them)
#SBATCH --mem=32G
#SBATCH --time=06:00:00
##SBATCH --partition=gpu           # cluster-specific
#SBATCH --requeue                  # requeue on preemption / node failure; parts resume
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out      # %A array job id, %a task id

set -euo pipefail
REPO=${DINODEPTH_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# Part index relative to the first task id, so --array=1-4 works as well as --array=0-3.
NUM_PARTS=${NUM_PARTS:-${SLURM_ARRAY_TASK_COUNT:-1}}
PART=${PART:-$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))}
if (( PART < 0 || PART >= NUM_PARTS )); then
    echo "part $PART is outside [0, $NUM_PARTS): use a contiguous --array=0-(N-1)" >&2
    exit 2
fi

cmd=("$PYTHON" data_prep/pseudo_depth.py "$@" --num-parts "$NUM_PARTS" --part "$PART" --no-progress)
echo "$(date -Is) job ${SLURM_JOB_ID:-?} on $(hostname): part $PART of $NUM_PARTS"
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
