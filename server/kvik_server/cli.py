"""``kvik serve`` flags, YAML config files, and running the server with graceful SIGTERM.

``add_serve_arguments(parser)`` and ``run_server(args)`` are what the ``kvik`` CLI mounts;
``main()`` is the stand-alone ``kvik-server`` / ``python -m kvik_server`` entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from kvik.entrypoints.cli import PLATFORM_OPTION_HELP, platform_option
from kvik.entrypoints.frozen_heap import freeze_for_life

logger = logging.getLogger("kvik_server")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """Bytes from ``1073741824``, ``2GiB``, ``512MiB``, ``1.5GB``, ``64k`` (``GB`` = 10**9, ``GiB`` = 2**30)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use bytes or a unit such as 512MiB, 2GiB, 1.5GB")
    number, unit, binary = match.groups()
    base = 1024 if binary or not unit else 1000
    value = int(float(number) * base ** _POWERS[unit.lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 byte")
    return value


def _max_model_len(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _speculative_json(text: str) -> dict[str, Any]:
    """``--speculative-config``: vLLM's JSON object, checked before the model loads."""
    import json

    from kvik.spec_decode.config import SpeculativeConfig

    try:
        SpeculativeConfig.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return json.loads(text)  # type: ignore[no-any-return]


def _lora_module(text: str) -> str:
    """``--lora-modules`` entry, checked for shape here (its adapter is checked once the model loads)."""
    from kvik_server.lora_modules import parse_lora_module

    try:
        parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``kvik serve`` flag to ``parser`` (engine options keep vLLM's names)."""
    parser.add_argument("--config", help="YAML file of flag values (keys: flag names with - or _); "
                        "flags on the command line win")  # fmt: skip
    parser.add_argument("--model", help="checkpoint directory, GGUF file or Hugging Face Hub id "
                        "(default: the bundled SmolLM2-135M-Instruct)")  # fmt: skip
    parser.add_argument("--served-model-name", help="name clients must send as `model` (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--tokenizer", help="tokenizer path or Hub id (default: the model's own)")
    engine.add_argument("--revision", help="Hub branch, tag or commit of --model (and of a Hub --tokenizer)")
    engine.add_argument("--download-dir", help="Hub cache folder (default: huggingface_hub's, HF_HOME)")
    engine.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="let transformers run code shipped with the checkpoint (config, tokenizer)")  # fmt: skip
    engine.add_argument("--device", help="platform name (cpu, cuda, ...; default: auto-detect)")
    engine.add_argument("--model-impl", choices=["auto", "kvik", "transformers"],
                        help="modelling code: kvik's native, transformers' (the fallback), or auto (native when kvik has it)")  # fmt: skip
    engine.add_argument("--load-format", choices=["auto", "dummy", "safetensors", "gguf"],
                        help="dummy: random weights from the checkpoint's config (benchmarks)")  # fmt: skip
    engine.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    engine.add_argument("--quantization", help="quantize a dense checkpoint at load: fp8, int8, int4 (see `kvik plugins`)")
    engine.add_argument("--quantized-weights", choices=["auto", "dequantize", "quantized"],
                        help="keep a quantized checkpoint packed, or dequantize it at load (default: the platform's)")  # fmt: skip
    engine.add_argument("--max-model-len", type=_max_model_len,
                        help="context length, or 'auto' to fit memory (default: the model's)")  # fmt: skip
    engine.add_argument("--max-num-seqs", type=_positive_int, help="max sequences in the running batch")
    engine.add_argument("--max-num-batched-tokens", type=_positive_int, help="token budget per engine step")
    engine.add_argument("--kv-cache-memory", type=parse_size, help="memory for KV blocks, e.g. 2GiB")
    engine.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"],
                        help="what the KV cache stores: auto (the model dtype; default) or fp8 (float8 e4m3 with "
                             "per-layer scales from the checkpoint, else 1.0: twice the tokens)")  # fmt: skip
    engine.add_argument("--calculate-kv-scales", action="store_true", default=None,
                        help="with --kv-cache-dtype fp8: measure the K/V scales the checkpoint lacks on a calibration "
                             "prefill at start-up (instead of 1.0)")  # fmt: skip
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="share KV blocks of identical prompt prefixes (default: on)")  # fmt: skip
    engine.add_argument("--enforce-eager", action="store_true", default=None, help="disable CUDA graphs")
    engine.add_argument("--disable-custom-all-reduce", action="store_true", default=None,
                        help="tensor parallelism: sum through NCCL only, not the platform's small-message all-reduce")
    engine.add_argument("--deterministic", action="store_true", default=None,
                        help="batch-invariant numerics: a request's logits and tokens do not depend on its batch "
                             "(docs/deterministic.md)")  # fmt: skip
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule the next step while the GPU runs this one (default: the platform's)")  # fmt: skip
    engine.add_argument("--speculative-config", type=_speculative_json, metavar="JSON",
                        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                             "(methods: ngram, suffix; see docs/spec_decode.md)")  # fmt: skip
    engine.add_argument("--seed", type=int, help="engine seed")
    engine.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, metavar="N",
                        help="split each layer over N devices (docs/distributed.md)")  # fmt: skip
    engine.add_argument("--pipeline-parallel-size", "-pp", type=_positive_int, metavar="M",
                        help="split the layers into M stages on their own devices")  # fmt: skip
    engine.add_argument("--data-parallel-size", "-dp", type=_positive_int, default=1, metavar="D",
                        help="serve D engine replicas, each on its own tp x pp devices, behind one router")  # fmt: skip
    engine.add_argument("--data-parallel-routing", choices=["least_loaded", "prefix"], default="least_loaded",
                        help="how the router picks a replica: fewest unfinished requests, or by prompt prefix")  # fmt: skip
    engine.add_argument("--distributed-executor-backend", metavar="NAME",
                        help="who runs the ranks: mp (processes on this host; default), ray, uni, or a plugin's")  # fmt: skip
    engine.add_argument("--runner", choices=["auto", "generate", "pooling"],
                        help="pooling: serve embeddings / rerank / score / classify (default auto: from the model)")  # fmt: skip
    engine.add_argument("--num-threads", type=_positive_int, help="CPU platforms: torch intra-op threads")
    engine.add_argument("--platform-option", type=platform_option, action="append", metavar="KEY=VALUE",
                        help=PLATFORM_OPTION_HELP)  # fmt: skip
    lora = parser.add_argument_group("LoRA adapters (docs/lora.md)")
    lora.add_argument("--enable-lora", action="store_true", default=None,
                      help="serve PEFT LoRA adapters over the base model (a request's `model` picks one)")  # fmt: skip
    lora.add_argument("--lora-modules", nargs="+", type=_lora_module, metavar="NAME=PATH",
                      help='adapters to serve from the start: name=path or \'{"name": ..., "path": ...}\'')  # fmt: skip
    lora.add_argument("--max-loras", type=_positive_int, help="adapters in one batch (device slots; default 1)")
    lora.add_argument("--max-lora-rank", type=_positive_int, help="largest adapter rank accepted (default 16)")
    lora.add_argument("--max-cpu-loras", type=_positive_int, help="adapters cached in host memory (default: max-loras)")
    lora.add_argument("--allow-runtime-lora-updating", action="store_true", default=None,
                      help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key)")  # fmt: skip
    server = parser.add_argument_group("server")
    server.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        "(default: $KVIK_API_KEY); /health, /ready, /version, /metrics stay open")  # fmt: skip
    server.add_argument("--max-waiting-requests", type=int, help="answer 503 + Retry-After when more sequences "
                        "than this would wait for the batch (default: unlimited)")  # fmt: skip
    server.add_argument("--max-request-body-bytes", type=parse_size, default=16 * 1024 * 1024,
                        help="reject larger request bodies with 413 (default 16MiB)")  # fmt: skip
    server.add_argument("--shutdown-grace-period", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM (default 30)")  # fmt: skip
    server.add_argument("--ready-stall-seconds", type=float, default=60.0,
                        help="/ready fails when work is queued and no engine step ran for this long")  # fmt: skip
    server.add_argument("--trust-request-chat-template", action="store_true", default=None,
                        help="render chat templates sent in requests (chat_template); off by default because a "
                        "template is code the server runs")  # fmt: skip
    server.add_argument("--no-ui", dest="ui", action="store_false", default=None,
                        help="do not serve the built-in chat page at / (then / is a 404)")  # fmt: skip
    server.add_argument("--log-level", default=None, type=str.lower,
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="default: $KVIK_LOG_LEVEL, else info")  # fmt: skip
    tools = parser.add_argument_group("tool calling and reasoning (docs/tool_calling.md)")
    tools.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                       help='let requests use tool_choice "auto" (needs --tool-call-parser)')  # fmt: skip
    tools.add_argument("--tool-call-parser", help="how to read tool calls in free-form output: hermes, qwen, "
                       "llama3_json, mistral, pythonic, or a plugin's parser")  # fmt: skip
    tools.add_argument("--reasoning-parser", help="separate thinking into reasoning_content: deepseek_r1, qwen3, "
                       "or a plugin's parser")  # fmt: skip
    return parser


def load_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Flag defaults from a YAML mapping; unknown keys are an error listing the known ones."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        parser.error(f"cannot read --config {path}: {exc}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a YAML mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            parser.error(f"unknown key {key!r} in --config {path}; known keys: {known}")
        if callable(action.type) and isinstance(value, str):
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"--config {path}: bad value for {key}: {exc}")
        values[dest] = value
    return values


def parse_serve_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Any:
    """Parse flags with ``--config`` file values as defaults, then finish the namespace."""
    parser = parser or add_serve_arguments(argparse.ArgumentParser(prog="kvik serve"))
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_config_file(parser, args.config))
        args = parser.parse_args(argv)
    args.config_applied = True
    return finalize_args(args, parser)


def apply_config_file(args: Any) -> Any:
    """For a namespace parsed without :func:`parse_serve_args` (e.g. by the ``kvik`` CLI):
    take ``--config`` values for every flag still at its default."""
    if not getattr(args, "config", None) or getattr(args, "config_applied", False):
        return args
    parser = add_serve_arguments(argparse.ArgumentParser(prog="kvik serve"))
    for dest, value in load_config_file(parser, args.config).items():
        if getattr(args, dest, None) == parser.get_default(dest):
            setattr(args, dest, value)
    args.config_applied = True
    return args


def finalize_args(args: Any, parser: argparse.ArgumentParser | None = None) -> Any:
    """Fill defaults that depend on the environment: the API key and the default model."""
    if getattr(args, "api_key", None) is None:
        args.api_key = os.environ.get("KVIK_API_KEY") or None
    if getattr(args, "model", None) is None:
        try:
            from kvik.models.default import default_model
        except ImportError:
            message = "--model is required (this kvik has no bundled default model)"
            if parser is not None:
                parser.error(message)
            raise ValueError(message) from None
        args.model = str(default_model())
        if getattr(args, "served_model_name", None) is None:
            args.served_model_name = Path(args.model).stem  # not a site-packages path in every response
    from kvik_server.chat_output import ParserSettings

    try:
        ParserSettings.of(args).validate()  # an unknown parser name fails before the model loads
    except ValueError as exc:
        if parser is not None:
            parser.error(str(exc))
        raise
    return args


def engine_kwargs(args: Any) -> dict[str, Any]:
    """AsyncLLM.from_engine_args keyword arguments from the flags that were given."""
    names = ("model", "tokenizer", "revision", "download_dir", "trust_remote_code", "device", "model_impl",
             "load_format", "dtype", "quantization", "quantized_weights",
             "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "kv_cache_dtype",
             "calculate_kv_scales", "enable_prefix_caching",
             "enforce_eager", "disable_custom_all_reduce", "deterministic", "async_scheduling", "seed", "num_threads", "runner",
             "speculative_config", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras",
             "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend")  # fmt: skip
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "platform_option", None):
        kwargs["platform_options"] = dict(args.platform_option)
    return kwargs


def run_server(args: Any) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain gracefully; returns the exit code."""
    import uvicorn
    from kvik.engine.async_llm import AsyncLLM
    from kvik.entrypoints.cli import configure_logging, resolve_log_level

    from kvik_server.app import build_app
    from kvik_server.shutdown import GracefulServer

    args = apply_config_file(args)
    args = finalize_args(args)
    configure_logging(resolve_log_level(args, "info"))
    replicas = getattr(args, "data_parallel_size", 1) or 1
    engine: Any
    if replicas > 1:
        from kvik.engine.data_parallel import DataParallelLLM

        engine = DataParallelLLM.from_engine_args(replicas, args.data_parallel_routing, **engine_kwargs(args))
    else:
        # The engine steps in a process of its own (kvik.engine.engine_process), as vLLM's engine core does:
        # the requests' handling here (HTTP, JSON, templates, parsers) no longer takes the interpreter lock
        # from its step loop. Streams cross as deltas. On the 2-core VM, 32 streams of the bundled model:
        # a median 187 against 180 output tok/s on a thread, faster in 4 of 5 rounds (docs/benchmarks.md).
        engine = AsyncLLM.from_engine_args(engine_process=True, **engine_kwargs(args))
    app = build_app(engine, args)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        # No uvicorn log config: its loggers propagate to the root logger, so its lines share kvik's format.
        log_config=None,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = GracefulServer(config, app.state.ctx, grace_period=float(args.shutdown_grace_period))
    # The start-up heap (modules, model and tokenizer objects) lives as long as the server: out of the
    # collector's sight, a full collection no longer walks it while requests stream (each walk holds
    # the GIL from the engine thread; `kvik run-batch` measured 0.3 s per collection, issue 19).
    freeze_for_life()
    logger.info("serving %s on http://%s:%d", app.state.ctx.model_name, args.host, args.port)
    server.run()
    return 0


def exit_process(code: int) -> NoReturn:
    """End a stopped server's process at once.

    Everything that matters is done (requests drained, engine stopped, logs flushed below).
    A normal interpreter exit would now tear down every module's objects one by one (the
    tokenizer's vocabulary, torch, the GGUF reader...), which took seconds to tens of
    seconds under load and memory pressure with nothing left to do: SIGTERM must mean exit.
    """
    logger.info("server stopped; exiting")
    logging.shutdown()  # flushes every handler
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe cannot stop the exit
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    from kvik.entrypoints.cli import cli_spelling

    parser = add_serve_arguments(argparse.ArgumentParser(prog="kvik-server"))
    args = parse_serve_args(argv, parser)
    try:
        exit_process(run_server(args))
    except (ValueError, TypeError) as exc:  # a user error: one line naming the flag, no traceback
        logger.debug("error", exc_info=True)
        print(f"kvik-server: error: {cli_spelling(str(exc), parser)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
