#!/usr/bin/env bash
# Run k3 (2026-12-04): BERT's attention with and without the cuDNN SDPA backend (A/B); embeddings vs
# sentence-transformers after the pooled-vector finish change.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 200 python3 benchmarks/gpu_results/2026-12-04-k/k3_sdpa_ab.py.txt > $OUT/k3_sdpa_ab.log 2>&1
grep -E "^RESULT|Error" $OUT/k3_sdpa_ab.log | cut -c1-300
OUT=$OUT timeout 170 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b > $OUT/k3_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/k3_embed.log | cut -c1-300 | tail -8
mv $OUT/embedding_benchmark.json $OUT/k3_embedding_benchmark.json 2>/dev/null
