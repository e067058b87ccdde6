#!/usr/bin/env bash
# Run i3 (2026-12-04): the encoder GPU tests (no synchronizing call in the forward), the pinned/pageable A/B,
# then the embeddings benchmark (BERT-base, Qwen3-0.6B) against sentence-transformers.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
I=benchmarks/gpu_results/2026-12-04-i
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/platforms/cuda/test_cuda_encoders.py > $OUT/i3_tests.log 2>&1
tail -15 $OUT/i3_tests.log | cut -c1-300
timeout 150 python3 $I/i3_pinned_ab.py.txt > $OUT/i3_pinned_ab.log 2>&1; grep -E "^\{|RESULT|Error" $OUT/i3_pinned_ab.log | cut -c1-200
OUT=$OUT timeout 200 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b > $OUT/i3_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/i3_embed.log | cut -c1-200 | tail -8
