#!/usr/bin/env bash
# Run j1 (2026-12-04): piecewise CUDA graphs: the GPU tests, then the SmolLM2 and 8B shapes with and without them.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 170 python3 -m pytest -x -q -p no:cacheprovider tests/platforms/cuda/test_piecewise.py \
  tests/platforms/cuda/test_cuda_runner.py > $OUT/j1_tests.log 2>&1; tail -4 $OUT/j1_tests.log
OUT=$OUT timeout 170 python3 benchmarks/gpu_offline.py --shape smollm2 --n 2000 \
  --variants async,no_piecewise,async,no_piecewise > $OUT/j1_smollm2.log 2>&1
grep -E "^RESULT|Error" $OUT/j1_smollm2.log | cut -c1-420
OUT=$OUT timeout 220 python3 benchmarks/gpu_offline.py --shape llama8b --n 1000 \
  --variants async,no_piecewise > $OUT/j1_llama8b.log 2>&1
grep -E "^RESULT|Error" $OUT/j1_llama8b.log | cut -c1-420
