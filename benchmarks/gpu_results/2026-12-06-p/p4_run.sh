#!/usr/bin/env bash
# Run p4 (2026-12-06): the SmolLM2 shape's decode step, device busy against idle (p4_decode_breakdown.py.txt).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 benchmarks/gpu_results/2026-12-06-p/p4_decode_breakdown.py.txt 2>&1 | tee $OUT/p4_decode_breakdown.log \
  | grep -E "ROUND|PROFILE|ms +[0-9]+ |Error|error" | cut -c1-400
