#!/usr/bin/env bash
# The multi-GPU checks (tensor and context parallelism, KV across GPUs, 1P1D) on a host with >= 2 GPUs (device kind nvidia-h200-x2), one stage a
# call (each fits the device's 10-minute limit). Results go to $OUT (or ./runs).
#   tests    the 2-GPU tests: symmetric all-reduce, TP engine (symmetric / NCCL / TBO), CP engine,
#            KV transfer backends (cuda_ipc, nccl, tcp), 1P1D services and `pdserve up` on two GPUs
#   tp       bench/tp_check.py: all-reduce latency (NCCL vs symmetric one-/two-shot), TP=2 decode
#            with and without symmetric memory and two-batch overlap at bs 64/256/512, vs TP=1
#   cp       bench/cp_check.py: cp=2 vs cp=1 prefill of 4k-32k prompts (logits, time)
#   kv       bench/kv_transfer_bench.py: tcp vs cuda_ipc vs nccl for 1k-32k-token prompts
#   kvo      bench/kv_overlap_bench.py: the transfer time TTFT still pays through the services, layer-by-
#            layer sending vs after the prefill, cuda_ipc and nccl, 1k-32k-token prompts (8B shape)
#   goodput  bench/goodput_1p1d.sh: 1P1D vs two colocated engines, goodput under an SLO
# Usage: bash bench/gpu_multi_check.sh STAGE [extra args for that stage's script]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-runs}"; mkdir -p "$OUT"
# The GPU image lacks the gRPC health/reflection packages, fastapi, uvicorn and pydantic: carry them
# as wheels in .whl/ (docs/BENCHMARKS.md, "GPU box").
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stage="${1:?usage: gpu_multi_check.sh tests|tp|cp|kv|kvo|goodput [args]}"; shift
nvidia-smi -L | tee "$OUT/gpu.txt"
case "$stage" in
  tests) timeout 560 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_symmetric_allreduce.py \
           tests/gpu/test_tp_engine_gpu.py tests/gpu/test_cp_gpu.py tests/gpu/test_kv_transfer_gpu.py \
           tests/gpu/test_services_two_gpus.py tests/gpu/test_kv_stream_gpu.py \
           tests/gpu/test_fused_kernels.py::test_ops_run_on_their_tensors_device_not_the_threads_current_one "$@" 2>&1 | tee "$OUT/multi_gpu_tests.log"; rc=${PIPESTATUS[0]} ;;
  tp) timeout 560 python3 -m bench.tp_check --tp 2 --batch 64,256,512 --out "$OUT" "$@" 2>&1 | tee "$OUT/tp_check.log"
      rc=${PIPESTATUS[0]} ;;
  cp) timeout 560 python3 -m bench.cp_check --out "$OUT" "$@" 2>&1 | tee "$OUT/cp_check.log"; rc=${PIPESTATUS[0]} ;;
  kv) timeout 560 python3 -m bench.kv_transfer_bench --backends cuda_ipc,nccl,tcp --tokens 1024,4096,16384,32768 \
        --out "$OUT" "$@" 2>&1 | tee "$OUT/kv_transfer.log"; rc=${PIPESTATUS[0]} ;;
  kvo) timeout 580 python3 -m bench.kv_overlap_bench --backends cuda_ipc,nccl --tokens 1024,4096,16384,32768 \
         --out "$OUT" "$@" 2>&1 | tee "$OUT/kv_overlap.log"; rc=${PIPESTATUS[0]} ;;
  goodput) OUT="$OUT" timeout 580 bash bench/goodput_1p1d.sh "$@"; rc=$? ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
echo "stage $stage rc=$rc"
exit "$rc"
