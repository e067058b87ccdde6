#!/usr/bin/env bash
# Run n4 (2026-12-05): a process's first engine against its second, step by step (n4_cold_steps.py.txt).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT timeout 200 python3 benchmarks/gpu_results/2026-12-05-n/n4_cold_steps.py.txt > $OUT/n4_cold_steps.log 2>&1
grep -E "^RESULT|Error" $OUT/n4_cold_steps.log | cut -c1-600
