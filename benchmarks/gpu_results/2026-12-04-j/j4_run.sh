#!/usr/bin/env bash
# Run j4 (2026-12-04): K/V stored inside the piecewise segments (splits_kv_write), the frozen-heap fix:
# GPU tests, prefill latency (SmolLM2, 8B), the SmolLM2 shape's 4,000 requests and the 8B's 1,000 with
# piecewise graphs on/off, embeddings.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/platforms/cuda/test_piecewise.py \
  tests/platforms/cuda/test_cuda_runner.py tests/attention_backends/triton/test_triton_attention.py \
  -k "piecewise or graphs or conformance" > $OUT/j4_tests.log 2>&1; tail -3 $OUT/j4_tests.log
OUT=$OUT timeout 100 python3 benchmarks/prefill_latency.py --shape smollm2 > $OUT/j4_prefill_smollm2.log 2>&1
grep -E "^RESULT|Error|captured" $OUT/j4_prefill_smollm2.log | cut -c1-600
OUT=$OUT timeout 120 python3 benchmarks/prefill_latency.py --shape llama8b --cases 1x128,1x512,3x512,1x1536 \
  > $OUT/j4_prefill_llama8b.log 2>&1
grep -E "^RESULT|Error|captured" $OUT/j4_prefill_llama8b.log | cut -c1-600
OUT=$OUT timeout 130 python3 benchmarks/gpu_offline.py --shape smollm2 --n 4000 --variants async,no_piecewise,async \
  > $OUT/j4_smollm2_4000.log 2>&1
grep -E "^RESULT|Error" $OUT/j4_smollm2_4000.log | cut -c1-330
OUT=$OUT timeout 150 python3 benchmarks/gpu_offline.py --shape llama8b --n 1000 --variants async,no_piecewise \
  > $OUT/j4_llama8b.log 2>&1
grep -E "^RESULT|Error" $OUT/j4_llama8b.log | cut -c1-330
OUT=$OUT timeout 150 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b > $OUT/j4_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/j4_embed.log | cut -c1-300 | tail -8
