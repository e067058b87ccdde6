#!/usr/bin/env bash
# Run m1 (2026-12-05): where BERT-base embedding's wall time goes (host vs device, tokenizing), the issue's
# BERT-base benchmark against sentence-transformers, then the encoder and piecewise GPU tests.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nproc; lscpu | grep -E "Model name|Thread|MHz" | head -4
OUT=$OUT timeout 150 python3 benchmarks/gpu_results/2026-12-05-m/m1_bert_breakdown.py.txt > $OUT/m1_breakdown.log 2>&1
grep -vE "Writing|Loading|USDT" $OUT/m1_breakdown.log | cut -c1-330 | tail -24
OUT=$OUT timeout 130 python3 benchmarks/embedding_benchmark.py --parts bert-base --kvik-step-tokens 16384,32768 \
  > $OUT/m1_embed.log 2>&1
grep -o '"kvik_seconds_by_step_tokens": {[^}]*}\|"peer_seconds_by_batch_size": {[^}]*}\|"speedup_vs_peer_best": [0-9.]*\|Error.*' $OUT/m1_embed.log | head -6
mv $OUT/embedding_benchmark.json $OUT/m1_embedding_benchmark.json 2>/dev/null
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_cuda_encoders.py \
  tests/platforms/cuda/test_piecewise.py > $OUT/m1_tests.log 2>&1
grep -E "passed|failed|Error" $OUT/m1_tests.log | tail -8
