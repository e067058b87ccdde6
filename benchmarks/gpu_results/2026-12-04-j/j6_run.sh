#!/usr/bin/env bash
# Run j6 (2026-12-04): piecewise graphs against eager on more architectures (Qwen3-MoE, Gemma 2, the transformers fallback).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_cuda_runner.py -k "piecewise" -rA \
  > $OUT/j6_tests.log 2>&1; grep -E "PASSED|FAILED|ERROR|passed|failed|Error|assert|WARNING.*piecewise" $OUT/j6_tests.log | head -40
