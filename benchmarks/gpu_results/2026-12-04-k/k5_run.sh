#!/usr/bin/env bash
# Run k5 (2026-12-04): run-batch vs LLM.chat on the 8B shape with lines sent straight to the handlers.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
OUT=$OUT timeout 420 python3 benchmarks/run_batch_benchmark.py --shape llama8b --device cuda --dtype bfloat16 \
  --n 512 --out-len 128 --repeats 2 > $OUT/k5_run_batch_8b.log 2>&1
grep -E '^repeat|median_|within|Error' $OUT/k5_run_batch_8b.log | cut -c1-200
mv $OUT/run_batch_benchmark.json $OUT/k5_run_batch_8b.json 2>/dev/null
