"""``kvik export onnx``: a checkpoint kvik runs, written as an ONNX Runtime GenAI model folder, and checked.

The graph is built by ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``, the
field's tool for decoder LLMs): ``model.onnx`` with explicit ``past_key_values.N.key/value`` inputs and
``present.N.key/value`` outputs, GroupQueryAttention and rotary contrib ops, ``genai_config.json`` and the
tokenizer, so ``onnxruntime_genai.Model(folder)`` runs it as is. kvik's part is what the builder lacks:

- any source kvik loads: a checkpoint folder, a Hub id, or a GGUF file of any quantization type (the
  builder reads only float GGUF). A non-dense source is first written as a dense float32 safetensors
  checkpoint through kvik's own format readers, the ones the engine loads it with;
- a precision chosen from the source: ``int4`` (MatMulNBits, asymmetric, block 32: the layout of GGUF's
  Q4_0/Q4_1 blocks) when the source is quantized, else ``fp32``; GGUF Q4_0 / Q4_1 / Q8_0 weights keep their
  own blocks, bit for bit (:mod:`kvik.entrypoints.onnx_exact_blocks`), instead of the builder's re-quantization;
- ``onnx.checker`` on the result, and a greedy round trip: ONNX Runtime's tokens against kvik's torch
  path on the same weights (identical expected for ``fp32``; for ``int4`` the agreement is reported).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvik.entrypoints.onnx_exact_blocks import carry_blocks

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int4", "int8")
# Bumped whenever an export of the same source and builder comes out different (caches key on it).
# 2: GGUF Q4_0 / Q4_1 / Q8_0 blocks carried exactly (onnx_exact_blocks).
EXPORT_LAYOUT = 2
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
# Prompts for the round trip: token ids, so the check does not depend on the tokenizer's coverage.
CHECK_PROMPT_LENGTHS = (5, 17, 40)
CHECK_NEW_TOKENS = 16


@dataclass
class RoundTrip:
    """ONNX Runtime's greedy tokens against kvik's on the same prompts."""

    prompts: list[list[int]]
    kvik_tokens: list[list[int]]
    onnx_tokens: list[list[int]]

    @property
    def identical(self) -> bool:
        return self.kvik_tokens == self.onnx_tokens

    def first_divergences(self) -> list[int | None]:
        """Per prompt, the index of the first differing new token (None where all agree)."""
        return [next((i for i, (a, b) in enumerate(zip(k, o, strict=False)) if a != b), None)
                for k, o in zip(self.kvik_tokens, self.onnx_tokens, strict=True)]  # fmt: skip


@dataclass
class ExportReport:
    output: Path
    precision: str
    execution_provider: str
    source_quantization: str | None
    seconds: float
    checker_passed: bool
    round_trip: RoundTrip | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"exported {self.output} ({self.precision}, {self.execution_provider}) in {self.seconds:.1f} s; "
                 f"onnx.checker: {'passed' if self.checker_passed else 'FAILED'}"]  # fmt: skip
        if self.round_trip is not None:
            rt = self.round_trip
            if rt.identical:
                lines.append(f"round trip: ONNX Runtime's greedy tokens equal kvik's on {len(rt.prompts)} prompts "
                             f"x {CHECK_NEW_TOKENS} tokens")  # fmt: skip
            else:
                lines.append(f"round trip: tokens differ from kvik's; first divergence per prompt: "
                             f"{rt.first_divergences()} (of {CHECK_NEW_TOKENS})")  # fmt: skip
        lines += self.notes
        return "\n".join(lines)


def _require_builder() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"kvik export onnx needs ONNX Runtime GenAI and onnx ({exc.name} is missing): pip install 'kvik[onnx]'"
        ) from None


def dense_checkpoint(fmt: Any, folder: Path) -> Path:
    """Write ``fmt``'s model as a float32 safetensors checkpoint (config, weights, tokenizer) in ``folder``."""
    import torch
    from safetensors.torch import save_file

    config = fmt.load_hf_config()
    arch = getattr(config, "architectures", None)
    if not arch:  # GGUF configs name no class; the builder dispatches on it
        config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    config.dtype = torch.float32
    config.save_pretrained(folder)
    fmt.load_tokenizer().save_pretrained(folder)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, number = 0, 0

    def flush() -> None:
        nonlocal shard, size, number
        if shard:
            name = f"model-{number:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size, number = {}, 0, number + 1

    for name, tensor in fmt.iter_weights(quantized=False):
        shard[name] = tensor.detach().to(torch.float32).contiguous()
        size += shard[name].numel() * 4
        if size >= 2 << 30:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def _run_builder(source: Path, output: Path, precision: str, provider: str, options: dict[str, str]) -> None:
    """The builder in a child process: it prints a line per layer (progress), and its memory goes with it."""
    cache = Path(tempfile.mkdtemp(prefix="kvik_onnx_cache_"))
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(output),
            "-p", precision, "-e", provider, "-c", str(cache)]  # fmt: skip
    if options:
        argv += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"ONNX Runtime GenAI's builder failed (exit {proc.returncode}):\n{tail}")


def check_onnx(model_path: Path) -> None:
    """``onnx.checker`` on the exported graph (by path: its weights are external data).

    The builder emits one ONNX Runtime op in the default domain, ``SimplifiedLayerNormalization`` (RMSNorm,
    which ONNX itself only gained in opset 23); the checker knows no schema for it and would stop there, so
    its ONNX Runtime signature is registered first and everything else is checked against ONNX's own.
    The ``com.microsoft`` contrib ops (GroupQueryAttention, ...) are validated by ONNX Runtime when it loads
    the model, as the round trip does.
    """
    import onnx
    from onnx import defs

    if not defs.has("SimplifiedLayerNormalization"):
        param = defs.OpSchema.FormalParameter
        attr = defs.OpSchema.Attribute
        floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
        defs.register_schema(
            defs.OpSchema(
                "SimplifiedLayerNormalization",
                "",
                1,
                doc="ONNX Runtime's RMSNorm: Y = X / sqrt(mean(X^2) + epsilon) * scale",
                inputs=[param("X", "T"), param("scale", "V")],
                outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=defs.OpSchema.FormalParameterOption.Optional)],
                type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
                attributes=[attr("axis", defs.OpSchema.AttrType.INT, "", required=False),
                            attr("epsilon", defs.OpSchema.AttrType.FLOAT, "", required=False),
                            attr("stash_type", defs.OpSchema.AttrType.INT, "", required=False)],
            )
        )  # fmt: skip
    onnx.checker.check_model(str(model_path))


def onnx_greedy(folder: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """ONNX Runtime GenAI's greedy continuation of each prompt (EOS ignored)."""
    import onnxruntime_genai as og

    try:
        model = og.Model(str(folder))
    except RuntimeError as exc:
        # Seen with int4 exports of tied-embedding models given --builder-option shared_embeddings=true and
        # asymmetric blocks: the builder writes a graph ONNX Runtime 1.32 refuses. One line, not a traceback.
        raise ValueError(
            f"ONNX Runtime could not load the exported model in {folder}: {str(exc).splitlines()[0][:300]}. "
            "If this is an int4 export of a model with tied embeddings, leave shared_embeddings at false or "
            "export with --precision fp32"
        ) from None
    outputs = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        length = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        outputs.append(tokens[:new_tokens])
    return outputs


def round_trip(model: str, folder: Path, vocab_size: int, trust_remote_code: bool = False) -> RoundTrip:
    """Greedy tokens of kvik (float32, CPU, weights dequantized) and of the ONNX folder on the same prompts."""
    import numpy as np

    import kvik

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab_size, size=n).tolist() for n in CHECK_PROMPT_LENGTHS]
    llm = kvik.LLM(model, device="cpu", dtype="float32", quantized_weights="dequantize", max_model_len=256,
                   num_kv_blocks=64, max_num_seqs=len(prompts), trust_remote_code=trust_remote_code)  # fmt: skip
    params = kvik.SamplingParams(temperature=0.0, max_tokens=CHECK_NEW_TOKENS, ignore_eos=True, detokenize=False)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    return RoundTrip(prompts, ours, onnx_greedy(folder, prompts, CHECK_NEW_TOKENS))


def export_onnx(
    model: str,
    output: str | Path,
    precision: str = "auto",
    execution_provider: str = "cpu",
    verify: bool = True,
    revision: str | None = None,
    download_dir: str | None = None,
    trust_remote_code: bool = False,
    builder_options: dict[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` to ``output`` (a folder ONNX Runtime GenAI loads); see the module docstring."""
    from kvik.models.hub import resolve_model_path
    from kvik.models.model_config import resolve_format

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise ValueError(
            f"execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, got {execution_provider!r}"
        )
    _require_builder()
    start = time.perf_counter()
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"output folder {output} is not empty; choose a new one")
    path = resolve_model_path(model, revision, download_dir)
    fmt = resolve_format(path, trust_remote_code=trust_remote_code)
    quantization = fmt.quantization()
    source_quant = quantization[0] if quantization else None
    hf_config = fmt.load_hf_config()
    if precision == "auto":
        precision = "int4" if source_quant else "fp32"
    options = dict(builder_options or {})
    notes: list[str] = []
    if precision == "int4" and source_quant:
        # GGUF's blocks hold 32 weights with a scale (and, Q4_1, a minimum): MatMulNBits' asymmetric block-32
        # layout. The builder re-quantizes the dequantized values; carry_blocks then puts back the source's own
        # blocks where they are exactly block-32 affine, and the rest stay re-quantized (close, not lossless).
        options.setdefault("block_size", "32")
        options.setdefault("is_symmetric", "false")
    if precision == "int4" and options.get("is_symmetric", "true").lower() == "false" and getattr(
        hf_config, "tie_word_embeddings", False
    ):
        # The builder shares a tied model's embedding with its int4 lm_head by default, and with asymmetric
        # blocks it wires the quantized weight into the embedding's Gather without its scales (ONNX Runtime
        # 1.32 then refuses the graph: "/model/embed_tokens/Reshape" typed uint8). Unshared, the lm_head is
        # int4 MatMulNBits and the embedding a float Gather, which loads.
        options.setdefault("shared_embeddings", "false")
    with tempfile.TemporaryDirectory(prefix="kvik_onnx_src_") as scratch:
        if fmt.name == "safetensors" and not source_quant:
            source = Path(path)
        else:
            logger.info("writing %s as a dense float32 checkpoint for the builder", path)
            source = dense_checkpoint(fmt, Path(scratch))
        logger.info("building %s (%s, %s) ...", output, precision, execution_provider)
        _run_builder(source, output, precision, execution_provider, options)
    if precision == "int4" and source_quant:
        # The builder re-quantized the dequantized values onto a grid of its own; where the source's blocks are
        # exactly block-32 affine (GGUF Q4_0 / Q4_1 / Q8_0), they replace its weights bit for bit.
        carried = carry_blocks(output, fmt.iter_weights(quantized=True)) if options["block_size"] == "32" else []
        notes.extend(f"note: {line}" for line in carried)
        if not carried:
            notes.append(f"note: {source_quant} weights were dequantized and re-quantized to MatMulNBits int4 "
                         "(block 32, asymmetric); the result is close to the source, not bit-exact")  # fmt: skip
    check_onnx(output / "model.onnx")
    report = ExportReport(output, precision, execution_provider, source_quant, time.perf_counter() - start, True,
                          notes=notes)  # fmt: skip
    if verify:
        if execution_provider != "cpu":
            report.notes.append(
                f"round trip skipped: it runs ONNX Runtime on the CPU, the export targets {execution_provider}"
            )
        else:
            vocab = int(getattr(hf_config, "vocab_size", 0) or 0)
            report.round_trip = round_trip(path, output, vocab, trust_remote_code)
    report.seconds = time.perf_counter() - start
    return report
