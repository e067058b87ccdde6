#!/usr/bin/env bash
# Run n1 (2026-12-05): run-batch with the engine in a child process (kvik/engine/engine_process.py) against
# LLM.chat and against run-batch with the engine on a thread of the same process, SmolLM2 shape.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT timeout 420 python3 benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16 \
  --n 512 --out-len 128 --repeats 3 > $OUT/n1_run_batch.log 2>&1
grep -E '^repeat|median_|within|Error' $OUT/n1_run_batch.log | python3 -c "
import sys, json
for line in sys.stdin:
    if line.startswith('repeat'):
        head, row = line.split(': ', 1); row = json.loads(row)
        print(head, {k: (v['tokens_per_s'] if isinstance(v, dict) else v) for k, v in row.items()})
    else:
        print(line.rstrip()[:200])
"
mv $OUT/run_batch_benchmark.json $OUT/n1_run_batch_benchmark.json 2>/dev/null
