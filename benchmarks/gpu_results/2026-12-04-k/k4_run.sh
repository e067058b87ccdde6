#!/usr/bin/env bash
# Run k4 (2026-12-04): embeddings vs sentence-transformers with kvik at three step sizes (its best counted,
# as the peer's best batch size is).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
OUT=$OUT timeout 400 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b \
  --kvik-step-tokens 32768,65536,131072 > $OUT/k4_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/k4_embed.log | cut -c1-300 | tail -8
grep -o '"kvik_seconds_by_step_tokens": {[^}]*}\|"peer_seconds_by_batch_size": {[^}]*}' $OUT/k4_embed.log | head -4
mv $OUT/embedding_benchmark.json $OUT/k4_embedding_benchmark.json 2>/dev/null
