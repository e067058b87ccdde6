#!/usr/bin/env bash
# Build the wheel of every kvik distribution into one folder (default: dist/wheels), as a release would
# publish them. Then, without PyPI knowing kvik:
#   pip install --find-links dist/wheels "kvik[cpu,server]"
# Uses the local setuptools (no build isolation), so building needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist/wheels}"
mkdir -p "$OUT"
DISTS=(core platforms/cpu platforms/cuda platforms/rocm platforms/apple attention_backends/triton
       quantization/gguf quantization/quant server .)
for dist in "${DISTS[@]}"; do
    python3 -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$OUT" "./$dist"
done
ls "$OUT"
