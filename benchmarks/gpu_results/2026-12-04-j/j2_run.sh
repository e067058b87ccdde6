#!/usr/bin/env bash
# Run j2 (2026-12-04): prefill latency with piecewise graphs on/off and transformers (SmolLM2, 8B shapes),
# the SmolLM2 shape's 4,000-request workload on/off, the Qwen3-0.6B embedder.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
OUT=$OUT timeout 150 python3 benchmarks/prefill_latency.py --shape smollm2 > $OUT/j2_prefill_smollm2.log 2>&1
grep -E "^RESULT|Error|captured" $OUT/j2_prefill_smollm2.log | cut -c1-700
OUT=$OUT timeout 150 python3 benchmarks/prefill_latency.py --shape llama8b --cases 1x128,1x512,3x512,1x1536 \
  > $OUT/j2_prefill_llama8b.log 2>&1
grep -E "^RESULT|Error|captured" $OUT/j2_prefill_llama8b.log | cut -c1-700
OUT=$OUT timeout 150 python3 benchmarks/gpu_offline.py --shape smollm2 --n 4000 --variants async,no_piecewise \
  > $OUT/j2_smollm2_4000.log 2>&1
grep -E "^RESULT|Error" $OUT/j2_smollm2_4000.log | cut -c1-420
OUT=$OUT timeout 100 python3 benchmarks/embedding_benchmark.py --parts qwen3-0.6b > $OUT/j2_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/j2_embed.log | cut -c1-300 | tail -6
