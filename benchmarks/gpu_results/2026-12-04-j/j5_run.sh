#!/usr/bin/env bash
# Run j5 (2026-12-04): the GPU tests after the capture test's fix, and the SmolLM2 shape's 4,000 requests twice more.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_piecewise.py \
  tests/platforms/cuda/test_cuda_runner.py tests/attention_backends/triton/test_triton_attention.py \
  -k "piecewise or graphs or conformance or async" > $OUT/j5_tests.log 2>&1; tail -3 $OUT/j5_tests.log
OUT=$OUT timeout 110 python3 benchmarks/gpu_offline.py --shape smollm2 --n 4000 --variants async,async \
  > $OUT/j5_smollm2_4000.log 2>&1
grep -E "^RESULT|Error" $OUT/j5_smollm2_4000.log | cut -c1-330
