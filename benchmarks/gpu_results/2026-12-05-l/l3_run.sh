#!/usr/bin/env bash
# Run l3 (2026-12-05): the BERT-base benchmark against sentence-transformers with the encoder's
# piecewise graphs (kvik at 32,768-token steps), then the encoder GPU tests with what time is left.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
OUT=$OUT timeout 110 python3 benchmarks/embedding_benchmark.py --parts bert-base --kvik-step-tokens 32768 \
  > $OUT/l3_embed.log 2>&1
grep -E "speedup|kvik_seq|peer_seq|Error" $OUT/l3_embed.log | cut -c1-300 | tail -8
grep -o '"kvik_seconds_by_step_tokens": {[^}]*}\|"peer_seconds_by_batch_size": {[^}]*}' $OUT/l3_embed.log | head -4
mv $OUT/embedding_benchmark.json $OUT/l3_embedding_benchmark.json 2>/dev/null
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_cuda_encoders.py > $OUT/l3_tests.log 2>&1
tail -3 $OUT/l3_tests.log
