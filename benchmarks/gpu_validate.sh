#!/usr/bin/env bash
# One device-tool call: install the GPU distributions, run the GPU tests, the kernel
# micro-benchmark and end-to-end benchmarks. Logs and JSON lines land in $OUT.
# Usage: bash benchmarks/gpu_validate.sh "<stage> ..."   stages: tests micro smollm2 llama8b peers;
# a stage "llama8b_512" runs with --max-num-seqs 512 (and skips the batch-1 latency). Logs: $OUT/run.log.
set -u
STAGES=${1:-"tests micro smollm2 llama8b"}
OUT=${OUT:-/tmp/kvik_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
N8B=${N8B:-1000}; NSMOL=${NSMOL:-4000}
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; from kvik.plugins.manager import PluginManager as M; m=M(); print(torch.__version__, triton.__version__, m.platforms.names(), m.attention_backends.names())"
for stage in $STAGES; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  SEQS=${stage#*_}; LAT=""; [ "$SEQS" = "$stage" ] && SEQS=256 && LAT=--latency
  case ${stage%_*} in
    tests) timeout 240 python3 -m pytest ${TESTS:-tests/attention_backends/triton tests/platforms/cuda} -q -p no:cacheprovider \
             -o addopts="-ra --import-mode=importlib" 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    micro) timeout 150 python3 benchmarks/triton_attention.py 2>&1 | tee -a "$OUT/run.log" | grep -v "^RESULT" | tail -5 ;;
    smollm2) timeout 200 python3 benchmarks/gpu_offline.py --shape smollm2 --n "$NSMOL" $LAT --max-num-seqs "$SEQS" 2>&1 \
             | tee -a "$OUT/run.log" | grep -E "RESULT|Error|error" | cut -c1-1500 ;;
    llama8b) timeout 420 python3 benchmarks/gpu_offline.py --shape llama8b --n "$N8B" $LAT ${PROFILE:-} --max-num-seqs "$SEQS" 2>&1 \
             | tee -a "$OUT/run.log" | grep -E "RESULT|Error|error|Self CUDA" | cut -c1-1500 ;;
    peers) # the HF baselines (/work/shared/peers, carried as .peers): batch-1 StaticCache + torch.compile
           (cd .peers && timeout 240 python3 hf_static.py --shape llama8b --sections b1_compiled --budget 230 2>&1 \
             | tee -a "$OUT/run.log" | grep -E "RESULT|Error" | cut -c1-600) ;;
  esac
done
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
