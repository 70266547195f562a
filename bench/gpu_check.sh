#!/usr/bin/env bash
# One command on the GPU box: GPU tests (a failure stops here), then the engine benchmark (Triton attention, decode graphs, fused
# kernels — the CUDA defaults), the offline/HF benchmark, the batch-1 GEMV benchmark, the KV transfer
# benchmark (>= 2 GPUs). Results go to $OUT (or ./runs).
# Usage: bash bench/gpu_check.sh [extra engine_bench.py args, e.g. --prefill 512 --decode-bs 1,64]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT="${OUT:-runs}"; mkdir -p "$OUT"
# The GPU image lacks grpcio-health-checking / grpcio-reflection and may hold an older protobuf than
# the stubs need (>= 7.35.1): carry them as wheels in .whl/ (see docs/BENCHMARKS.md, "GPU box").
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton, grpc, google.protobuf as pb; print("torch", torch.__version__, "triton", triton.__version__, "grpcio", grpc.__version__, "protobuf", pb.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
if [ "$tests_rc" -ne 0 ]; then  # numbers from code that fails its tests are not worth recording
  echo "gpu tests failed (rc=$tests_rc): no benchmarks run"
  exit "$tests_rc"
fi
python3 -m bench.engine_bench --attention-backend triton --cuda-graphs --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
python3 -m bench.offline_bench --out "$OUT" 2>&1 | tee "$OUT/offline.log"
offline_rc=${PIPESTATUS[0]}
python3 -m bench.gemv_bench --rows 1,2 --out "$OUT" 2>&1 | tee "$OUT/gemv.log"
gemv_rc=${PIPESTATUS[0]}
kv_rc=0
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 -m bench.kv_transfer_bench --backends cuda_ipc,nccl,tcp --out "$OUT" 2>&1 | tee "$OUT/kv_transfer.log"
  kv_rc=${PIPESTATUS[0]}
fi
echo "gpu tests rc=0 bench rc=$bench_rc offline rc=$offline_rc gemv rc=$gemv_rc kv transfer rc=$kv_rc"
exit $(( bench_rc || offline_rc || gemv_rc || kv_rc ))
