#!/usr/bin/env bash
# Run j3 (2026-12-04): profile a one-prompt generate call on the H200 (SmolLM2 shape).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 200 python3 benchmarks/gpu_results/2026-12-04-j/j3_ttft_profile.py.txt > $OUT/j3_ttft_profile.log 2>&1
head -c 20000 $OUT/j3_ttft_profile.log | grep -v "^\s*$" | head -150
