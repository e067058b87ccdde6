#!/usr/bin/env bash
# Run i2 (2026-12-04): tokenization A/B on both embedders, then the embeddings benchmark with --profile.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
I=benchmarks/gpu_results/2026-12-04-i
timeout 200 python3 $I/i2_tokenize_ab.py.txt > $OUT/i2_tokenize_ab.log 2>&1; grep -E "^\{|Error" $OUT/i2_tokenize_ab.log | cut -c1-200
OUT=$OUT timeout 200 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b --profile > $OUT/i2_embed_profile.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/i2_embed_profile.log | cut -c1-200 | tail -8
