#!/usr/bin/env bash
# Run l1 (2026-12-05): GPU tests of the encoders' piecewise graphs, then the graphs-on/off A/B on BERT-base.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e platforms/cpu \
  -e attention_backends/triton -e quantization/quant -e quantization/gguf -e server 2>&1 | grep -v WARNING | tail -3
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/platforms/cuda/test_cuda_encoders.py \
  tests/platforms/cuda/test_piecewise.py "tests/platforms/cuda/test_cuda_runner.py::test_piecewise_graphs_give_the_eager_bits" \
  > $OUT/l1_tests.log 2>&1; tail -4 $OUT/l1_tests.log
timeout 330 python3 benchmarks/gpu_results/2026-12-05-l/l1_encoder_graphs_ab.py.txt > $OUT/l1_ab.log 2>&1
grep -E "RESULT|ready|cosine|Error|error" $OUT/l1_ab.log | cut -c1-250 | tail -30
