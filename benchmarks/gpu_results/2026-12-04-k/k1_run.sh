#!/usr/bin/env bash
# Run k1 (2026-12-04): the GPU tests of the piecewise review commit and the pooled-copy fix; the pooled copy
# at launch vs at finish (A/B, same process); embeddings vs sentence-transformers.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_piecewise.py \
  tests/platforms/cuda/test_cuda_runner.py tests/platforms/cuda/test_cuda_encoders.py \
  -k "piecewise or graphs or encoder or pooled" > $OUT/k1_tests.log 2>&1; tail -4 $OUT/k1_tests.log
timeout 170 python3 benchmarks/gpu_results/2026-12-04-k/k1_pooled_copy_ab.py.txt > $OUT/k1_copy_ab.log 2>&1
grep -E "^RESULT|Error" $OUT/k1_copy_ab.log | cut -c1-300
OUT=$OUT timeout 170 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b > $OUT/k1_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/k1_embed.log | cut -c1-300 | tail -8
mv $OUT/embedding_benchmark.json $OUT/k1_embedding_benchmark.json 2>/dev/null
