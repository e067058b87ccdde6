"""The ``kvik`` command: plugins, env, generate, serve, run-batch, export."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from kvik.version import __version__

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# One format for kvik's and uvicorn's lines (the server hands uvicorn's loggers to the root logger).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Set the root logger's level and kvik's line format; ``level`` is one of :data:`LOG_LEVELS`."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def _log_level_arg(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(LOG_LEVELS)})")
    return text.lower()


def cli_spelling(message: str, parser: argparse.ArgumentParser) -> str:
    """Rewrite Python spellings in an error message (``max_model_len=5808``) as the parser's
    flags (``--max-model-len 5808``), so a CLI user is told what to type."""
    flags: dict[str, str] = {}
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and action.dest != "help":
                flags.setdefault(action.dest, long[0])
    names = sorted((d for d in flags if "_" in d), key=len, reverse=True)  # plain words ("model") stay words
    if not names:
        return message
    alternation = "|".join(map(re.escape, names))
    # "SamplingParams.max_tokens" and "max_tokens=0" become "--max-tokens" and "--max-tokens 0".
    owner = r"(?:\b[A-Z]\w*\.)?"
    message = re.sub(rf"{owner}\b({alternation})=(?=[\w'\"])", lambda m: flags[m.group(1)] + " ", message)
    return re.sub(rf"{owner}(?<![-\w])({alternation})\b", lambda m: flags[m.group(1)], message)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from kvik.entrypoints.reports import plugins_report
    from kvik.plugins.manager import get_plugin_manager

    print(plugins_report(get_plugin_manager()))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from kvik.entrypoints.reports import env_report

    print(env_report())
    return 0


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by ``generate`` (``serve`` adds its own set)."""
    parser.add_argument(
        "--model", "-m", default=None, help="checkpoint directory, .gguf file or Hub id (default: bundled SmolLM2)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or Hub id (default: the model's own)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    parser.add_argument("--download-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")
    parser.add_argument("--trust-remote-code", action="store_true", help="let transformers run the checkpoint's code")
    parser.add_argument("--device", default=None, help="platform name (cpu, cuda, rocm, apple); default: auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--max-model-len", default=None, type=_max_model_len, help="context length (int or 'auto')")
    parser.add_argument("--kv-cache-memory", default=None, type=_size_arg, help="bytes for the KV cache, e.g. 2GiB")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                        help="what the KV cache stores: auto (the model dtype) or fp8 (e4m3: 2x the tokens)")  # fmt: skip
    parser.add_argument("--calculate-kv-scales", action="store_true",
                        help="with --kv-cache-dtype fp8: measure the K/V scales the checkpoint lacks on a calibration "
                             "prefill at start-up (instead of 1.0)")  # fmt: skip
    parser.add_argument(
        "--quantization", default=None, help="quantize a dense checkpoint at load (e.g. fp8, int4; see `kvik plugins`)"
    )
    parser.add_argument("--quantized-weights", default="auto", choices=["auto", "dequantize", "quantized"])
    parser.add_argument("--model-impl", default="auto", choices=["auto", "kvik", "transformers"],
                        help="modelling code: kvik's native, transformers' (the fallback), or auto")  # fmt: skip
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    parser.add_argument("--disable-custom-all-reduce", action="store_true",
                        help="tensor parallelism: sum through NCCL only, not the platform's small-message all-reduce")
    parser.add_argument("--deterministic", action="store_true",
                        help="batch-invariant numerics: the same output alone or in any batch (docs/deterministic.md)")  # fmt: skip
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                        help="split each layer over N devices (docs/distributed.md)")  # fmt: skip
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="M",
                        help="split the layers into M stages on their own devices")  # fmt: skip
    parser.add_argument("--distributed-executor-backend", default=None, metavar="NAME",
                        help="who runs the ranks: mp (processes on this host; default), ray, uni")  # fmt: skip
    parser.add_argument("--platform-option", type=platform_option, action="append", default=None,
                        metavar="KEY=VALUE", help=PLATFORM_OPTION_HELP)  # fmt: skip
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule the next step while the GPU runs this one (default: the platform's)",
    )


PLATFORM_OPTION_HELP = (
    "a platform option (repeatable), e.g. onnx_model=auto or num_threads=4 on the CPU; "
    "`kvik plugins` lists each platform's options"
)


def platform_option(text: str) -> tuple[str, object]:
    """``--platform-option KEY=VALUE``: VALUE read as JSON (true, 4, [0, 1]) where it parses, else as text."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def parse_size(value: str | int | None) -> int | None:
    """'2GiB', '512MB', '1e9' or an int → bytes."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "k": 1 << 10,
        "m": 1 << 20,
        "g": 1 << 30,
        "b": 1,
    }
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def _max_model_len(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size_arg(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes or a size such as 512MiB or 2GiB, got {text!r}") from None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return dict(
        model=args.model,
        tokenizer=args.tokenizer,
        revision=args.revision,
        download_dir=args.download_dir,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales,
        quantization=args.quantization,
        quantized_weights=args.quantized_weights,
        model_impl=args.model_impl,
        enforce_eager=args.enforce_eager,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        deterministic=args.deterministic,
        async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        platform_options=dict(args.platform_option or []),
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvik.config import EngineConfig
    from kvik.sampling_params import SamplingParams

    # Check every flag before anything heavy is imported or loaded: a typo costs milliseconds, not a model load.
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, top_p=args.top_p, top_k=args.top_k
    )
    # One stream: a one-request batch limit also sizes the KV pool for one context, not a server's worth.
    config = EngineConfig.from_kwargs(**engine_kwargs(args), max_num_seqs=1)
    if args.system and not args.chat:
        raise ValueError("--system needs --chat (the system message goes through the chat template)")

    from kvik.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    prompt: str | list[int] = args.prompt
    if args.chat:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.prompt})
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    engine.add_request("cli", prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            text = output.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def _cmd_run_batch(args: argparse.Namespace) -> int:
    from kvik.entrypoints.batch import run_batch_command

    return run_batch_command(args, engine_kwargs(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvik_server.cli import exit_process, run_server

    exit_process(int(run_server(args) or 0))  # a stopped server exits at once (see exit_process)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvik", description="kvik: a plugin-based LLM inference engine")
    parser.add_argument("--version", action="version", version=f"kvik {__version__}")
    parser.add_argument(
        "--log-level",
        dest="global_log_level",
        type=_log_level_arg,
        default=None,
        help=f"one of {', '.join(LOG_LEVELS)} (default: $KVIK_LOG_LEVEL, else info for serve, warning otherwise); "
        "honoured by every subcommand",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list discovered platforms, backends, quant methods and models")
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("env", help="show the torch / device environment")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("generate", help="generate text for one prompt, streaming it")
    p.add_argument("prompt")
    add_engine_arguments(p)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("run-batch", help="run an OpenAI Batch input file (JSONL) through the engine")
    add_engine_arguments(p)
    from kvik.entrypoints.batch import add_batch_arguments

    add_batch_arguments(p)
    p.set_defaults(func=_cmd_run_batch)

    p = sub.add_parser("export", help="write a model in another runtime's format (onnx: ONNX Runtime GenAI)")
    p.add_argument("target", choices=["onnx"], help="onnx: an ONNX Runtime GenAI model folder")
    p.add_argument(
        "--model", "-m", default=None, help="checkpoint directory, .gguf file or Hub id (default: bundled SmolLM2)"
    )
    p.add_argument("--output", "-o", required=True, help="folder to write (must be new or empty)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int4", "int8"],
                   help="auto: int4 (MatMulNBits) for a quantized source, else fp32")  # fmt: skip
    p.add_argument("--execution-provider", default="cpu", choices=["cpu", "cuda", "dml", "webgpu"])
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the greedy round trip against kvik (on by default for cpu exports)")  # fmt: skip
    p.add_argument("--builder-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the ONNX Runtime GenAI builder's --extra_options (repeatable)")  # fmt: skip
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    p.add_argument("--download-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the checkpoint's code")
    p.set_defaults(func=_cmd_export)

    try:
        from kvik_server.cli import add_serve_arguments
    except ImportError:
        p = sub.add_parser("serve", help="OpenAI-compatible server (needs kvik-server)")
        p.set_defaults(func=lambda a: _missing_server())
    else:
        p = sub.add_parser("serve", help="start the OpenAI-compatible server")
        add_serve_arguments(p)
        p.set_defaults(func=_cmd_serve)
    return parser


def _cmd_export(args: argparse.Namespace) -> int:
    from kvik.entrypoints.export_onnx import export_onnx
    from kvik.models.default import default_model

    options = {}
    for item in args.builder_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--builder-option takes KEY=VALUE, got {item!r}")
        options[key] = value
    print(f"kvik export onnx: building {args.output} (this takes a minute or more) ...", file=sys.stderr, flush=True)
    report = export_onnx(args.model or default_model(), args.output, precision=args.precision,
                         execution_provider=args.execution_provider, verify=args.verify, revision=args.revision,
                         download_dir=args.download_dir, trust_remote_code=args.trust_remote_code,
                         builder_options=options)  # fmt: skip
    print(report.summary())
    return 0 if report.round_trip is None or report.round_trip.identical or report.precision != "fp32" else 1


def _missing_server() -> int:
    print("kvik serve needs the server: pip install 'kvik[server]' (or pip install -e server)", file=sys.stderr)
    return 2


def resolve_log_level(args: argparse.Namespace, default: str) -> str:
    """``kvik --log-level X sub`` or ``kvik sub --log-level X`` (serve has its own flag), else
    $KVIK_LOG_LEVEL, else ``default``; written back to ``args.log_level`` for the subcommand."""
    env = os.environ.get("KVIK_LOG_LEVEL")
    level = getattr(args, "global_log_level", None) or getattr(args, "log_level", None) or env or default
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"KVIK_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    args.log_level = level.lower()
    return args.log_level


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(resolve_log_level(args, "info" if args.command == "serve" else "warning"))
        return int(args.func(args))
    except (ValueError, TypeError) as exc:
        # User errors: one clear line, no traceback (--log-level debug shows it).
        logging.getLogger("kvik").debug("error", exc_info=True)
        print(f"kvik: error: {cli_spelling(str(exc), parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from kvik.plugins.registry import PluginError

        if isinstance(exc, PluginError):
            print(f"kvik: error: {cli_spelling(str(exc), parser)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
