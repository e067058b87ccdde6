"""The native architectures on a GPU at real shapes, with random (dummy) weights, against a peer in the same run.

    python benchmarks/models_gpu.py [--cases llama8b,llama8b_fallback,gemma2_9b,qwen3_30b_a3b,hf_qwen3_30b_a3b]
        [--n 500] [--out-len 256]

Each case runs in its own process (a 30B MoE and its HF peer do not fit beside each other):

- ``llama8b``, ``gemma2_9b``, ``qwen3_30b_a3b``: kvik offline throughput on the peers' workload
  (``--n`` prompts of U[128, 1024] random tokens, ``--out-len`` new tokens, greedy, EOS ignored) with
  ``load_format="dummy"``, then batch-1 decode ms/token (512-token prompt, 128 new);
- ``llama8b_fallback``: the same Llama-8B run through transformers' modelling code on kvik's paged
  cache (``model_impl="transformers"``): the price of the fallback against native code;
- ``hf_qwen3_30b_a3b``: the peer for the MoE: transformers' ``generate`` on the same random-weight shape
  (batched, left-padded, its best attention), a smaller slice of the same workload (HF has no continuous
  batching; it runs ``--hf-batch`` prompts at a time).

Records (JSON lines) go to $OUT/models_gpu.jsonl and stdout; a case that fails records its error and
the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import measure_ceilings, profile_record, word_tokenizer, workload

CONFIGS: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B (rope scaling omitted: it does not change speed)
    "llama8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # Gemma-2-9B: soft-capping, alternating 4096-token windows, head_dim 256, 256k vocabulary
    "gemma2_9b": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=3584, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, intermediate_size=14336, vocab_size=256000,
        max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    ),
    # Qwen3-30B-A3B: 48 layers of 128 experts, 8 active, 768 wide
    "qwen3_30b_a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, max_position_embeddings=8192,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}  # fmt: skip
KVIK_CASES = {"llama8b": ("llama8b", "auto"), "llama8b_fallback": ("llama8b", "transformers"),
              "gemma2_9b": ("gemma2_9b", "auto"), "qwen3_30b_a3b": ("qwen3_30b_a3b", "auto")}  # fmt: skip
HF_CASES = {"hf_qwen3_30b_a3b": "qwen3_30b_a3b", "hf_llama8b": "llama8b"}


def emit(out: Path, **record: Any) -> None:
    line = json.dumps(record)
    print("RESULT " + line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")


def config_dir(shape: str, root: Path) -> Path:
    """A checkpoint directory with only config.json and a word tokenizer: enough for load_format='dummy'."""
    path = root / f"{shape}-config"
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        cfg = dict(CONFIGS[shape], torch_dtype="bfloat16", bos_token_id=None, eos_token_id=None, pad_token_id=None)
        (path / "config.json").write_text(json.dumps(cfg, indent=1))
        word_tokenizer(cfg["vocab_size"]).save_pretrained(path)
    return path


def active_weight_bytes(model: Any) -> int:
    """Bytes of weights one decode token reads: every parameter, but of each MoE expert stack only ``top_k`` of
    its ``E`` experts, and of the token embedding one row."""
    from kvik.layers.embedding import VocabEmbedding
    from kvik.layers.moe import SparseMoE

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, SparseMoE):
            experts = sum(p.numel() * p.element_size() for p in module.experts.parameters())
            total -= experts - experts * module.top_k // module.experts.num_experts
        elif isinstance(module, VocabEmbedding):
            table = module.weight.numel() * module.weight.element_size()
            total -= table - table // module.vocab_size
    return total


def kv_bytes(config: dict[str, Any], tokens: int) -> int:
    """The bf16 KV cache of ``tokens`` tokens over every layer."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * tokens


def run_kvik(case: str, args: argparse.Namespace, out: Path) -> None:
    import kvik
    import torch
    from kvik import SamplingParams

    shape, impl = KVIK_CASES[case]
    path = config_dir(shape, Path(args.root))
    t0 = time.perf_counter()
    llm = kvik.LLM(model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", model_impl=impl,
                   max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192)  # fmt: skip
    engine = llm.llm_engine
    init_s = time.perf_counter() - t0
    vocab = CONFIGS[shape]["vocab_size"]
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(workload(16, vocab, seed=5), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                             detokenize=False), use_tqdm=False)  # fmt: skip
    prompts = workload(args.n, vocab)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == args.out_len for o in outs)
    params_b = sum(p.numel() for p in engine.runner.model.parameters()) / 1e9
    record = dict(case=case, engine="kvik", shape=shape, model_impl=impl, architecture=engine.model_config.architecture,
                  params_b=round(params_b, 2), init_s=round(init_s, 1), n=args.n, out_len=args.out_len,
                  wall_s=round(wall, 2), out_tok_s=round(args.n * args.out_len / wall, 1),
                  attention=engine.runner.attn_backend.name, graphs=len(getattr(engine.runner, "graphs", {})),
                  memory_plan=engine.memory_plan.summary())  # fmt: skip
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    many = SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True, detokenize=False)
    best = float("inf")
    for seed in (11, 13, 15):
        prompt = workload(1, vocab, 512, 512, seed=seed)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompt, one, use_tqdm=False)
        t1 = time.perf_counter() - t
        prompt = workload(1, vocab, 512, 512, seed=seed + 100)
        t = time.perf_counter()
        llm.generate(prompt, many, use_tqdm=False)
        tn = time.perf_counter() - t
        best = min(best, (tn - t1) / 128 * 1e3)
    record["batch1_decode_ms"] = round(best, 3)
    # The floor on this machine: a token's active weights (and ~640 tokens of KV) at the copy bandwidth measured
    # in this run, so the "x floor" compares like with like (batch-1 times move ~10% between machines).
    bandwidth = measure_ceilings()["copy_bytes_per_s"]
    floor_ms = (active_weight_bytes(engine.runner.model) + kv_bytes(CONFIGS[shape], 640)) / bandwidth * 1e3
    record.update(copy_tb_s=round(bandwidth / 1e12, 2), batch1_floor_ms=round(floor_ms, 3),
                  batch1_x_floor=round(best / floor_ms, 3))  # fmt: skip
    if args.profile:  # where a batch-1 decode token's device time goes, kernel by kernel
        prompt = workload(1, vocab, 512, 512, seed=21)
        llm.generate(prompt, one, use_tqdm=False)  # the prefill outside the window
        llm.start_profile()
        llm.generate(workload(1, vocab, 512, 512, seed=22), SamplingParams(max_tokens=33, temperature=0.0,
                     ignore_eos=True, detokenize=False), use_tqdm=False)  # fmt: skip
        record["batch1_profile"] = profile_record(llm.stop_profile()[0])
    emit(out, **record)


def run_hf(case: str, args: argparse.Namespace, out: Path) -> None:
    import torch
    import transformers

    shape = HF_CASES[case]
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in CONFIGS[shape].items() if k != "architectures"})
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    init_s = time.perf_counter() - t0
    prompts = workload(args.hf_n, cfg.vocab_size)
    done, tokens = 0.0, 0
    t = time.perf_counter()
    for start in range(0, len(prompts), args.hf_batch):
        chunk = prompts[start : start + args.hf_batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):  # left padding, as HF generate wants for decoder-only models
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=args.out_len, min_new_tokens=args.out_len,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        tokens += (gen.shape[1] - width) * len(chunk)
    torch.cuda.synchronize()
    done = time.perf_counter() - t
    emit(out, case=case, engine="transformers", version=transformers.__version__, shape=shape, init_s=round(init_s, 1),
         n=len(prompts), batch=args.hf_batch, out_len=args.out_len, wall_s=round(done, 2),
         out_tok_s=round(tokens / done, 1), attn_implementation=model.config._attn_implementation)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="llama8b,llama8b_fallback,gemma2_9b,qwen3_30b_a3b,hf_qwen3_30b_a3b")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--hf-n", type=int, default=64, help="prompts the HF peer runs")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--root", default="/tmp/kvik_models")
    ap.add_argument("--limit", type=int, default=300, help="seconds per case")
    ap.add_argument("--profile", action="store_true", help="also profile 33 batch-1 tokens (kernel times)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this case in this process
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/kvik_out")) / "models_gpu.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.one:
        (run_kvik if args.one in KVIK_CASES else run_hf)(args.one, args, out)
        return
    for case in args.cases.split(","):
        if case not in KVIK_CASES and case not in HF_CASES:
            raise SystemExit(f"unknown case {case!r}; known: {', '.join([*KVIK_CASES, *HF_CASES])}")
        print(f"=== {case} {time.strftime('%H:%M:%S')}", flush=True)
        argv = [sys.executable, __file__, "--one", case, "--n", str(args.n), "--out-len", str(args.out_len),
                "--hf-n", str(args.hf_n), "--hf-batch", str(args.hf_batch), "--root", args.root] + (["--profile"] if args.profile else [])  # fmt: skip
        try:
            proc = subprocess.run(argv, timeout=args.limit, capture_output=True, text=True)
            sys.stdout.write(proc.stdout[-4000:])
            if proc.returncode != 0:
                emit(out, case=case, error=f"exit {proc.returncode}", stderr_tail=proc.stderr[-3000:])
        except subprocess.TimeoutExpired:
            emit(out, case=case, error=f"timed out after {args.limit} s")
        except Exception:  # one case's failure must not lose the others' results
            emit(out, case=case, error=traceback.format_exc()[-3000:])


if __name__ == "__main__":
    main()
