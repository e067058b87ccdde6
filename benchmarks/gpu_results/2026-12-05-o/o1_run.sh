#!/usr/bin/env bash
# Run o1 (2026-12-05): KV-cache groups on the GPU (issue 13). The runner/piecewise GPU tests (Gemma 2/3 in
# groups under the Triton backend and CUDA graphs against transformers), then the Gemma-3-1B shape with
# dummy weights on a fixed 2 GiB KV cache, grouped against one table, each mode in its own process.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 260 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/platforms/cuda/test_cuda_runner.py \
  tests/platforms/cuda/test_piecewise.py > $OUT/o1_tests.log 2>&1
grep -E "passed|failed|Error|FAILED" $OUT/o1_tests.log | tail -12
timeout 300 python3 benchmarks/kv_cache_groups.py --device cuda --shape gemma3_1b --kv-cache-gib 2 \
  --num-requests 256 --input-len 2048,4096 --output-len 256 --max-model-len 8192 --max-num-batched-tokens 2048 \
  --rounds 1 --out $OUT/o1_kv_groups.jsonl > $OUT/o1_kv_groups.log 2>&1
tail -4 $OUT/o1_kv_groups.log | cut -c1-400
