#!/usr/bin/env bash
# Run o3 (2026-12-05): where a new process's first LLM.chat calls lose time (o3_warm_phases.py.txt).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT timeout 240 python3 benchmarks/gpu_results/2026-12-05-o/o3_warm_phases.py.txt > $OUT/o3_warm_phases.log 2>&1
grep -E "^RESULT|Error" $OUT/o3_warm_phases.log | cut -c1-900
