#!/usr/bin/env bash
# llmtrain on machines without SLURM: run this same command on every node; torchrun starts one process per GPU and
# the nodes find each other through a c10d rendezvous at MASTER_ADDR:MASTER_PORT (node ranks are assigned there).
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0.example.org RUN_ID=llama-124m-a \
#     launch/torchrun.sh --config configs/llama-124m.yaml --trainer.logger.init_args.name llama-124m-a
#
# Environment (defaults in brackets):
#   NNODES          number of nodes [1]
#   NPROC_PER_NODE  processes per node = GPUs per node [the number of visible GPUs, else 1]
#   MASTER_ADDR     address of the rendezvous host, reachable from every node [127.0.0.1]
#   MASTER_PORT     its port [29500]
#   RUN_ID          the same string on every node of one run, different for two runs sharing MASTER_ADDR [llmtrain]
#   PYTHON          the Python that has llmtrain installed [python3]
# Arguments are passed to `llmtrain fit` (--config first); --trainer.num_nodes and --trainer.devices are set after
# them from NNODES and NPROC_PER_NODE. Stopping: SIGTERM to torchrun reaches every process; with
# --trainer.callbacks+=llmtrain.callbacks.preemption.PreemptionCheckpoint they save last.ckpt first
# (resume with --ckpt_path last).
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-llmtrain}

check_count() {
  if ! [[ "${!1}" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/torchrun.sh: $1=${!1}: must be a whole number >= 1" >&2
    exit 2
  fi
}
check_count NNODES
check_count MASTER_PORT
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
check_count NPROC_PER_NODE

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank fails the run instead of hanging the others
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" \
  -m llmtrain.cli fit "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE"
