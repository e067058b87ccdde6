"""Helpers for the GPU benchmarks: random-weight checkpoints built on the GPU, the peers' workload, records.

The shapes and the workload generator match /work/shared/peers/common.py (the HF
baselines in docs), so kvik and the peers see the same prompts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B shape (rope scaling omitted: it does not change speed)
    "llama8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "smollm2": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


def write_random_checkpoint(shape: str, root: Path, device: str = "cuda", seed: int = 0) -> Path:
    """A bf16 random-weight LlamaForCausalLM of ``shape`` under ``root`` (reused when present).

    Built directly on ``device`` in bf16 (HF's init: normal(0, 0.02), norms at 1), saved as
    safetensors shards, plus :func:`word_tokenizer` over the whole vocabulary (offline
    benchmarks feed token ids; the served benchmark streams text for every generated id).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"{shape}-bf16"
    if (path / "config.json").exists():
        return path
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.architectures = ["LlamaForCausalLM"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path, max_shard_size="4GB")
    word_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"wrote {shape} ({params / 1e9:.3f} B params) to {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def dummy_model_dir(root: Path, shape: str, variant: str = "", **overrides: Any) -> Path:
    """A Llama checkpoint of ``shape`` without weights (config.json + :func:`word_tokenizer`): all that
    ``load_format="dummy"`` reads. ``overrides`` change config fields (name the ``variant``, which keeps
    its own folder). Reused when present."""
    from transformers import LlamaConfig

    path = Path(root) / f"{shape}{'-' + variant if variant else ''}-config"
    if not (path / "config.json").exists():
        cfg = LlamaConfig(**{**SHAPES[shape], **overrides}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.dtype = "bfloat16"
        cfg.save_pretrained(path)
        word_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(path)
    return path


def word_tokenizer(vocab_size: int) -> Any:
    """A whitespace word-level tokenizer with one word per id: the 3 ChatML specials, then "w3", "w4", ...

    Random weights generate any id in the vocabulary; a tokenizer that maps each to a
    word makes every streamed token visible text (unknown input words map to id 0).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {word: i for i, word in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def workload(n: int, vocab: int, lo: int = 128, hi: int = 1024, seed: int = 1234) -> list[list[int]]:
    """n prompts of random token ids in [1, vocab), lengths uniform in [lo, hi] (the peers' generator)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(1, vocab, size=int(length)).tolist() for length in lens]


def weight_bytes(shape: str) -> int:
    """bf16 bytes of the shape's weights (what one decode step must read)."""
    s = SHAPES[shape]
    h, i, v, layers = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    hd = h // s["num_attention_heads"]
    attn = h * hd * (s["num_attention_heads"] * 2 + s["num_key_value_heads"] * 2)
    per_layer = attn + 3 * h * i + 2 * h
    emb = v * h * (1 if s["tie_word_embeddings"] else 2)
    return 2 * (layers * per_layer + emb + h)


def kv_bytes_per_token(shape: str) -> int:
    s = SHAPES[shape]
    hd = s["hidden_size"] // s["num_attention_heads"]
    return 2 * 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * hd


_CEILINGS: dict[str, float] = {}


def measure_ceilings() -> dict[str, float]:
    """This GPU's device-to-device copy bandwidth (bytes read + written per s) and bf16 GEMM rate.

    Measured once per process (~1 s): a 2 GiB copy and an 8192^3 bf16 matmul on random
    data, each the median of do_bench runs. The hardware limits the results are judged against.
    """
    if _CEILINGS:
        return _CEILINGS
    import torch
    import triton.testing

    def bench() -> tuple[float, float]:
        src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        gemm_ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50, return_mode="median")
        return 2 * src.numel() * 2 / (copy_ms / 1e3), 2 * 8192**3 / (gemm_ms / 1e3)

    _CEILINGS["copy_bytes_per_s"], _CEILINGS["bf16_gemm_flops"] = bench()
    torch.cuda.empty_cache()  # the engine sizes its KV cache from free memory
    return _CEILINGS


def sync() -> None:
    """Wait for the GPU (no-op on CPU smoke runs)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch1_decode_ms(llm: Any, vocab: int) -> float:
    """Batch-1 decode ms/token of ``llm``: a 512-token prompt, 128 new tokens, the prompt's one-token run
    subtracted, best of three (after one warm-up)."""
    from kvik import SamplingParams

    def timed(seed: int, new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
        sync()
        t = time.perf_counter()
        llm.generate(workload(1, vocab, 512, 512, seed=seed), params, use_tqdm=False)
        sync()
        return time.perf_counter() - t

    timed(99, 16)
    return min((timed(s + 1, 129) - timed(s, 1)) / 128 for s in (7, 9, 11)) * 1e3


def profile_record(summary: Any, top: int = 25) -> dict[str, Any]:
    """One rank's ``LLM.stop_profile()`` summary as JSON: wall and device ms, and the ``top`` kernels as
    (name, device µs, calls)."""
    return dict(wall_ms=round(summary.wall_s * 1e3, 2), device_ms=round(summary.device_us / 1e3, 3),
                other_ms=round(summary.other_device_us / 1e3, 3),
                kernels=[(k.name[:90], round(k.device_us, 1), k.calls) for k in summary.kernels[:top]])  # fmt: skip


class Recorder:
    """Append JSON lines to $OUT/<name>.jsonl (or /tmp) and echo them."""

    def __init__(self, name: str) -> None:
        self.path = Path(os.environ.get("OUT", "/tmp")) / f"{name}.jsonl"

    def __call__(self, **record: Any) -> None:
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = json.dumps(record, default=str)
        print("RESULT " + line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
