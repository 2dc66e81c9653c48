#!/usr/bin/env bash
# The loss- and value-parity checks of issues 4 and 5, run side by side on one GPU in one device call.
# Parity needs the same numbers, not exclusive use of the GPU: the jobs share it (an H200 holds them all), so
# their tokens/s are NOT throughput figures and are not reported. Each job has its own run folder and output.
#   j1  single device, ZeRO-3                (after the ZeRO-3 table and weight-decay fixes: is the 0.09 gap gone?)
#   j2  ZeRO-3 again, ZeRO-2                 (ZeRO-3's own spread, and the ZeRO-2 reference of the same call)
#   j5  stability monitor values: plain, plain again (the noise floor), ZeRO-1/2/3
# (2026-12-02's calls settled ZeRO-2's gap (noise), overlap_comm, compile scope and both resume checks:
# docs/benchmarks.md; `zero_stages.py --only ZeRO-3` / `--resume_stage 2 --resume_via universal` rerun them.)
# Usage (device call, carry [".whl", ".gpu_data"], after the wheel install line of docs/benchmarks.md):
#   bash benchmarks/parity_batch.sh .gpu_data/shards $OUT
# Writes $OUT/parity.md (every table) and $OUT/parity.tgz (tables, per-step losses, logs).
set -u
DATA=${1:?usage: parity_batch.sh DATA_DIR OUT_DIR}
OUT_DIR=${2:?usage: parity_batch.sh DATA_DIR OUT_DIR}
LIMIT=${PARITY_LIMIT_S:-510}
WORK=$(mktemp -d /tmp/parity.XXXX)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # the jobs share the memory: less fragmentation
(while sleep 15; do nvidia-smi --query-gpu=memory.used --format=csv,noheader; done) >"$WORK/gpu_mem.log" 2>&1 &
SAMPLER=$!
PIDS=()
ZS="python3 benchmarks/zero_stages.py --data_dir $DATA"

job() {  # job NAME PORT COMMAND...: its own rendezvous port and log; killed at the call's limit
  local name=$1 port=$2
  shift 2
  MASTER_PORT=$port timeout "$LIMIT" "$@" >"$WORK/$name.log" 2>&1
  echo "[parity] $name exited with $?" | tee -a "$WORK/$name.log"
}

job j1 29511 $ZS --out "$WORK/j1" --runs "$WORK/runs/j1" --only "single device" ZeRO-3 --resume_stage 0 &
PIDS+=($!)
job j2 29512 $ZS --out "$WORK/j2" --runs "$WORK/runs/j2" --only "ZeRO-3 again" ZeRO-2 --resume_stage 0 &
PIDS+=($!)
job j5 29515 python3 benchmarks/stability_overhead.py --parity --data_dir "$DATA" --vocab_size 32000 \
  --configs configs/llama-124m.yaml --steps 60 --out "$WORK/j5" &
PIDS+=($!)
wait "${PIDS[@]}"
kill "$SAMPLER"

for f in "$WORK"/j*/zero_stages.md "$WORK"/j5/stability_parity.md; do
  [ -f "$f" ] && { echo "## $f"; cat "$f"; echo; }
done | tee "$OUT_DIR/parity.md"
tail -n 3 "$WORK"/j*.log
echo "peak GPU memory used (nvidia-smi, every 15 s): $(sort -n "$WORK/gpu_mem.log" | tail -1)"
tar czf "$OUT_DIR/parity.tgz" -C "$WORK" --exclude=runs .
