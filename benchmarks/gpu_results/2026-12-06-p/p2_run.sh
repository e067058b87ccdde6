#!/usr/bin/env bash
# Run p2 (2026-12-06): the host-time changes (ba6f06a: the scheduler's inline decode pass; 6e0a6e7: young
# collections rarer while the heap is frozen) against the tree before them (eac9c46, in .before):
# 1. host time per decode step on this machine's CPU (benchmarks/host_overhead.py), alternating, 3 rounds;
# 2. SmolLM2 shape offline (2,000 x 256, async) on the GPU, alternating, 3 rounds;
# 3. issue 19: run-batch against LLM.chat (warm process and new process), 2,000 chats x 256 tokens.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep -E "Model name|^CPU\(s\)"
for round in 1 2 3; do
  for tree in before after; do
    root=$([ $tree = before ] && echo .before || echo .)
    echo "$tree $round $(PYTHONPATH="$root/core:$root/platforms/cuda:$root/platforms/cpu:/tmp/site" CUDA_VISIBLE_DEVICES= \
      timeout 100 python3 $root/benchmarks/host_overhead.py --running 64,256 --steps 150 2>&1 | grep running | tr '\n' ' ')"
  done
done 2>&1 | tee $OUT/p2_host_overhead.log
BEFORE=.before ROUNDS=3 LIMIT=100 bash benchmarks/gpu_compare.sh "smollm2:2000" > $OUT/p2_compare.log 2>&1
grep -h '"offline"' $OUT/run.log | python3 -c "
import sys, json
for line in sys.stdin:
    d = json.loads(line.strip().split('RESULT ', 1)[1])
    print(d['out_tok_s'], d['mean_decode_step_ms'], d['phase_s'])"
OUT=$OUT timeout 330 python3 benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16 \
  --n 2000 --out-len 256 --repeats 3 --sides chat,chat_new_process,run_batch > $OUT/p2_run_batch.log 2>&1
grep -E '^repeat|median_|within|Error' $OUT/p2_run_batch.log | python3 -c "
import sys, json
for line in sys.stdin:
    if line.startswith('repeat'):
        head, row = line.split(': ', 1); row = json.loads(row)
        print(head, {k: ((v['tokens_per_s'], v.get('steps'), v.get('in_steps_s')) if isinstance(v, dict) else v) for k, v in row.items()})
    else:
        print(line.rstrip()[:300])
"
