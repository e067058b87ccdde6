#!/usr/bin/env bash
# One device-tool call: the same offline benchmarks on two source trees in one run, alternating,
# so a refactor's "throughput did not fall" is a same-machine, same-run comparison.
# Usage (from the repo root on the GPU machine):
#   BEFORE=.before TESTS="tests/platforms/cuda" bash benchmarks/gpu_compare.sh "smollm2:4000 llama8b:1000"
# BEFORE holds an older tree (`git archive <commit> core platforms attention_backends quantization
# benchmarks | tar -x -C .before`, carried to the device). The current tree is installed editable
# (entry points); each run puts one tree's packages first on PYTHONPATH. Each "shape:n" runs
# before, after, ... ($ROUNDS rounds, default 2); results land in $OUT/{before,after}{1,2}/offline_<shape>.jsonl.
set -u
JOBS=${1:-"smollm2:4000"}
BEFORE=${BEFORE:-.before}
OUT=${OUT:-/tmp/kvik_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton \
  -e quantization/gguf 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
path_of() {  # the PYTHONPATH that makes tree $1's packages win
  local root=$1
  echo "$root/core:$root/platforms/cuda:$root/platforms/cpu:$root/attention_backends/triton:$root/quantization/gguf"
}
if [ -n "${TESTS:-}" ]; then
  echo "=== tests $(date -u +%H:%M:%S)"
  timeout 300 python3 -m pytest $TESTS -q -p no:cacheprovider -o addopts="-ra --import-mode=importlib" 2>&1 \
    | tee "$OUT/tests.log" | tail -15
fi
for job in $JOBS; do
  shape=${job%%:*}; n=${job##*:}
  for round in $(seq "${ROUNDS:-2}"); do
    for tree in before after; do
      root=$([ $tree = before ] && echo "$BEFORE" || echo .)
      echo "=== $shape n=$n $tree round $round $(date -u +%H:%M:%S)"
      mkdir -p "$OUT/$tree$round"
      OUT="$OUT/$tree$round" PYTHONPATH="$(path_of "$root")${PYTHONPATH:+:$PYTHONPATH}" \
        timeout "${LIMIT:-240}" python3 "$root/benchmarks/gpu_offline.py" --shape "$shape" --n "$n" --variants async \
        2>&1 | tee -a "$OUT/run.log" | grep -E "RESULT|Error|error" | cut -c1-400
    done
  done
done
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
