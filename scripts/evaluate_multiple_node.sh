#!/usr/bin/env bash
# Evaluate on many machines, as the original's scripts/evaluate_multiple_node.sh: NUM_WORKERS nodes with
# NUM_GPUS_PER_WORKER GPUs each; each model replica spans MP_SIZE GPUs (tensor parallel) and the replicas
# share the samples (data parallel): 16 nodes x 8 GPUs at MP_SIZE 8 are 16 replicas. Arguments are those of
# scripts/evaluate.sh (task files or folders, then flags), e.g.
#   HOST_FILE_PATH=hostfile bash scripts/evaluate_multiple_node.sh tasks/bloom --checkpoint /data/glm-130b-sat \
#       --config glm-130b --data-path /data/evaluation
#
# LAUNCHER=deepspeed (default): run once, on the first node; the DeepSpeed launcher starts every process over
#   ssh (pdsh) from a hostfile of lines "hostname slots=8". This checkout and its environment must be at the
#   same path on every node.
# LAUNCHER=torchrun: run this script on every node, with MASTER_ADDR (a node every node can reach) and
#   MASTER_PORT the same everywhere; torchrun's c10d rendezvous assigns the ranks. Under Slurm:
#   srun --nodes "$NUM_WORKERS" --ntasks-per-node 1 bash scripts/evaluate_multiple_node.sh ...
set -euo pipefail
main_dir=$(dirname "$(dirname "$(realpath "$0")")")
export PYTHONPATH="${main_dir}${PYTHONPATH:+:${PYTHONPATH}}"

NUM_WORKERS=${NUM_WORKERS:-16}
NUM_GPUS_PER_WORKER=${NUM_GPUS_PER_WORKER:-8}
MP_SIZE=${MP_SIZE:-8}
HOST_FILE_PATH=${HOST_FILE_PATH:-"<your hostfile>"}
LAUNCHER=${LAUNCHER:-deepspeed}
DEVICE=${DEVICE:-cuda}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0} NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-2}
export CUDA_LAUNCH_BLOCKING=${CUDA_LAUNCH_BLOCKING:-0}

ARGS=(-m glm.evaluate --tensor-parallel-size "$MP_SIZE" --device "$DEVICE" "$@")
LOG_DIR=${LOG_DIR:-${main_dir}/logs}
mkdir -p "$LOG_DIR"
LOG="${LOG_DIR}/evaluate-multiple-node-$(date +%Y.%m.%d-%H.%M.%S)-$(hostname)-$$.log"
case "$LAUNCHER" in
    deepspeed)
        if [ ! -f "$HOST_FILE_PATH" ]; then
            echo "error: HOST_FILE_PATH=$HOST_FILE_PATH is not a file: set it to a DeepSpeed hostfile" >&2
            exit 2
        fi
        deepspeed --num_nodes "$NUM_WORKERS" --num_gpus "$NUM_GPUS_PER_WORKER" --hostfile "$HOST_FILE_PATH" \
            --module "${ARGS[@]:1}" 2>&1 | tee "$LOG"
        ;;
    torchrun)
        : "${MASTER_ADDR:?set MASTER_ADDR to a node every node can reach}"
        MASTER_PORT=${MASTER_PORT:-29500}
        python -m torch.distributed.run --nnodes "$NUM_WORKERS" --nproc-per-node "$NUM_GPUS_PER_WORKER" \
            --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
            --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-glm-evaluate}}" "${ARGS[@]}" 2>&1 | tee "$LOG"
        ;;
    *)
        echo "error: LAUNCHER=$LAUNCHER: choose deepspeed or torchrun" >&2
        exit 2
        ;;
esac
