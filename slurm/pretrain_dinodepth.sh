#!/bin/bash
# DINO-Depth pretraining on SLURM: one task per GPU, torch.distributed (NCCL) over env:// variables.
#
#   sbatch slurm/pretrain_dinodepth.sh --config configs/pretrain/dinodepth_vits14.yaml \
#       train.output_dir=/shared/runs/vits14 data.shards=[/shared/shards]
#
# Everything after the script name goes to `python -m pretrain.train` (same entry point as torchrun and
# pretrain/launch.py). sbatch options on the command line override the #SBATCH lines below, e.g.
#   sbatch --nodes=4 --partition=gpu --time=24:00:00 slurm/pretrain_dinodepth.sh --config ...
# Keep --ntasks-per-node equal to --gpus-per-node (one process per GPU). The global batch is
# train.batch_size_per_gpu × nodes × GPUs per node; the lr follows optim.scaling_rule on it.
#
# Time limit and preemption: SLURM sends SIGUSR1 to every task 120 s before the time limit
# (--signal); a preemption with a grace time (or `scancel --signal=TERM <job>`) sends SIGTERM to every
# task. (Not `scancel --full --signal=TERM`: it also signals srun, which then ends the step with
# SIGKILL before the checkpoint is written; seen on SLURM 22.05, tests/test_slurm_real.py.) The
# trainer finishes its iteration, all ranks agree, rank 0 writes the checkpoint of that iteration, and
# every task exits with status 75. This script then requeues the job (scontrol requeue; --requeue
# allows it) and the next start resumes from the newest checkpoint in train.output_dir. Other exit statuses of the trainer:
# 0 finished, 1 config/checkpoint error, 2 non-finite loss, 3 distributed failure (a rank died or a
# collective timed out after dist.timeout_s) -- none of them is requeued. The step's status is the
# highest of its tasks', so a rank killed by a signal (the OOM killer) ends the job with 128 + signal
# (137), not requeued either.
#
# Environment knobs: PYTHON (interpreter, default <repo>/.venv/bin/python, else python3),
# MAX_REQUEUES (default 30: requeues allowed before giving up), MASTER_PORT (default from the job id).
#
#SBATCH --job-name=dinodepth
#SBATCH --nodes=1                  # nodes; scale out with sbatch --nodes=N
#SBATCH --ntasks-per-node=8        # one training process per GPU: keep equal to --gpus-per-node
#SBATCH --gpus-per-node=8          # GPUs per node (older clusters: --gres=gpu:8)
#SBATCH --cpus-per-task=10         # per GPU process: train.num_workers (8) loader workers + 2
#SBATCH --mem=0                    # all memory of the node (the loaders and pinned buffers need it)
#SBATCH --time=2-00:00:00          # 48 h; the job requeues itself until training is done
##SBATCH --partition=gpu           # cluster-specific: set it here or with sbatch --partition=...
##SBATCH --account=myproject       # idem for --account / --qos / --constraint
#SBATCH --signal=USR1@120          # SIGUSR1 to every task 120 s before the time limit: checkpoint + exit 75
#SBATCH --requeue                  # allow `scontrol requeue` (and requeue on node failure)
#SBATCH --open-mode=append         # a requeued job appends to the same log files
#SBATCH --output=%x-%j.out         # %x job name, %j job id (unchanged across requeues)
#SBATCH --error=%x-%j.err

set -uo pipefail  # not -e: the training step's exit status decides what happens next

REQUEUE_EXIT=75
MAX_REQUEUES=${MAX_REQUEUES:-30}
REPO=${DINODEPTH_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO" || exit 1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON

# Rendezvous: the first node of the allocation hosts the TCP store; the port depends on the job id so
# jobs sharing a node do not collide (the same rule as shared/distributed.py).
NODELIST=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}
if command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$NODELIST" 2>/dev/null | head -n 1)
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then  # no scontrol (containers): the same expansion in Python
    MASTER_ADDR=$("$PYTHON" -c 'import sys; from shared.distributed import expand_slurm_nodelist as e; print(e(sys.argv[1])[0])' "$NODELIST")
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export WORLD_SIZE=${SLURM_NTASKS:-1}
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective aborts, no hang
# SLURM 22.05 to 23.02: srun no longer reads --cpus-per-task from the batch allocation, so every task
# would get one CPU (one core for the loader workers under task/cgroup); SRUN_CPUS_PER_TASK restores it.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

echo "$(date -Is) job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES:-1} node(s) [$NODELIST]," \
     "world size $WORLD_SIZE, rendezvous $MASTER_ADDR:$MASTER_PORT"

# Should the batch shell get SIGTERM too (scancel --batch, a site's preemption script): note it and keep
# waiting for the tasks (a trapped signal does not kill bash; the trap runs after srun returns).
trap 'echo "$(date -Is) batch shell: SIGTERM received, waiting for the training tasks to checkpoint"' TERM

# One task per GPU. RANK / LOCAL_RANK are per task, hence set inside the task from SLURM_PROCID /
# SLURM_LOCALID. Ranks leave together (the trainer ends with a barrier after rank 0's last write), so
# --wait=60 only matters when a rank died: srun then ends the others after 60 s instead of letting
# them wait for the collective timeout. Not --kill-on-bad-exit: on preemption every rank exits with
# 75 and a task killed by srun would turn the step status into 128+9, hiding the requeue request.
srun --kill-on-bad-exit=0 --wait=60 --cpu-bind=none \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID
             export LOCAL_WORLD_SIZE=$(( ${SLURM_NTASKS:-1} / ${SLURM_NNODES:-1} ))
             exec "$PYTHON" -m pretrain.train "$@"' pretrain_dinodepth "$@"
status=$?

if [[ $status -eq $REQUEUE_EXIT ]]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts >= MAX_REQUEUES )); then
        echo "$(date -Is) checkpoint written, but the job was already requeued $restarts times (MAX_REQUEUES): not requeueing"
        exit "$REQUEUE_EXIT"
    fi
    echo "$(date -Is) checkpoint written (status $status): requeueing job ${SLURM_JOB_ID:-?}"
    if scontrol requeue "${SLURM_JOB_ID:?SLURM_JOB_ID is not set}"; then
        exit 0
    fi
    echo "$(date -Is) scontrol requeue failed: resubmit this script to resume from the checkpoint" >&2
fi
echo "$(date -Is) training step ended with status $status"
exit "$status"
