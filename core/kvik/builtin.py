"""The core's own plugin: torch reference attention, Llama-family models, the transformers fallback,
safetensors, xgrammar.

Registered through the ``kvik`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl
from kvik.pooling.architectures import DECODER_POOLING_ARCHITECTURES, ENCODER_ARCHITECTURES

KVIK_PLUGIN_API = ">=2.0,<3"

# (module under kvik.models, architecture class): one file per architecture
_NATIVE = (
    ("qwen3", "Qwen3ForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
    ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "Gemma3ForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
)


@hookimpl
def kvik_register_attention_backends(register: RegisterFn) -> None:
    register("torch_ref", "kvik.attention.torch_ref:TorchRefAttentionBackend")


@hookimpl
def kvik_register_models(register: RegisterFn) -> None:
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        register(arch, f"kvik.models.llama:{arch}")
    for module, arch in _NATIVE:
        register(arch, f"kvik.models.{module}:{arch}")
    for arch in DECODER_POOLING_ARCHITECTURES:  # embedders and sequence classifiers (kvik.pooling)
        register(arch, f"kvik.models.pooling_models:{arch}")
    for arch in ENCODER_ARCHITECTURES:  # BERT-family / ModernBERT embedders and cross-encoders
        register(arch, f"kvik.models.{'modernbert' if arch.startswith('ModernBert') else 'bert'}:{arch}")
    # Any other causal LM transformers can build (used when no native architecture matches).
    register("TransformersForCausalLM", "kvik.models.transformers_fallback:TransformersForCausalLM")


@hookimpl
def kvik_register_model_formats(register: RegisterFn) -> None:
    register("safetensors", "kvik.models.safetensors_format:SafetensorsFormat")


@hookimpl
def kvik_register_structured_output_backends(register: RegisterFn) -> None:
    register("xgrammar", "kvik.structured.xgrammar_backend:XGrammarBackend")  # needs `pip install xgrammar`


@hookimpl
def kvik_register_executors(register: RegisterFn) -> None:
    register("uni", "kvik.executor.uni:UniExecutor")
    register("mp", "kvik.executor.multiproc:MultiprocExecutor")
    register("ray", "kvik.executor.ray_executor:RayExecutor")  # needs `pip install ray`


@hookimpl
def kvik_register_spec_proposers(register: RegisterFn) -> None:
    register("ngram", "kvik.spec_decode.ngram:NgramProposer")
    register("suffix", "kvik.spec_decode.suffix:SuffixProposer")
    register("draft_model", "kvik.spec_decode.draft_model:DraftModelProposer")
    register("eagle", "kvik.spec_decode.eagle:EagleProposer")
    register("eagle3", "kvik.spec_decode.eagle:Eagle3Proposer")
