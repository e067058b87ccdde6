"""Every hook a kvik plugin may implement, in one place.

Plugins are found through the ``kvik`` entry-point group: each entry point
names a module (or object) holding ``@hookimpl`` functions. Registration hooks
take a ``register`` callback, the simonw/llm way, so one plugin can register
several things and the core records which distribution each came from.

Hooks evolve the pluggy way: new arguments may be added (an implementation
may accept any subset), a hook's meaning never changes within one major
``PLUGIN_API_VERSION``. Registration hooks run once per process (and again in
every process kvik starts), so they must do nothing but call ``register``.
A hook that raises registers nothing and is reported with its distribution.
Every hook is listed with its signature in docs/plugins.md (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kvik.config import EngineConfig

PROJECT_NAME = "kvik"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

RegisterFn = Callable[..., None]


@hookspec
def kvik_register_platforms(register: RegisterFn) -> None:
    """Register hardware platforms.

    Call ``register(name, "module:PlatformClass")`` once per platform. The class
    must subclass :class:`kvik.platforms.Platform`; it is imported only when the
    platform is probed or used, so this hook must not import device runtimes.
    Not firstresult: every plugin's implementation is called.
    """


@hookspec
def kvik_register_attention_backends(register: RegisterFn) -> None:
    """Register attention backends.

    Call ``register(name, "module:BackendClass")``; the class subclasses
    :class:`kvik.attention.AttentionBackend`. Platforms list backend names in
    order of preference; users may force one with ``attention_backend=``.
    """


@hookspec
def kvik_register_quantization_methods(register: RegisterFn) -> None:
    """Register quantization formats.

    Call ``register(name, "module:MethodClass")``; the class subclasses
    :class:`kvik.quantization.QuantizationMethod`. ``name`` is the value of
    ``quant_method`` in a checkpoint's ``quantization_config`` (or the format
    name a loader asks for, e.g. ``"gguf"``).
    """


@hookspec
def kvik_register_models(register: RegisterFn) -> None:
    """Register model architectures.

    Call ``register(architecture, "module:ModelClass")`` where ``architecture``
    is a Hugging Face ``architectures`` entry such as ``"LlamaForCausalLM"``;
    the class follows :class:`kvik.models.interface.CausalLM`.
    """


@hookspec
def kvik_register_model_formats(register: RegisterFn) -> None:
    """Register checkpoint formats other than safetensors directories.

    Call ``register(name, "module:FormatClass")``; the class follows
    :class:`kvik.models.formats.ModelFormat` (``matches(path)``, ``load_hf_config``,
    ``iter_weights``, ``load_tokenizer``). The GGUF plugin uses this hook.
    """


@hookspec
def kvik_register_structured_output_backends(register: RegisterFn) -> None:
    """Register structured-output (guided decoding) backends.

    Call ``register(name, "module:BackendClass")``; the class subclasses
    :class:`kvik.structured.backend.StructuredOutputBackend` (compile a JSON
    schema / regex / choice / EBNF grammar, make per-request matchers that
    fill allowed-token bitmasks). It is imported on the first structured
    request, so its library may be an optional dependency. The core
    registers ``"xgrammar"``. Not firstresult.
    """


@hookspec
def kvik_register_tool_parsers(register: RegisterFn) -> None:
    """Register tool-call parsers for the server's ``--tool-call-parser``.

    Call ``register(name, "module:ParserClass")``; the class subclasses
    :class:`kvik_server.tool_parsers.base.ToolParser` (``extract(text, final)``
    splitting model output into content and calls, settled prefixes only, so
    streaming is correct). kvik-server registers ``hermes``, ``llama3_json``,
    ``mistral`` and ``pythonic``. Not firstresult.
    """


@hookspec
def kvik_register_reasoning_parsers(register: RegisterFn) -> None:
    """Register reasoning parsers for the server's ``--reasoning-parser``.

    Call ``register(name, "module:ParserClass")``; the class subclasses
    :class:`kvik_server.reasoning.base.ReasoningParser` (``split(text, final)``
    into reasoning and the answer). kvik-server registers ``deepseek_r1`` and
    ``qwen3``. Not firstresult.
    """


@hookspec
def kvik_register_spec_proposers(register: RegisterFn) -> None:
    """Register speculative-decoding proposers for ``speculative_config={"method": NAME, ...}``.

    Call ``register(name, "module:ProposerClass")``; the class subclasses
    :class:`kvik.spec_decode.proposer.Proposer` (built with the
    :class:`~kvik.spec_decode.config.SpeculativeConfig`; ``propose(requests, num_tokens)``
    returns each request's draft tokens, verified exactly by the target model). A method that
    runs a model on the runner subclasses :class:`kvik.spec_decode.drafter.RunnerDraftProposer`
    and names its :class:`~kvik.spec_decode.drafter.Drafter`. kvik registers ``ngram``,
    ``suffix``, ``draft_model``, ``eagle`` and ``eagle3``. Not firstresult.
    """


@hookspec
def kvik_register_executors(register: RegisterFn) -> None:
    """Register executors for ``distributed_executor_backend=NAME`` (``--distributed-executor-backend``).

    Call ``register(name, "module:ExecutorClass")``; the class subclasses
    :class:`kvik.executor.Executor` (start the ranks, load the model on each, run every
    step on all of them, return rank 0's samples; see its docstring for the contract).
    kvik registers ``uni`` (in process), ``mp`` (worker processes on this host) and
    ``ray`` (Ray actors; needs ``pip install kvik[ray]``). Not firstresult.
    """


@hookspec
def kvik_configure(config: EngineConfig) -> list[str] | None:
    """Inspect or adjust the engine options before they are frozen.

    Called once per engine during config resolution, with a copy of the user's
    ``EngineConfig`` whose unset options already hold the platform's defaults
    (the user's own object is never changed). A plugin may change fields; each
    change is attributed to the plugin in the resolved-config report. Return
    a list of human-readable notes (logged at INFO), or ``None``. Raise
    ``ValueError`` with advice to refuse a configuration.
    """


ALL_HOOKS: tuple[Any, ...] = (
    kvik_register_platforms,
    kvik_register_attention_backends,
    kvik_register_quantization_methods,
    kvik_register_models,
    kvik_register_model_formats,
    kvik_register_structured_output_backends,
    kvik_register_tool_parsers,
    kvik_register_reasoning_parsers,
    kvik_register_spec_proposers,
    kvik_register_executors,
    kvik_configure,
)
