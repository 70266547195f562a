#!/usr/bin/env bash
# The GPU KV transfer checks alone, on a host with >= 2 GPUs: the two-process backend tests,
# 1P1D services on cuda:0/cuda:1 per backend, then the transfer benchmark. Results go to $OUT (or ./runs).
# Usage: bash bench/kv_check.sh [extra kv_transfer_bench.py args, e.g. --tokens 1024,32768]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT="${OUT:-runs}"; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then  # see gpu_check.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -m pytest tests/gpu/test_kv_transfer_gpu.py tests/gpu/test_services_two_gpus.py -v -s -p no:cacheprovider \
  2>&1 | tee "$OUT/kv_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m bench.kv_transfer_bench --out "$OUT" "$@" 2>&1 | tee "$OUT/kv_transfer.log"
bench_rc=${PIPESTATUS[0]}
echo "kv tests rc=$tests_rc kv bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
