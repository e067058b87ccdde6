#!/usr/bin/env bash
# Run i4 (2026-12-04): the frozen-heap A/B (BERT embed, SmolLM2-shape generate), then the embeddings benchmark.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
I=benchmarks/gpu_results/2026-12-04-i
timeout 240 python3 $I/i4_frozen_heap_ab.py.txt > $OUT/i4_frozen_heap_ab.log 2>&1; grep -E "^\{|tracked|Error" $OUT/i4_frozen_heap_ab.log | cut -c1-220
OUT=$OUT timeout 130 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b > $OUT/i4_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/i4_embed.log | cut -c1-200 | tail -8
