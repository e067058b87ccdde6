#!/usr/bin/env bash
# Run o2 (2026-12-05): the KV-cache-group change against the tree before it (f546b63) on a model without
# windows (SmolLM2 shape, offline, async), alternating, two rounds; then the Gemma-3-1B comparison again.
set -u
BEFORE=.before ROUNDS=2 LIMIT=150 bash benchmarks/gpu_compare.sh "smollm2:2000" > $OUT/o2_compare.log 2>&1
grep -E "===|RESULT" $OUT/o2_compare.log | cut -c1-300
timeout 200 python3 benchmarks/kv_cache_groups.py --device cuda --shape gemma3_1b --kv-cache-gib 2 \
  --num-requests 256 --input-len 2048,4096 --output-len 256 --max-model-len 8192 --max-num-batched-tokens 2048 \
  --rounds 1 --out $OUT/o2_kv_groups.jsonl > $OUT/o2_kv_groups.log 2>&1
tail -3 $OUT/o2_kv_groups.log | cut -c1-330
