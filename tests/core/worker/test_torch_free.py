"""The scheduler, the engine, model-config resolution and the runner kit load without torch.

A subprocess makes ``import torch`` fail (``sys.modules["torch"] = None``) and
imports them, then resolves a real checkpoint's model config: what a non-torch
platform (MLX) needs from the core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # any import of torch now raises ImportError
    import kvik.scheduling.scheduler, kvik.engine.llm_engine, kvik.engine.async_llm, kvik.entrypoints.llm
    import kvik.attention.backend, kvik.attention.selector, kvik.sample.batch, kvik.worker.kit
    from kvik.config import EngineConfig
    from kvik.models.model_config import build_model_config, resolve_format
    path = sys.argv[1]
    mc = build_model_config(EngineConfig(model=path, dtype="float32"), resolve_format(path))
    print(json.dumps({"arch": mc.architecture, "layers": mc.num_layers,
                      "torch": sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch")}))
    """
)


def _run_blocked(code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_core_imports_and_resolves_a_model_without_torch(tiny_model_dir) -> None:
    path = tiny_model_dir("llama", num_hidden_layers=2)
    result = json.loads(_run_blocked(_CHILD, str(path)))
    assert result == {"arch": "LlamaForCausalLM", "layers": 2, "torch": []}
