#!/usr/bin/env bash
# Run h1 (2026-12-04): GPU tests of the Triton attention, the FP8 P@V order A/B, then the 1,000-request workload.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant 2>&1 | grep -v WARNING | tail -3
H=benchmarks/gpu_results/2026-12-04-h
timeout 200 python3 -m pytest -q -m "gpu or not gpu" -x tests/attention_backends/triton/test_fp8_kv_cache.py \
  tests/attention_backends/triton/test_triton_attention.py > $OUT/h1_tests.log 2>&1; tail -3 $OUT/h1_tests.log
timeout 120 python3 $H/h1_fp8_pv_ab.py > $OUT/h1_kernels.log 2>&1; cat $OUT/h1_kernels.log | tail -8
timeout 250 python3 benchmarks/quant_benchmark.py --parts fp8_kv,bf16 --n 1000 > $OUT/h1_e2e_new.log 2>&1
grep -E "^== |offline_out|decode_ms" $OUT/h1_e2e_new.log | cut -c1-400
mkdir -p /tmp/plainpv && cat > /tmp/plainpv/sitecustomize.py <<'PY'
import kvik_triton_attention.backend as _b
_b.TritonAttentionBackend.fp8_transposed_pv_min_rows = 10**9  # run h1's "plain" side: the order before
PY
PYTHONPATH=/tmp/plainpv timeout 130 python3 benchmarks/quant_benchmark.py --parts fp8_kv --n 1000 > $OUT/h1_e2e_plain.log 2>&1
grep -E "^== " $OUT/h1_e2e_plain.log | cut -c1-400
cp $OUT/quant_*.json $OUT/ 2>/dev/null; ls $OUT
