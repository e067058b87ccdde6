#!/usr/bin/env bash
# The H200 runs still owed by open issues, in one script: one device call per group of stages.
# Usage (repository root, on the GPU machine):
#   bash benchmarks/gpu_pending.sh "<stage> ..."
# Stages (each under its own timeout; a failure is logged and the next stage runs):
#   tests          the CUDA platform and Triton attention tests on the GPU (TESTS, TESTS_MARK="gpu or not gpu",
#                  TESTS_TIMEOUT, TESTS_ARGS e.g. "-n 4" with pytest-xdist) ~3 min
#   lora_sweep     LoRA kernel sweep with segment-aligned tiles (issue 16; LORA_SWEEP_ARGS) ~4 min
#   lora_profile   the SGMV shrink / expand apart at 256 rows x 64 adapters, then ncu on both (16)  ~4 min
#   quant_sweep    INT4/FP8/INT8 GEMV and GEMM sweep (issue 14; QUANT_SWEEP_ARGS e.g. "--rows 1 --formats int4") ~2 min
#   quant_e2e      8B bf16 vs fp8 / int4 / int8 engines, offline + batch 1 (14; QUANT_PARTS, QUANT_BUDGET s, QUANT_N; a part
#                  fp8_old_row / int8_old_row: the one-row W8A16 GEMV config before run u; fp8_kv: FP8 with an FP8 KV cache)  ~6 min
#   fp8_kv         FP8 KV cache: capacity, agreement, throughput (14)              ~3 min
#   lora_e2e       8B with 1 / 8 / 64 rank-16 adapters vs base (16)                ~6 min
#   determinism    batch-invariant mode: bitwise check + cost (21)                 ~3 min
#   inv_sweep      the batch-invariant GEMM's tiles on the 8B shapes vs cuBLAS, invariance checked (21) ~3 min
#   spec           spec-decode mechanics at the 8B shape, bf16 (15; SPEC_ARGS, SPEC_TIMEOUT)   ~5 min
#   verify_graphs  the verify-shaped CUDA graph tests, GPU-marked ones included (15)  ~1 min
#   moe            Qwen3-30B-A3B with the decode GEMV path (13; MOE_PROFILE=1: kernel times) ~5 min
#   moe_sweep      the MoE decode GEMV's tile sweep at Qwen3-30B-A3B's shapes (13)  ~4 min
#   gemv_sweep     the one-row dense GEMV's grid incl. unrolled k-loops (13, 21; GEMV_SHAPES) ~2 min
#   gemv_e2e       batch-1 decode, default GEMV vs the sweep's best config (after gemv_sweep; GEMV_E2E) ~4 min
#   fallback       Llama-8B through the transformers fallback (13)                 ~3 min
#   embed          BERT-base and Qwen3-0.6B embeddings vs sentence-transformers, tokenizer threads on (19) ~5 min
#   run_batch      `kvik run-batch` vs LLM.chat on the SmolLM2 shape (19; needs .whl with fastapi + opentelemetry-api) ~3 min
#   models_b1      8B and Qwen3-30B-A3B: batch-1 decode with its floor, offline n=64 (13, 21)  ~4 min
#   fusions_ab     batch-1 decode with each decode fusion off in turn (rotary in attention, SiLU in the gate/up
#                  GEMV), 8B + MoE (13, 21; FUSIONS_AB=llama8b or qwen3_30b_a3b: one shape; VARIANTS, ROUNDS) ~9 min
#   run_batch_8b   the same comparison on the 8B shape (steps of ~20-30 ms rather than ~3.5)     ~6 min
#   host_syncs     synchronizing CUDA calls on the engine's step path, by kvik call site (21; SYNC_SHAPES,
#                  SYNC_OUT_LEN, SYNC_ARGS=--cprofile: where the host's time goes) ~3 min
#   act_quant      the W8A8 MLP's down-projection input: SiLU-and-mul writing the codes vs the two kernels (14) ~1 min
#   int8_ws        INT8 GEMM with Triton's warp specialization / a persistent loop vs the committed kernel (14; INT8_WS_ARGS) ~3 min
#   attn_tiles     decode tiles at large batches (bf16 and FP8 cache), prefill tiles over an FP8 cache (14, 21)  ~3 min
#   attn_ab        triton_attention.py prefill + decode, this kernels.py against OLD_KERNELS (a copy of an older
#                  kvik_triton_attention/kernels.py carried as an untracked file), alternating, ROUNDS (21) ~4 min
#   long_context   TTFT and batch-1 decode at 8k / 32k / 128k-token prompts, kvik vs transformers (21; LONG_ARGS) ~8 min
#   graph_relaunch does relaunching a CUDA graph still in flight block the host? (21)  ~30 s
#   tp             two GPUs: TP=2 tokens, TP=2 / DP=2 on the 8B (17; nvidia-h200-x2)
#   tp70           two GPUs: the Llama-3.3-70B shape at TP=2 (17; nvidia-h200-x2, its own call)
#   allreduce      two GPUs: NCCL vs symmetric-memory all-reduce latency, and the symm all-reduce test (17)
# Triton compiles cost start-up on a fresh machine (the 82 s once blamed on them was mostly dummy weights
# drawn on the host, fixed). The cache persists between calls when `.triton-cache` is carried: it is used
# as TRITON_CACHE_DIR and packed back into $OUT/triton-cache.tgz at the end; copy that file to
# .triton-cache/cache.tgz here for the next call (unpacked it is over the 64 MiB a call may carry).
set -u
STAGES=${1:-"lora_sweep quant_sweep"}
OUT=${OUT:-/tmp/kvik_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}; mkdir -p "$TRITON_CACHE_DIR"
# The cache travels packed (unpacked it is over the 64 MiB a call may carry): .triton-cache/cache.tgz.
if [ -f .triton-cache/cache.tgz ]; then tar xzf .triton-cache/cache.tgz -C "$TRITON_CACHE_DIR" && rm .triton-cache/cache.tgz; fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
stage() {  # stage <name> <timeout s> <command...>: output in $OUT/<name>.log, the tail on stdout
  local name=$1 limit=$2; shift 2
  echo "=== $name $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"
  grep -E "^(RESULT|PART)|Error" "$OUT/$name.log" | cut -c1-1200 | tail -30
}
for s in $STAGES; do
  case $s in
    tests) stage tests ${TESTS_TIMEOUT:-150} python3 -m pytest -q -rf -p no:cacheprovider ${TESTS_ARGS:-} \
             ${TESTS:-tests/platforms/cuda tests/attention_backends} ${TESTS_MARK:+-m "$TESTS_MARK"}
           grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -25 ;;
    lora_sweep) stage lora_sweep 330 python3 benchmarks/lora_kernels_sweep.py --budget-s 300 ${LORA_SWEEP_ARGS:-}
                tail -60 "$OUT/lora_sweep.log" | cut -c1-200 ;;
    lora_profile) for p in gate_up qkv; do  # the 64-adapter SGMV shrink and expand timed apart (16): table vs others
                    for c in "" sgmv-m64-k64-c64-n128-w4-s3-tf32x3 sgmv-m16-k128-c64-n128-w4-s3-ps4-tf32x3; do
                      stage lora_profile_$p$c 150 python3 benchmarks/lora_kernel_profile.py --proj $p --tokens 256 --mix a64g \
                        ${c:+--config $c}
                      grep -E '"(config|tiles|splits|shrink_grid|expand_grid)"|_us"|graph_us|_tb_s|min_mb' \
                        "$OUT/lora_profile_$p$c.log" | tr -d '\n '; echo
                    done
                  done
                  timeout 200 /usr/local/cuda/bin/ncu -k regex:_sgmv --launch-skip 4 --launch-count 2 --section SpeedOfLight \
                    --section WarpStateStats --section LaunchStats --section Occupancy \
                    python3 benchmarks/lora_kernel_profile.py --iters 3 > "$OUT/lora_ncu.log" 2>&1; echo "ncu rc=$?" ;;
    quant_sweep) stage quant_sweep $(( ${QUANT_SWEEP_BUDGET:-80} + 30 )) python3 benchmarks/quant_kernels_sweep.py \
                   --budget-s ${QUANT_SWEEP_BUDGET:-80} ${QUANT_SWEEP_ARGS:-}
                 tail -40 "$OUT/quant_sweep.log" | cut -c1-200 ;;
    quant_e2e) stage quant_e2e $(( ${QUANT_BUDGET:-150} + 20 )) python3 benchmarks/quant_benchmark.py --parts ${QUANT_PARTS:-bf16,fp8,int4,int8} --n ${QUANT_N:-300} --budget-s ${QUANT_BUDGET:-150} ;;
    fp8_kv) stage fp8_kv 200 python3 benchmarks/fp8_kv_check.py --budget-s ${FP8_KV_BUDGET:-190} ;;
    lora_e2e) stage lora_e2e ${LORA_TIMEOUT:-220} python3 benchmarks/lora_throughput.py --parts ${LORA_PARTS:-base,lora8,lora64} --n 300 ${LORA_ARGS:-} ;;
    determinism) stage determinism 360 python3 benchmarks/deterministic_check.py ;;
    inv_sweep) stage inv_sweep 260 python3 benchmarks/invariant_gemm_sweep.py --budget-s 220
               grep -E "best|other bits" "$OUT/inv_sweep.log" | cut -c1-400 ;;
    spec) stage spec ${SPEC_TIMEOUT:-330} python3 benchmarks/spec_decode_benchmark.py --dtype bfloat16 --batches 1 16 --offline-n 300 ${SPEC_ARGS:-} ;;
    verify_graphs) stage verify_graphs 150 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_cuda_verify_graphs.py -m "gpu or not gpu"
                   tail -3 "$OUT/verify_graphs.log" ;;
    moe_sweep) stage moe_sweep 200 python3 benchmarks/moe_gemv_sweep.py --budget-s 150 ${MOE_SWEEP_ARGS:-} ;;
    gemv_sweep) stage gemv_sweep 200 python3 benchmarks/dense_gemv_probe.py --shapes ${GEMV_SHAPES:-moe_qkv,moe_o,8b_qkv,8b_o,8b_down}
                tail -8 "$OUT/gemv_sweep.log" | cut -c1-300 ;;
    gemv_e2e) stage gemv_e2e 450 python3 benchmarks/dense_gemv_probe.py --e2e ${GEMV_E2E:-llama8b,qwen3_30b_a3b} --config ${GEMV_CONFIG:-best}
              tail -8 "$OUT/gemv_e2e.log" | cut -c1-300 ;;
    moe) stage moe 330 python3 benchmarks/models_gpu.py --one qwen3_30b_a3b --n ${MOE_N:-500} ${MOE_PROFILE:+--profile} ;;
    fallback) stage fallback 200 python3 benchmarks/models_gpu.py --one llama8b_fallback --n 500 ;;
    embed) TOKENIZERS_PARALLELISM=true stage embed 330 python3 benchmarks/embedding_benchmark.py --parts bert-base,qwen3-0.6b ;;
    run_batch) stage run_batch 240 python3 benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16 \
                 --n 512 --out-len 128 --repeats 3
               grep -E '^repeat|median_|within' "$OUT/run_batch.log" | cut -c1-160 ;;
    models_b1) stage models_b1 480 python3 benchmarks/models_gpu.py --cases llama8b,qwen3_30b_a3b --n 64 --limit 230
               grep -o '"case": "[a-z0-9_]*"\|"batch1_decode_ms": [0-9.]*\|"batch1_x_floor": [0-9.]*\|"out_tok_s": [0-9.]*' \
                 "$OUT/models_gpu.jsonl" | tr '\n' ' '; echo ;;
    fusions_ab) stage fusions_ab 560 python3 benchmarks/decode_fusions_ab.py ${FUSIONS_AB:-llama8b,qwen3_30b_a3b} ;;
    run_batch_8b) stage run_batch_8b 420 python3 benchmarks/run_batch_benchmark.py --shape llama8b --device cuda \
                    --dtype bfloat16 --n 512 --out-len 128 --repeats 2 ;;
    host_syncs) for shape in ${SYNC_SHAPES:-smollm2 llama8b}; do
                  stage host_syncs_$shape 240 python3 benchmarks/host_syncs.py --shape $shape --n 256 --out-len ${SYNC_OUT_LEN:-32} ${SYNC_ARGS:-}
                done ;;
    act_quant) stage act_quant 120 python3 benchmarks/act_quant_probe.py ;;
    int8_ws) stage int8_ws 300 python3 benchmarks/int8_ws_probe.py ${INT8_WS_ARGS:-} ;;
    attn_tiles) stage attn_tiles 260 python3 benchmarks/triton_attention.py --sections decode_tiles,prefill_fp8 ;;
    attn_ab) kernels=attention_backends/triton/kvik_triton_attention/kernels.py
             cp "$kernels" /tmp/kernels_new.py
             for r in $(seq ${ROUNDS:-2}); do
               stage attn_new_$r 150 python3 benchmarks/triton_attention.py --sections prefill,decode
               cp "${OLD_KERNELS:?copy the older kernels.py somewhere in the tree and name it}" "$kernels"
               stage attn_old_$r 150 python3 benchmarks/triton_attention.py --sections prefill,decode
               cp /tmp/kernels_new.py "$kernels"
             done ;;
    long_context) stage long_context 540 python3 benchmarks/long_context_gpu.py --limit 250 ${LONG_ARGS:-}
                  grep RESULT "$OUT/long_context.log" | cut -c1-300 ;;
    graph_relaunch) stage graph_relaunch 120 python3 benchmarks/graph_relaunch_probe.py ;;
    tp) stage tp 560 python3 benchmarks/tp_benchmark.py --parts ${TP_PARTS:-tokens,dp2,dp_mp,llama8b,usual} ;;
    allreduce) stage allreduce 120 python3 benchmarks/allreduce_bench.py
               stage allreduce_test 120 python3 -m pytest -q -p no:cacheprovider tests/platforms/cuda/test_symm_all_reduce.py
               tail -3 "$OUT/allreduce_test.log" ;;
    tp70) stage tp70 560 python3 benchmarks/tp_benchmark.py --parts llama70b ;;
    *) echo "unknown stage $s" ;;
  esac
done
# Only what a cache hit loads: each kernel's metadata JSON, its cubin and the launcher .so's. The intermediate
# IRs (ttir, ttgir, llir, ptx) are ~80% of the bytes; with them the archive outgrew what a call hands back
# (17 MB in run s, not returned). Each kernel's group file lists its files and newer Triton treats a group with
# a missing file as a miss, so the groups are rewritten to list what is kept.
python3 - "$TRITON_CACHE_DIR" <<'PRUNE'
import json, sys
from pathlib import Path
IR = (".ttir", ".ttgir", ".llir", ".ptx")
for path in Path(sys.argv[1]).rglob("*"):
    if path.suffix in IR:
        path.unlink()
for group in Path(sys.argv[1]).rglob("__grp__*.json"):
    data = json.loads(group.read_text())
    data["child_paths"] = {k: v for k, v in data.get("child_paths", {}).items() if Path(v).suffix not in IR}
    group.write_text(json.dumps(data))
PRUNE
tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null && ls -la "$OUT/triton-cache.tgz"
# Only 8 files come back from $OUT: everything but the Triton cache travels as one archive.
(cd "$OUT" && tar czf /tmp/results.tgz --exclude=triton-cache.tgz . && find . -maxdepth 1 -mindepth 1 ! -name triton-cache.tgz -exec rm -rf {} + \
  && mv /tmp/results.tgz results.tgz && ls -la)
