#!/usr/bin/env bash
# Run k2 (2026-12-04): where BERT-base embedding's host time goes (py-spy, all threads); run-batch vs LLM.chat
# on the SmolLM2 shape with lines sent straight to the handlers.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 150 /tmp/site/bin/py-spy record -r 250 -f raw --threads -o $OUT/k2_bert.raw -- \
  python3 benchmarks/gpu_results/2026-12-04-k/k2_bert_spy.py.txt > $OUT/k2_bert.log 2>&1
grep -E "^RESULT|Error|py-spy" $OUT/k2_bert.log | cut -c1-300
OUT=$OUT timeout 300 python3 benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16 \
  --n 512 --out-len 128 --repeats 3 > $OUT/k2_run_batch.log 2>&1
grep -E '^repeat|median_|within|Error' $OUT/k2_run_batch.log | cut -c1-200
mv $OUT/run_batch_benchmark.json $OUT/k2_run_batch_benchmark.json 2>/dev/null
