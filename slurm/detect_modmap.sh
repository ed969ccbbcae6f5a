#!/bin/bash
# ModMap multiview detection (detect/run.py) on SLURM: one GPU per task, optionally an array over classes.
#
# One job for every class (sequentially):
#   sbatch slurm/detect_modmap.sh --config configs/detect/paper.yaml --ckpt /shared/dinodepth.pth \
#       --data /data/sim3d --out /shared/runs/detect
# One array task per class, then the results table over all classes once they are done:
#   CLASSES=plastic_stool,wooden_stool,... sbatch --array=0-7 slurm/detect_modmap.sh --config ... --out OUT
#   CLASSES=plastic_stool,wooden_stool,... sbatch --dependency=afterok:<array job id> \
#       slurm/detect_modmap.sh --mode evaluate --config ... --out OUT
#
# Array task k runs class k of the comma-separated CLASSES (--classes <class>); each class writes its
# own OUT/<setup>/<class>/ folder, so tasks share --out. The per-task results table only lists its
# own class: the `--mode evaluate` job rebuilds OUT/results.{md,csv,json} from the saved predictions
# of every class. Without an array, CLASSES (if set) is passed as --classes to the single task.
# Array tasks run with --skip-finished: a re-submitted array skips each class whose folder holds
# finished.json under the same settings (written last, so a killed task's class is redone) and
# rewrites nothing when its class is finished (SKIP_FINISHED=0 recomputes).
#
# Environment knobs: PYTHON (default <repo>/.venv/bin/python, else python3); CLASSES; SKIP_FINISHED;
# DRY_RUN=1 prints the command instead of running it.
#
#SBATCH --job-name=detect_modmap
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1          # encoders + mapping networks: one GPU
#SBATCH --cpus-per-task=8          # data loading / metric computation
#SBATCH --mem=64G                  # anomaly volumes of the test instances are held in memory
#SBATCH --time=12:00:00
##SBATCH --partition=gpu           # cluster-specific
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out      # %A job (array) id, %a task id

set -euo pipefail
REPO=${DINODEPTH_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

class_args=()
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    if [[ -z "${CLASSES:-}" ]]; then
        echo "array job without CLASSES: set CLASSES=a,b,c (one class per array task)" >&2
        exit 2
    fi
    IFS=',' read -r -a class_list <<< "$CLASSES"
    index=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} ))
    if (( index < 0 || index >= ${#class_list[@]} )); then
        echo "array task $SLURM_ARRAY_TASK_ID has no class: CLASSES has ${#class_list[@]} entries ($CLASSES)" >&2
        exit 2
    fi
    class_args=(--classes "${class_list[$index]}")
    if [[ "${SKIP_FINISHED:-1}" != 0 ]]; then class_args+=(--skip-finished); fi
elif [[ -n "${CLASSES:-}" ]]; then
    class_args=(--classes "$CLASSES")
fi

cmd=("$PYTHON" detect/run.py "$@" "${class_args[@]}" --no-progress)
echo "$(date -Is) job ${SLURM_JOB_ID:-?} on $(hostname): ${class_args[*]:-all classes}"
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
