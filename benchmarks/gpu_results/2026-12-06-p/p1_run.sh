#!/usr/bin/env bash
# Run p1 (2026-12-06): the scheduler's inline decode pass (ba6f06a) against the tree before it (eac9c46).
# 1. host time per decode step on this machine's CPU (benchmarks/host_overhead.py), both trees, alternating;
# 2. SmolLM2 shape offline (2,000 x 256, async) on the GPU, both trees, alternating, two rounds;
# 3. run o3 (prepared 2026-12-05): where a new process's first LLM.chat calls lose time (issue 19).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep -E "Model name|^CPU\(s\)"
for round in 1 2; do
  for tree in before after; do
    root=$([ $tree = before ] && echo .before || echo .)
    echo "=== host_overhead $tree $round"
    PYTHONPATH="$root/core:$root/platforms/cuda:$root/platforms/cpu" CUDA_VISIBLE_DEVICES= timeout 120 \
      python3 $root/benchmarks/host_overhead.py --running 64,256 --steps 150 2>&1 | grep running
  done
done 2>&1 | tee $OUT/p1_host_overhead.log
BEFORE=.before ROUNDS=2 LIMIT=150 bash benchmarks/gpu_compare.sh "smollm2:2000" > $OUT/p1_compare.log 2>&1
grep -E "===|RESULT" $OUT/p1_compare.log | cut -c1-300
OUT=$OUT timeout 240 python3 benchmarks/gpu_results/2026-12-05-o/o3_warm_phases.py.txt > $OUT/o3_warm_phases.log 2>&1
grep -E "^RESULT|Error" $OUT/o3_warm_phases.log | cut -c1-900
