#!/usr/bin/env bash
# One device-tool call: install the GPU distributions, run the GPU tests, the kernel
# micro-benchmark and end-to-end benchmarks. Logs and JSON lines land in $OUT.
# Usage: bash benchmarks/gpu_validate.sh "<stage> ..."
# Stages:
#   tests          GPU tests ($TESTS, default: the Triton backend and the CUDA platform)
#   micro          Triton attention micro-benchmark
#   smollm2        SmolLM2 shape offline ($NSMOL requests): async / sync / no prefix cache, latency, profile
#   llama8b        Llama-3.1-8B shape offline ($N8B requests): async / sync, batch-1 latency
#   llama8b_prefix 8B: prefix caching off at 0% hits, and the shared-system-prompt benchmark
#   serve          8B behind `kvik serve` with benchmarks/serve.py at Poisson rates ($RATES)
#   smollm2_profile  torch.profiler: the GPU's idle share with async scheduling on and off
#   peers          HF transformers batch-1 StaticCache + torch.compile (/work/shared/peers carried as .peers)
#   peers_static   HF transformers static batch 128 + torch.compile over 500 requests
# The server needs fastapi/uvicorn/pydantic: carry them as .whl (see docs/benchmarks.md).
set -u
STAGES=${1:-"tests micro smollm2 llama8b"}
OUT=${OUT:-/tmp/kvik_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
N8B=${N8B:-1000}; NSMOL=${NSMOL:-4000}; RATES=${RATES:-"8,16,32,inf"}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton -e server \
  2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; from kvik.plugins.manager import PluginManager as M; m=M(); print(torch.__version__, triton.__version__, m.platforms.names(), m.attention_backends.names())"
offline() {  # offline <timeout> <args...>
  local limit=$1; shift
  timeout "$limit" python3 benchmarks/gpu_offline.py "$@" 2>&1 | tee -a "$OUT/run.log" | grep -E "RESULT|Error|error" | cut -c1-1500
}
for stage in $STAGES; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) timeout 240 python3 -m pytest ${TESTS:-tests/attention_backends/triton tests/platforms/cuda} -q -p no:cacheprovider \
             -o addopts="-ra --import-mode=importlib" 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    micro) timeout 150 python3 benchmarks/triton_attention.py 2>&1 | tee -a "$OUT/run.log" | grep -v "^RESULT" | tail -5 ;;
    smollm2) offline 300 --shape smollm2 --n "$NSMOL" --variants async,sync,no_prefix_cache --latency --profile ;;
    smollm2_profile) offline 200 --shape smollm2 --n 256 --variants async --profile ;;
    llama8b) offline 400 --shape llama8b --n "$N8B" --variants async,sync --latency ;;
    llama8b_prefix) offline 300 --shape llama8b --n "$N8B" --variants no_prefix_cache,async --prefix ;;
    serve) # the 8B checkpoint written by an offline stage (or now)
      python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from gpu_common import write_random_checkpoint as w; print(w('llama8b', Path('/tmp/kvik_models')))"
      python3 -m kvik.entrypoints.cli serve --model /tmp/kvik_models/llama8b-bf16 --dtype bfloat16 --max-model-len 2048 --port 8011 \
        --served-model-name llama8b > "$OUT/server.log" 2>&1 &
      SERVER=$!
      for _ in $(seq 180); do
        curl -sf http://127.0.0.1:8011/ready > /dev/null && break
        kill -0 $SERVER 2> /dev/null || break  # it died: its log says why
        sleep 1
      done
      if ! kill -0 $SERVER 2> /dev/null; then tail -5 "$OUT/server.log"; continue; fi
      echo "server ready: $(date -u +%H:%M:%S)"
      timeout 300 python3 benchmarks/serve.py --base-url http://127.0.0.1:8011 --endpoint completions \
        --num-prompts "${NSERVE:-400}" --request-rate "$RATES" --input-len 200 --output-len 128 --ignore-eos \
        --max-duration 60 --json-out "$OUT/serve_llama8b.json" 2>&1 | tee -a "$OUT/run.log" | tail -12
      kill -TERM $SERVER; wait $SERVER; echo "server exit code $?" ;;
    peers) (cd .peers && timeout 240 python3 hf_static.py --shape llama8b --sections b1_compiled --budget 230 2>&1 \
             | tee -a "$OUT/run.log" | grep -E "RESULT|Error" | cut -c1-600) ;;
    peers_static) # HF's best batched generate: StaticCache + torch.compile at batch 128 (the baseline's best)
      (cd .peers && timeout 300 python3 hf_static.py --shape llama8b --n 500 --bs 128 --sections probe,full_static_compiled \
         --budget 290 2>&1 | tee -a "$OUT/run.log" | grep -E "RESULT|Error" | cut -c1-600) ;;
  esac
done
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
