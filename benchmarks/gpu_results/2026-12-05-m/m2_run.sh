#!/usr/bin/env bash
# Run m2 (2026-12-05): the encoder GPU tests (graph bits for BERT, XLM-R, ModernBERT) on the q | k | v rows
# written straight into the static buffer; that change against the old copy, same process; the issue's
# BERT-base benchmark against sentence-transformers.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_cuda_encoders.py > $OUT/m2_tests.log 2>&1
grep -E "passed|failed|Error" $OUT/m2_tests.log | tail -6
OUT=$OUT timeout 170 python3 benchmarks/gpu_results/2026-12-05-m/m2_qkv_copy_ab.py.txt > $OUT/m2_ab.log 2>&1
grep -E "^RESULT|^PROFILE|bit-identical|Error" $OUT/m2_ab.log | cut -c1-400
OUT=$OUT timeout 110 python3 benchmarks/embedding_benchmark.py --parts bert-base --kvik-step-tokens 32768 \
  > $OUT/m2_embed.log 2>&1
grep -o '"kvik_seconds_by_step_tokens": {[^}]*}\|"peer_seconds_by_batch_size": {[^}]*}\|"speedup_vs_peer_best": [0-9.]*\|Error.*' $OUT/m2_embed.log | head -4
mv $OUT/embedding_benchmark.json $OUT/m2_embedding_benchmark.json 2>/dev/null
