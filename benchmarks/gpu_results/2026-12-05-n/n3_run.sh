#!/usr/bin/env bash
# Run n3 (2026-12-05): run-batch (engine in a child process) against LLM.chat in this process and LLM.chat in a
# new process (as cold as the engine's child), with the child's step counters; SmolLM2 shape.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT timeout 420 python3 benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16 \
  --n 512 --out-len 128 --repeats 4 --sides chat,chat_new_process,run_batch > $OUT/n3_run_batch.log 2>&1
grep -E '^repeat|median_|within|Error' $OUT/n3_run_batch.log | python3 -c "
import sys, json
for line in sys.stdin:
    if line.startswith('repeat'):
        head, row = line.split(': ', 1); row = json.loads(row)
        print(head, {k: ((v['tokens_per_s'], v.get('steps'), v.get('in_steps_s'), v.get('before_first_step_s')) if isinstance(v, dict) else v) for k, v in row.items()})
    else:
        print(line.rstrip()[:200])
"
mv $OUT/run_batch_benchmark.json $OUT/n3_run_batch_benchmark.json 2>/dev/null
