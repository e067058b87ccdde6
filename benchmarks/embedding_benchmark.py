"""Embedding throughput on one GPU, kvik vs a peer in the same run; and `kvik run-batch` vs `LLM.generate`.

    python benchmarks/embedding_benchmark.py                 # the H200: <= 8 minutes
    python benchmarks/embedding_benchmark.py --smoke         # any machine (CPU ok): tiny shapes, checks the script
    python benchmarks/embedding_benchmark.py --wheels DIR    # offline-install fastapi from DIR for the run-batch part
    python benchmarks/embedding_benchmark.py --peer transformers   # the fallback peer even where ST is installed

Parts (each guarded: a failing part records its error and the others still run):

1. ``bert-base``: a random bf16 ``BertModel`` of BERT-base shape (sentence-transformers files: mean
   pooling, normalised), ``--n-bert`` texts of 512 tokens each.
2. ``qwen3-0.6b``: a random bf16 ``Qwen3Model`` of Qwen3-0.6B shape (last-token pooling, normalised),
   ``--n-qwen`` texts of 512 tokens each.
   For both: the peer is sentence-transformers' ``encode`` at each of a few batch sizes (its best is
   reported) when it is installed, else plain transformers ``AutoModel`` + the same pooling; kvik's
   ``LLM.embed`` gets all texts at once, timed at each ``--kvik-step-tokens`` (``max_num_batched_tokens``,
   its batch-size knob; its best reported, as the peer's). Both start from text. The record says which peer ran, and the
   minimum cosine between kvik's and the peer's vectors (bf16, so ~0.99+, not 1).
3. ``run_batch``: a random bf16 SmolLM2-shaped Llama with a ChatML template; ``--n-chat`` chat requests
   (64-256 words, 128 tokens out, greedy, EOS ignored) through ``LLM.chat`` (``LLM.generate`` after the
   same template), through ``kvik run-batch``'s runner (in-process, timed from the first request to
   the last record) and through that runner without its GC freeze, each on a fresh engine: one
   unrecorded warm-up of each, then ``--chat-repeats`` rounds in alternating order
   (benchmarks/run_batch_benchmark.py's ``compare``; rows have steps, full GCs and per-thread CPU).
   Target: run-batch within 5% of generate. Needs fastapi (kvik-server's app); without
   it the part is skipped with the reason (``--wheels DIR`` installs it offline first).

A JSON summary is printed last and written to $OUT/embedding_benchmark.json (or /tmp).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)  # fmt: skip
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0,
                 tie_word_embeddings=True)  # fmt: skip
SMOKE_BERT = dict(BERT_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=1000)  # fmt: skip
SMOKE_QWEN = dict(QWEN3_06B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, vocab_size=1000)  # fmt: skip
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def word_texts(n: int, words: int, vocab: int, first: int, seed: int) -> list[str]:
    """n texts of ``words`` random vocabulary words ("w<id>"): a word-level tokenizer maps each to one token."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(first, vocab, size=words)) for _ in range(n)]


def bert_tokenizer(vocab_size: int) -> Any:
    """Word-level, one id per word, with BERT's specials and its single / pair templates."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(BERT_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(BERT_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)  # fmt: skip


def write_st_files(path: Path, hidden: int, mode: str) -> None:
    """sentence-transformers' module list: Transformer -> Pooling(mode) -> Normalize (flag format: every
    sentence-transformers version and kvik read it)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "2_Normalize").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens", "lasttoken")}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **flags}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))


def write_embedder(kind: str, shape: dict[str, Any], root: Path) -> Path:
    """A random bf16 checkpoint (built on the device) with sentence-transformers files."""
    import torch
    import transformers
    from gpu_common import word_tokenizer

    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if kind == "bert-base":
        config, cls, tokenizer, mode = transformers.BertConfig(**shape), transformers.BertModel, bert_tokenizer(shape["vocab_size"]), "mean_tokens"
    else:
        config, cls, tokenizer, mode = transformers.Qwen3Config(**shape), transformers.Qwen3Model, word_tokenizer(shape["vocab_size"]), "lasttoken"  # fmt: skip
    config.architectures = [cls.__name__]
    with torch.device(device_name()):
        model = cls(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_st_files(path, shape["hidden_size"], mode)
    del model
    free_memory()
    return path


def peer_encoder(path: Path, mode: str) -> tuple[str, Callable[[list[str], int], np.ndarray]]:
    """(which peer, encode(texts, batch_size) -> normalised float32 vectors)."""
    import torch

    device = device_name()
    if ARGS.peer == "auto" and importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device=device).to(torch.bfloat16)

        def st_encode(texts: list[str], batch_size: int) -> np.ndarray:
            return np.asarray(st.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True),
                              dtype=np.float32)  # fmt: skip

        return "sentence-transformers encode", st_encode
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path), dtype=torch.bfloat16).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    @torch.inference_mode()
    def hf_encode(texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            if mode == "mean_tokens":
                vec = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:  # last real token (right padding)
                vec = hidden[torch.arange(ids.shape[0], device=device), mask.sum(1) - 1].float()
            out.append(torch.nn.functional.normalize(vec, dim=-1).cpu())
        return torch.cat(out).numpy()

    why = "asked for" if ARGS.peer == "transformers" else "sentence-transformers not installed"
    return f"transformers AutoModel + pooling ({why})", hf_encode


def bench_embedder(kind: str, shape: dict[str, Any], n: int, batch_sizes: list[int], root: Path) -> dict[str, Any]:
    from gpu_common import sync
    from kvik import LLM

    mode = "mean_tokens" if kind == "bert-base" else "lasttoken"
    path = write_embedder(kind, shape, root)
    # 512 tokens per text: BERT's template adds [CLS] and [SEP] around 510 words.
    texts = word_texts(n, 510 if kind == "bert-base" else 512, shape["vocab_size"], len(BERT_SPECIALS), seed=1)
    tokens = n * 512
    record: dict[str, Any] = {"model": kind, "sequences": n, "tokens_per_sequence": 512}
    peer_name, encode = peer_encoder(path, mode)
    record["peer"] = peer_name
    encode(texts[: batch_sizes[0]], batch_sizes[0])  # warm-up
    peer: dict[str, float] = {}
    reference = None
    for bs in batch_sizes:
        sync()
        start = time.perf_counter()
        reference = encode(texts, bs)
        sync()
        peer[str(bs)] = time.perf_counter() - start
    del encode
    free_memory()
    best_bs = min(peer, key=peer.__getitem__)
    record["peer_seconds_by_batch_size"] = {k: round(v, 3) for k, v in peer.items()}
    record["peer_best_batch_size"] = int(best_bs)
    record["peer_sequences_per_s"] = n / peer[best_bs]
    record["peer_tokens_per_s"] = tokens / peer[best_bs]

    # kvik's step size is its batch-size knob: like the peer, it is timed at each and its best counted.
    kvik: dict[str, float] = {}
    for budget in [int(b) for b in ARGS.kvik_step_tokens.split(",")]:
        llm = LLM(str(path), dtype="bfloat16", max_model_len=512, max_num_seqs=256, max_num_batched_tokens=budget)
        llm.embed(texts[:64])  # warm-up (kernels, allocator)
        sync()
        start = time.perf_counter()
        outputs = llm.embed(texts)
        sync()
        kvik[str(budget)] = time.perf_counter() - start
        if len(kvik) < len(ARGS.kvik_step_tokens.split(",")):
            llm.llm_engine.shutdown()
            del llm
            free_memory()
    record["kvik_seconds_by_step_tokens"] = {k: round(v, 3) for k, v in kvik.items()}
    record["kvik_best_step_tokens"] = int(min(kvik, key=kvik.__getitem__))
    seconds = min(kvik.values())
    got = np.array([o.outputs.embedding for o in outputs], dtype=np.float32)
    assert all(len(o.prompt_token_ids) == 512 for o in outputs), "texts are not 512 tokens each"
    record["kvik_seconds"] = round(seconds, 3)
    record["kvik_sequences_per_s"] = n / seconds
    record["kvik_tokens_per_s"] = tokens / seconds
    record["speedup_vs_peer_best"] = peer[best_bs] / seconds
    assert reference is not None
    cos = (got * reference).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(reference, axis=-1)
    record["min_cosine_kvik_vs_peer"] = float(cos.min())
    if ARGS.profile:
        record["kvik_profile"] = profile_embed(llm, texts[: min(n, 1024)])
    llm.llm_engine.shutdown()
    del llm
    free_memory()
    return record


def profile_embed(llm: Any, texts: list[str]) -> dict[str, Any]:
    """Where kvik's ``embed`` of ``texts`` goes: kernels (torch.profiler) and host functions (cProfile)."""
    import cProfile
    import io
    import pstats

    from gpu_common import profile_record, sync

    llm.start_profile()
    llm.embed(texts)
    sync()
    summary = llm.stop_profile()[0]
    host = cProfile.Profile()
    host.enable()
    llm.embed(texts)
    sync()
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(30)
    return {**profile_record(summary, top=20), "host_top": text.getvalue().splitlines()[-36:]}


def ensure_fastapi(wheels: str | None) -> str | None:
    """None when kvik-server's app can be imported; else why the run-batch part cannot run."""
    if importlib.util.find_spec("fastapi") is None and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, "fastapi"],
                       check=False)  # fmt: skip
    try:
        import kvik_server.app  # noqa: F401
    except ImportError as exc:
        return (f"kvik-server's app cannot be imported ({exc}); run-batch needs fastapi: pass --wheels DIR with "
                "wheels from `pip download fastapi -d DIR` for this machine's Python")  # fmt: skip
    return None


def bench_run_batch(n: int, out_len: int, smoke: bool, root: Path) -> dict[str, Any]:
    """run_batch_benchmark.py's comparison on this device: LLM.chat, run-batch, and run-batch without its
    GC freeze, each on a fresh engine, alternating after one unrecorded warm-up of each."""
    from gpu_common import SHAPES
    from run_batch_benchmark import compare, instrument, make_chats, write_model

    why = ensure_fastapi(ARGS.wheels)
    if why is not None:
        return {"run_batch_skipped": why}
    shape = "tiny" if smoke else "smollm2"
    device = device_name()
    path = write_model(shape, root, device)
    engine: dict[str, Any] = dict(model=str(path), dtype="bfloat16", max_model_len=2048, max_num_seqs=256)
    if device == "cpu":
        engine["num_threads"] = 1
    instrument()
    chats = make_chats(n, SHAPES[shape]["vocab_size"])
    record: dict[str, Any] = {"model": f"{shape} (random)", "requests": n, "max_tokens": out_len}
    record.update(compare(engine, chats, out_len, 1 if smoke else ARGS.chat_repeats, root,
                          ("chat", "run_batch", "run_batch_nofreeze")))  # fmt: skip
    free_memory()
    return record


def main() -> int:
    started = time.perf_counter()
    summary: dict[str, Any] = {"script": "benchmarks/embedding_benchmark.py", "smoke": ARGS.smoke,
                               # Both sides tokenize batches with the Rust tokenizer: its threads count.
                               "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)")}  # fmt: skip
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        summary["torch"] = torch.__version__
    except Exception as exc:
        summary["device"] = f"unknown ({exc})"
    root = Path(tempfile.mkdtemp(prefix="kvik-embed-bench-"))
    smoke = ARGS.smoke
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("bert-base", lambda: bench_embedder("bert-base", SMOKE_BERT if smoke else BERT_BASE,
                                             16 if smoke else ARGS.n_bert, [4, 8] if smoke else [64, 128, 256], root)),
        ("qwen3-0.6b", lambda: bench_embedder("qwen3-0.6b", SMOKE_QWEN if smoke else QWEN3_06B,
                                              8 if smoke else ARGS.n_qwen, [4, 8] if smoke else [16, 32, 64], root)),
        ("run_batch", lambda: bench_run_batch(8 if smoke else ARGS.n_chat, 8 if smoke else ARGS.chat_out_len, smoke,
                                              root)),
    ]  # fmt: skip
    for name, run in parts:
        if ARGS.parts and name not in ARGS.parts.split(","):
            continue
        if time.perf_counter() - started > ARGS.budget_s:
            summary[name] = {"skipped": f"time budget of {ARGS.budget_s} s spent before this part"}
            continue
        t0 = time.perf_counter()
        try:
            summary[name] = run()
        except Exception as exc:  # a part's failure must not lose the others' results
            summary[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            free_memory()
        summary[name]["part_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"PART {name}: {json.dumps(summary[name], default=str)}", flush=True)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    out = Path(os.environ.get("OUT") or "/tmp") / "embedding_benchmark.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and counts (checks the script on any machine)")
    p.add_argument("--n-bert", type=int, default=4096, help="512-token texts for the BERT-base part")
    p.add_argument("--n-qwen", type=int, default=1024, help="512-token texts for the Qwen3-0.6B part")
    p.add_argument("--n-chat", type=int, default=512, help="chat requests for the run-batch part")
    p.add_argument("--chat-out-len", type=int, default=128, help="tokens generated per chat request")
    p.add_argument("--chat-repeats", type=int, default=2, help="recorded rounds of the run-batch part's sides")
    p.add_argument("--parts", help="comma-separated subset of bert-base,qwen3-0.6b,run_batch (default: all)")
    p.add_argument("--peer", choices=["auto", "transformers"], default="auto",
                   help="auto: sentence-transformers when installed, else transformers + pooling")  # fmt: skip
    p.add_argument("--wheels", help="a folder of wheels to install fastapi from (offline) for the run-batch part")
    p.add_argument("--kvik-step-tokens", default="32768",
                   help="comma-separated max_num_batched_tokens values kvik is timed at (its best counts)")
    p.add_argument("--profile", action="store_true", help="profile one embed call of up to 1,024 texts per embedder")
    p.add_argument("--budget-s", type=float, default=420, help="start no new part after this many seconds")
    return p.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(main())
