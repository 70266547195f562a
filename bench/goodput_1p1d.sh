#!/usr/bin/env bash
# The serving comparison on a host with >= 2 GPUs: 1P1D (prefill on cuda:0, decode on cuda:1, KV over
# cuda_ipc) against two colocated engines (one per GPU, no prefill instance), the same model and the
# same seeded workload, goodput under a TTFT + TPOT SLO swept over the request rate. The two systems
# take the same GPUs, so they run one after the other; the sweeps are then merged (ratio at the knee).
# Model: Qwen3-8B's shape with dummy weights (config + tokenizer only, nothing written to disk).
# Usage: [SYSTEMS="1p1d colocated"] bash bench/goodput_1p1d.sh [goodput_sweep.py args, e.g. --rates 2,4,8]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-runs}/goodput"; mkdir -p "$OUT"
MODEL="${MODEL:-/tmp/qwen3-8b-shape}"
if [ ! -f "$MODEL/config.json" ]; then
  python3 -m pdserve make-model "$MODEL" --layers 36 --hidden 4096 --intermediate 12288 --heads 32 \
    --kv-heads 8 --head-dim 128 --dtype bfloat16 --max-position-embeddings 8192 --no-weights || exit
fi
COMMON=(--model "$MODEL" --load-format dummy --dtype bfloat16 --attention-backend triton --max-model-len 4096
        --gpu-memory-utilization 0.85)
SWEEP=(--rates 4,8,16,32 --slo-ttft-ms 500 --slo-tpot-ms 40 --num-requests 400 --warmup-requests 8
       --max-duration-s 20 --input-len-min 256 --input-len-max 2048 --output-len-min 64 --output-len-max 256 "$@")

run_system() {  # name port [pdserve up args...]: start, wait for "up" (bounded), sweep, stop
  local name=$1 port=$2; shift 2
  python3 -m pdserve up "${COMMON[@]}" --port "$port" --grpc-port $((port + 1)) "$@" >"$OUT/$name.up.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do
    grep -q '"status": "up"' "$OUT/$name.up.log" && break
    if ! kill -0 "$pid" 2>/dev/null; then echo "$name did not start:"; tail -40 "$OUT/$name.up.log"; return 1; fi
    sleep 1
  done
  grep -q '"status": "up"' "$OUT/$name.up.log" || { echo "$name: not up within 300 s"; kill -INT "$pid"; wait "$pid"; return 1; }
  python3 -m pdserve goodput --target "$name=http://127.0.0.1:$port" "${SWEEP[@]}" --out-dir "$OUT/$name"
  local rc=$?
  kill -INT "$pid"; wait "$pid"
  return $rc
}

# Colocated twice: prefill first (stalls running requests during prefills) and mixed batches (vLLM's
# chunked-prefill scheduling), so 1P1D is measured against the better of the two. SYSTEMS picks a
# subset (three systems may not fit one 10-minute device call); the merge takes every sweep on disk.
rc=0
for system in ${SYSTEMS:-1p1d colocated colocated-mixed}; do
  case "$system" in
    1p1d) run_system 1p1d 8100 --prefill-device cuda:0 --decode-device cuda:1 --kv-backend cuda_ipc ;;
    colocated) run_system colocated 8200 --num-prefill 0 --num-decode 2 --decode-device cuda:0,cuda:1 ;;
    colocated-mixed) run_system colocated-mixed 8300 --num-prefill 0 --num-decode 2 \
                       --decode-device cuda:0,cuda:1 --mixed-batches ;;
    *) echo "unknown system $system"; false ;;
  esac || rc=1
done
sweeps=("$OUT"/*/goodput_sweep.json)
[ -e "${sweeps[0]}" ] && python3 -m pdserve goodput --merge "${sweeps[@]}" --out-dir "$OUT" | tee "$OUT/merged.txt"
exit $rc
