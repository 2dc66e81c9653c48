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
# them from NNODES and NPROC_PER_NODE.
#
# Stopping: send SIGTERM or SIGUSR1 to this script. It passes the signal to the training processes of this node,
# which (PreemptionCheckpoint, on in the shipped configs) save last.ckpt at the next step boundary and exit.
# Exit status, as for `llmtrain fit` alone and the sbatch template: 0 finished; 143 (SIGTERM) or 138 (SIGUSR1)
# saved, resumable (rerun with --ckpt_path last); anything else failed.
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

# Why not `exec torchrun`: torchrun exits 1 whenever a process fails, a preempted one included, and on a SIGTERM of
# its own it gives the processes 30 s before SIGKILL, which a large save can exceed; SIGUSR1 kills it outright. So
# this script stays in front, hands signals to torchrun's children (the training processes), and turns torchrun's
# 1 back into their status when every process that failed exited 143, or every one 138 (its summary: "exitcode : N").
summary=$(mktemp)
trap 'rm -f "$summary"' EXIT
exec 3> >(tee "$summary" >&2)
tee_pid=$!
"$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" \
  -m llmtrain.cli fit "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" 2>&3 &
launcher=$!
trap "pkill -TERM -P $launcher || true" TERM
trap "pkill -USR1 -P $launcher || true" USR1
# Ctrl-C: background jobs of a script start with SIGINT ignored, so the processes are asked to save and stop instead.
trap "pkill -TERM -P $launcher || true" INT
while :; do
  status=0
  wait "$launcher" || status=$?
  kill -0 "$launcher" 2>/dev/null || break  # still running: a trapped signal only interrupted the wait
done
exec 3>&-
wait "$tee_pid" 2>/dev/null || true
if [ "$status" -ne 0 ]; then
  codes=$(sed -n 's/^ *exitcode *: *\([0-9-]*\).*/\1/p' "$summary" | sort -u)
  if [ "$codes" = 143 ] || [ "$codes" = 138 ]; then
    status=$codes
  fi
fi
exit "$status"
