#!/usr/bin/env bash
# Run i1 (2026-12-04): encoder tests on the GPU, the encoder block-size A/B, then the embeddings benchmark vs sentence-transformers.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
I=benchmarks/gpu_results/2026-12-04-i
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/platforms/cuda/test_cuda_encoders.py \
  tests/core/pooling/test_encoders.py > $OUT/i1_tests.log 2>&1; tail -3 $OUT/i1_tests.log
TOKENIZERS_PARALLELISM=true timeout 150 python3 $I/i1_encoder_blocks_ab.py.txt > $OUT/i1_blocks_ab.log 2>&1; grep -E "^\{|RESULT|Error|block_size" $OUT/i1_blocks_ab.log | cut -c1-300
TOKENIZERS_PARALLELISM=true OUT=$OUT timeout 280 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b > $OUT/i1_embed.log 2>&1
grep -E "seq|speedup|cosine|Error" $OUT/i1_embed.log | cut -c1-300 | tail -30
