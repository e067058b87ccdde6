"""LLMEngine: schedule → execute → update, one step at a time.

With async scheduling (when the runner supports it and the config asks for it)
the engine keeps one step in flight: each ``step()`` schedules and launches step
n+1, then waits for step n's samples and does its host work (update, stop
checks, detokenization) while the device runs step n+1. Outputs are the same as
in the synchronous loop; ``step()`` just reports each step's outputs one call
later. Requests whose sampling reads their previous tokens on the host
(penalties, bad words, grammars) run synchronously while they are running.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from operator import attrgetter
from typing import Any

import numpy as np

from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
from kvik.engine.config_resolution import resolve_config
from kvik.engine.input_processor import InputProcessor, PreparedRequest
from kvik.engine.memory_planner import MemoryPlan, plan_memory
from kvik.engine.output_processor import OutputProcessor, RequestState, SampleState
from kvik.engine.progress import LoadProgress, format_bytes, format_tokens, step
from kvik.executor import Executor, create_executor
from kvik.executor.base import RankMemory, RunnerCapabilities
from kvik.executor.profiling import ProfileSummary
from kvik.lora.registry import LoRARegistry
from kvik.lora.request import LoRARequest
from kvik.outputs import RequestMetrics, RequestOutput
from kvik.platforms.selector import resolve_platform
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.pooling.finish import finish_pooled_rows
from kvik.pooling.outputs import PoolingOutput, PoolingRequestOutput
from kvik.pooling.params import PoolingParams
from kvik.pooling.setup import PoolerSetup, model_pooler_setup
from kvik.request import Request, RequestStatus
from kvik.sampling_params import SamplingParams
from kvik.scheduling.kv_cache_groups import shared_window
from kvik.scheduling.output import SchedulerOutput
from kvik.spec_decode.backoff import SpecBackoff
from kvik.spec_decode.config import SpeculativeConfig
from kvik.spec_decode.proposer import Proposer
from kvik.structured.manager import StructuredOutputManager
from kvik.worker.interface import ModelRunner, StepHandle

logger = logging.getLogger(__name__)
# Per-request reads in the step, through map (no Python frame per request).
_reads_output_history = attrgetter("reads_output_history")
_pooling_params = attrgetter("pooling_params")
_request_id = attrgetter("request_id")


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps: int
    last_step_time: float  # time.monotonic() of the last step that did work
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens verified since start
    spec_accepted_tokens: int = 0  # of which accepted
    spec_accepted_per_position: tuple[int, ...] = ()  # [i]: verify steps that accepted draft i
    spec_drafted_per_position: tuple[int, ...] = ()  # [i]: verify steps that drafted at least i + 1 tokens
    spec_method: str = ""  # the speculative method ("" when off)
    spec_disabled_steps: int = 0  # steps that proposed nothing because the batch reached disable_by_batch_size
    kv_cache_tokens: int = 0  # capacity: tokens the KV cache holds (blocks x block size)
    kv_cache_dtype: str = ""  # what it holds: the model dtype (kv_cache_dtype="auto") or "fp8_e4m3"

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    """Owns the platform's model runner, the scheduler and the output processor."""

    def __init__(self, config: EngineConfig, manager: PluginManager | None = None) -> None:
        from kvik.scheduling.scheduler import Scheduler

        progress = LoadProgress.begin()  # reports the steps below; ended by progress.finish()
        self.manager = manager or get_plugin_manager()
        if config.model is None:
            from kvik.models.default import default_model

            config = replace(config, model=default_model())  # the user's object is never changed
        assert config.model is not None
        self.platform = resolve_platform(config.device, self.manager)
        with step("reading the model's config and tokenizer"):
            resolution = resolve_config(config, self.platform, self.manager)
            self.config: ResolvedConfig = resolution.config
            self.model_config: ModelConfig = resolution.model_config
            self.format = resolution.model_format
            self.tokenizer: Any = self._load_tokenizer()
        for note in resolution.notes:
            logger.info("configuration: %s", note)
        logger.info(
            "resolved configuration (model dtype %s, max_model_len %d%s):\n%s",
            self.model_config.dtype,
            self.model_config.max_model_len,
            ", fitted to the KV cache" if self.config.fit_max_model_len else "",
            resolution.report(),
        )
        # The ranks' runners (kvik.executor): in this process for one device, else worker processes.
        self.executor: Executor = create_executor(self.config, self.model_config, self.platform, self.manager)
        self.pooler_setup: PoolerSetup | None = None  # the checkpoint's pooler when runner="pooling"
        self.pooling_task = "embed"
        self._weight_bytes = 0  # all ranks' weights, for the ready line
        try:
            with step("loading the model"):
                self.executor.start()
            caps = self.executor.capabilities
            # The runner in this process (one device), for tests and tools; None with worker processes.
            self.runner: ModelRunner | None = self.executor.local_runner
            if self.config.runner == "pooling":
                from kvik.pooling.architectures import is_classifier_architecture

                if not caps.pooling:
                    raise ValueError(f"the {self.platform.name} platform's model runner cannot run pooling models yet")
                self.pooler_setup = model_pooler_setup(self.config.model, self.model_config.architecture)
                self.pooling_task = "classify" if is_classifier_architecture(self.model_config.architecture) else "embed"
                logger.info("pooling: %s (%s)", self.pooler_setup, self.pooling_task)
            if self.config.deterministic and not caps.deterministic:
                raise ValueError(
                    f"deterministic=True is not supported by the {self.platform.name} platform's model runner "
                    "(it has no batch-invariant kernels); leave deterministic off on this platform"
                )
            self.proposer: Proposer | None = None
            if self.config.speculative_config is not None:
                self.proposer = self._make_proposer(self.config.speculative_config, caps)
            # Adapters requests may name (checked against the loaded model's projections); None: LoRA off.
            self.loras: LoRARegistry | None = None
            if self.config.enable_lora:
                if not caps.lora or self.runner is None:
                    raise ValueError(
                        f"enable_lora is not supported by the {self.platform.name} platform's model runner"
                        + (" with more than one rank (tensor/pipeline parallelism)" if self.runner is None else "")
                    )
                self.loras = LoRARegistry(self.runner)
            with step("profiling memory"):
                self.memory_plan = self._plan_memory()
            self.model_config.max_model_len = self.memory_plan.max_model_len
            with step("allocating the KV cache"):
                self.executor.initialize_kv_cache(self.memory_plan.num_blocks)
        except BaseException:
            self.executor.shutdown()  # no worker process outlives a failed start
            raise
        cfg = self.config
        self.async_scheduling = cfg.async_scheduling and caps.async_scheduling
        if cfg.async_scheduling and not self.async_scheduling:
            logger.info("async scheduling is off: the %s model runner does not support it", self.platform.name)
        prefix_caching = cfg.enable_prefix_caching and caps.prefix_caching
        if cfg.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching is off: the %s model runner keeps K/V per request", self.platform.name)
        if self.proposer is not None and self.async_scheduling and bool(getattr(self.proposer, "drafter", "")):
            # A drafter on the runner drafts inside each step, from that step's tokens: every step waits.
            logger.info("async scheduling is off: speculative decoding with a draft model runs synchronously")
            self.async_scheduling = False
        # Host proposers (n-gram, suffix) draft from the previous step's tokens, so a step that drafts
        # runs synchronously; steps that do not (a full batch, a back-off) keep async scheduling.
        self._spec_backoff = SpecBackoff()
        # Steps left running when step() returns: async scheduling keeps the next one queued behind the one
        # being finished; pipeline parallelism keeps a step in each stage but the last (its requests are
        # not in the steps behind it: the scheduler skips requests whose token is in flight).
        stages = cfg.pipeline_parallel_size if self.proposer is None else 1
        self._steps_kept = max(int(self.async_scheduling), stages - 1)
        self._in_flight: deque[tuple[SchedulerOutput, StepHandle]] = deque()
        self.scheduler = Scheduler(
            num_blocks=self.memory_plan.num_blocks,
            block_size=cfg.block_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=self.model_config.max_model_len,
            enable_prefix_caching=prefix_caching,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            policy=cfg.scheduling_policy.value,
            long_prefill_token_threshold=cfg.long_prefill_token_threshold,
            max_loras=cfg.max_loras if cfg.enable_lora else 0,
            pending_tokens=self.async_scheduling,
            micro_batches=1 if self.async_scheduling else stages,
            group_windows=self.group_windows,
        )
        if self.loras is not None and self.runner is not None:
            self.scheduler.lora_loading = self.runner.lora_loading
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured = StructuredOutputManager(
            self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids, self.manager
        )
        self.inputs = InputProcessor(
            config=self.config,
            model_config=self.model_config,
            tokenizer=self.tokenizer,
            platform_name=self.platform.name,
            structured_output=caps.structured_output,
            structured=self.structured,
            pooler_setup=self.pooler_setup,
            pooling_task=self.pooling_task,
            check_lora=self.loras.check if self.loras is not None else None,
        )
        self._pooling: dict[str, PreparedRequest] = {}  # live pooling requests
        self._pooled_outputs: list[PoolingRequestOutput] = []  # finished, not yet taken
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._num_steps = 0
        self._spec_disabled_steps = 0
        self._last_step_time = time.monotonic()
        # The cache's element type as the log and /metrics report it (fp8 holds 2x a 16-bit cache's tokens).
        self.kv_cache_dtype_name = self.model_config.dtype if cfg.kv_cache_dtype == "auto" else cfg.kv_cache_dtype
        progress.finish(
            f"model {format_bytes(self._weight_bytes)}, KV cache {format_bytes(self.memory_plan.kv_bytes)} "
            f"{self.kv_cache_dtype_name} "
            f"for {format_tokens(self.memory_plan.kv_tokens)} tokens (max_model_len {self.model_config.max_model_len})"
        )
        logger.info(
            "engine ready: model %s (%s, %s) on %s%s",
            cfg.model,
            self.model_config.architecture,
            self.model_config.dtype,
            self.platform.name,
            f" x {cfg.world_size} ranks (tensor {cfg.tensor_parallel_size} x pipeline "
            f"{cfg.pipeline_parallel_size}, executor {cfg.distributed_executor_backend})" if cfg.world_size > 1 else "",
        )

    # -- set-up --------------------------------------------------------------
    def _group_windows(self, ranks: list[RankMemory]) -> tuple[int | None, ...]:
        """Per KV-cache group, its layers' window: as the runners keep their tables (Gemma's sliding and
        global layers in groups of their own, kvik.scheduling.kv_cache_groups), or for a runner keeping one
        table, the window every layer slides with when they share one (Mistral v0.1, Phi-3-mini-4k). The
        scheduler releases the blocks a window has passed. No window when some layer of a one-table runner
        sees the whole context, or when a draft model reads the same tables."""
        reported = {rank.group_windows for rank in ranks}
        if len(reported) != 1:
            groups = sorted(map(str, reported))
            raise RuntimeError(f"the ranks' runners split the KV cache into different groups: {groups}")
        windows = reported.pop()
        if windows is None:
            drafter = getattr(self.proposer, "drafter", None) is not None
            windows = (None if drafter else shared_window(self.model_config.layer_sliding_windows),)
        if windows == (windows[0],) and windows[0] is not None:
            logger.info("every layer slides with a %d-token window: KV blocks behind it are released", windows[0])
        return windows

    def _make_proposer(self, spec: SpeculativeConfig, caps: RunnerCapabilities) -> Proposer:
        if not caps.speculative_decoding:
            raise ValueError(
                f"speculative decoding is not supported by the {self.platform.name} platform's model runner; "
                "drop speculative_config or use a torch platform (cpu, cuda, rocm)"
            )
        proposer_cls = self.manager.spec_proposers.get(spec.method)
        if getattr(proposer_cls, "drafter", "") and not (caps.drafters and self.runner is not None):
            raise ValueError(
                f"speculative method {spec.method!r} runs a draft model on the runner, which the "
                f"{self.platform.name} platform's model runner does not support"
                + (" with more than one rank (tensor/pipeline parallelism)" if self.runner is None else "")
                + "; use a host-side method (ngram, suffix)" + ("" if self.runner is None else " or a torch platform")
            )
        return proposer_cls(spec)

    def _load_tokenizer(self) -> Any:
        if self.config.tokenizer != self.config.model:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.config.tokenizer, trust_remote_code=self.config.trust_remote_code)
        return self.format.load_tokenizer()

    def _plan_memory(self) -> MemoryPlan:
        """Plan the KV cache on every rank (each holds its own layers and heads); every rank gets the
        smallest rank's block count, since the scheduler hands the same block ids to all of them."""
        config = self.config
        ranks = self.executor.memory()
        self._weight_bytes = sum(r.weight_bytes for r in ranks)
        self.group_windows = self._group_windows(ranks)
        plans = [
            plan_memory(
                total_bytes=rank.total,
                free_bytes=rank.free,
                utilization=config.gpu_memory_utilization,
                weight_bytes=rank.weight_bytes,
                activation_bytes=rank.activation_bytes,
                block_bytes=rank.block_bytes,
                block_size=config.block_size,
                max_model_len=self.model_config.max_model_len,
                max_num_seqs=config.max_num_seqs,
                auto_max_model_len=config.fit_max_model_len,
                kv_cache_memory=config.kv_cache_memory,
                num_blocks=config.num_kv_blocks,
                group_windows=self.group_windows,
                step_tokens=config.max_num_batched_tokens,
            )
            for rank in ranks
        ]
        return min(plans, key=lambda plan: plan.num_blocks)

    # -- requests ------------------------------------------------------------
    def prepare_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> PreparedRequest:
        """Tokenize and validate without touching engine state (safe from any thread): :class:`InputProcessor`."""
        return self.inputs.prepare_request(request_id, prompt, params, priority, arrival_time, lora_request)

    def prepare_pooling_requests(
        self, request_ids: Sequence[str], prompts: Sequence[str | Sequence[int]], params: Sequence[PoolingParams]
    ) -> list[PreparedRequest]:
        return self.inputs.prepare_pooling_requests(request_ids, prompts, params)

    def prepare_pooling_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: PoolingParams,
        arrival_time: float | None = None,
        token_ids: list[int] | None = None,
    ) -> PreparedRequest:
        return self.inputs.prepare_pooling_request(request_id, prompt, params, arrival_time, token_ids)

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params, priority, arrival_time, lora_request))

    def add_prepared(self, prepared: PreparedRequest) -> None:
        if prepared.request_id in self.output_processor.states or prepared.request_id in self._pooling:
            raise ValueError(f"request id {prepared.request_id!r} is already in use")
        if prepared.pooling_params is not None:
            request = Request(
                request_id=prepared.request_id,
                prompt_token_ids=prepared.prompt_token_ids,
                sampling_params=prepared.params,
                max_tokens=1,  # never sampled: it finishes when its prompt is computed
                arrival_time=prepared.arrival_time,
                priority=prepared.priority,
                pooling_params=prepared.pooling_params,
            )
            self.scheduler.add_request(request)
            self._pooling[prepared.request_id] = prepared
            self._prompt_tokens_total += len(prepared.prompt_token_ids)
            return
        params = prepared.params
        room = self.model_config.max_model_len - len(prepared.prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = frozenset() if params.ignore_eos else self.model_config.eos_token_ids
        samples = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.clone(seed=params.seed + index, n=1)
            child_id = prepared.request_id if params.n == 1 else f"{prepared.request_id}#{index}"
            request = Request(
                request_id=child_id,
                prompt_token_ids=prepared.prompt_token_ids,
                sampling_params=child_params,
                max_tokens=max_tokens,
                eos_token_ids=eos,
                arrival_time=prepared.arrival_time,
                priority=prepared.priority,
                lora_request=prepared.lora_request,
            )
            detok = self.output_processor.new_detokenizer(prepared.prompt_token_ids, params)
            samples.append(SampleState(index=index, request=request, detokenizer=detok))
        state = RequestState(
            request_id=prepared.request_id,
            prompt=prepared.prompt,
            prompt_token_ids=prepared.prompt_token_ids,
            params=params,
            samples=samples,
            metrics=RequestMetrics(arrival_time=prepared.arrival_time),
        )
        for sample in samples:
            self.scheduler.add_request(sample.request)
            self.structured.add_request(sample.request.request_id, sample.request.sampling_params)
        self.output_processor.add(state)
        self._prompt_tokens_total += len(prepared.prompt_token_ids)

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        """Abort user requests; returns their final outputs (finish_reason 'abort')."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for request_id in request_ids:
            if self._pooling.pop(request_id, None) is not None:
                self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
                continue
            state = self.output_processor.states.get(request_id)
            if state is None:
                continue
            child_ids = [s.request.request_id for s in state.samples]
            self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
            if self.proposer is not None:
                for sample in state.samples:
                    self.proposer.request_finished(sample.request)
            self.structured.remove(child_ids)
            output = self.output_processor.abort(request_id)
            if output is not None:
                outputs.append(output)
        return outputs

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; False when unknown. Refuses (``LoRAInUseError``) while requests use it.

        Call it from the thread that steps the engine (AsyncLLM does).
        """
        if self.loras is None:
            return False
        in_use = sum(
            1 for r in self.scheduler.requests.values() if r.lora_request is not None and r.lora_request.lora_int_id == lora_int_id
        )
        return self.loras.remove(lora_int_id, in_use)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    @property
    def kv_capacity(self) -> tuple[int, int, bool]:
        """The KV cache the engine planned: (usable blocks, tokens per block, whether prompts share blocks).
        The scheduler's prefix-caching setting, not the config's: runners without it turn it off."""
        kv_cache = self.scheduler.kv_cache
        return kv_cache.pool.num_usable_blocks, kv_cache.block_size, kv_cache.enable_prefix_caching

    @property
    def num_steps_in_flight(self) -> int:
        """Steps launched and not yet finished (between ``step()`` calls: at most ``_steps_kept``)."""
        return len(self._in_flight)

    # -- the step ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance generation by one step; return outputs of requests that progressed.

        Synchronously: schedule, execute and update one step. With async scheduling or pipeline
        parallelism: launch the next step, then finish the oldest in flight (whose outputs are
        returned), leaving ``_steps_kept`` steps running; with nothing to launch, finish the oldest.
        """
        speculate = self.proposer is not None and self._speculates_now()
        if (
            not self._steps_kept
            or speculate
            or (self.async_scheduling and any(map(_reads_output_history, self.scheduler.running)))
        ):
            outputs = self._finish_in_flight()
            if speculate:
                assert self.proposer is not None
                drafted = self._propose(self.proposer)
                if drafted is not None and self.async_scheduling:
                    self._spec_backoff.record(drafted)
            scheduler_output = self._schedule()
            if scheduler_output is None:
                return outputs
            return outputs + self._finish(scheduler_output, self.executor.execute_async(scheduler_output))
        scheduler_output = self._schedule()
        if scheduler_output is not None:
            self._in_flight.append((scheduler_output, self.executor.execute_async(scheduler_output)))
        finished: list[RequestOutput] = []
        while self._in_flight and (len(self._in_flight) > self._steps_kept or scheduler_output is None):
            finished += self._finish(*self._in_flight.popleft())
            if scheduler_output is None:
                break
        return finished

    def _speculates_now(self) -> bool:
        """Whether this step proposes drafts (a step that does runs synchronously)."""
        spec = self.config.speculative_config
        assert spec is not None
        if spec.disable_by_batch_size and len(self.scheduler.running) >= spec.disable_by_batch_size:
            # Under load the batch already fills the device: extra verify positions cost more than
            # they save (vLLM's disable_by_batch_size). The step decodes one token per request.
            self._spec_disabled_steps += 1
            return False
        return not (self.async_scheduling and self._spec_backoff.skip())

    def _propose(self, proposer: Proposer) -> int | None:
        """Draft tokens for the running requests that decode next (none for grammar-constrained ones);
        returns how many requests got drafts (None: no request decodes next)."""
        spec = self.config.speculative_config
        assert spec is not None
        k = spec.num_speculative_tokens
        decoding = [
            r
            for r in self.scheduler.running
            if r.num_computed_tokens == r.num_tokens - 1
            and not r.num_output_placeholders
            and r.sampling_params.guided is None
        ]
        if not decoding:
            return None
        room = [min(k, r.max_tokens - r.num_output_tokens - 1) for r in decoding]
        drafted = 0
        for request, drafts in zip(decoding, proposer.propose(decoding, room), strict=True):
            request.draft_token_ids = list(drafts)
            drafted += bool(drafts)
        return drafted

    def _schedule(self) -> SchedulerOutput | None:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return None
        scheduler_output.structured = self.structured.start_step(scheduler_output)  # overlaps the forward
        return scheduler_output

    def _finish_in_flight(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while self._in_flight:
            outputs += self._finish(*self._in_flight.popleft())
        return outputs

    def _finish(self, scheduler_output: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        """Wait for a launched step's samples and apply them: stop rules, grammars, detokenization."""
        runner_output = handle.result()
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        pooled = [r for r in updated if r.pooling_params is not None] if any(map(_pooling_params, updated)) else []
        if pooled:
            updated = [r for r in updated if r.pooling_params is None]
        grammar_done = self.structured.accept(updated)
        if grammar_done:
            self.scheduler.finish_requests(grammar_done, RequestStatus.FINISHED_STOPPED)
        outputs, stopped = self.output_processor.process(updated, runner_output, scheduler_output)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
            self.structured.remove(stopped)
        if self.proposer is not None:
            self.proposer.step_finished(runner_output)
            for request in updated:
                if request.is_finished:  # by a stop rule, a stop string or a grammar
                    self.proposer.request_finished(request)
        sampled = runner_output.sampled_token_ids
        # Tokens dropped after a stop aside, each updated request got its sampled tokens.
        self._generation_tokens_total += sum(map(len, map(sampled.get, map(_request_id, updated), repeat(()))))
        self._num_steps += 1
        self._last_step_time = time.monotonic()
        if pooled:
            self._pooled_outputs += self._pooling_outputs(pooled)
        return outputs

    def take_pooling_outputs(self) -> list[PoolingRequestOutput]:
        """The pooling requests finished by the steps so far (each reported once); ``step()``
        returns generation outputs only, so its callers' types stay as they were."""
        taken, self._pooled_outputs = self._pooled_outputs, []
        return taken

    def _pooling_outputs(self, requests: list[Request]) -> list[PoolingRequestOutput]:
        """The step's finished pooling requests, their vectors finished together (finish_pooled_rows)."""
        prepared = [self._pooling.pop(r.request_id) for r in requests]
        params = [p.pooling_params for p in prepared]
        assert self.pooler_setup is not None and all(r.pooled is not None for r in requests)
        assert all(p is not None for p in params)
        rows = [np.asarray(r.pooled) for r in requests]
        vectors = finish_pooled_rows(rows, params, self.pooler_setup.normalize)  # type: ignore[arg-type]
        return [PoolingRequestOutput(p.request_id, PoolingOutput(v), p.prompt_token_ids)
                for p, v in zip(prepared, vectors, strict=True)]  # fmt: skip

    def get_stats(self) -> EngineStats:
        stats = self.scheduler.get_stats()
        return EngineStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_steps=self._num_steps,
            last_step_time=self._last_step_time,
            spec_draft_tokens=stats.spec_draft_tokens,
            spec_accepted_tokens=stats.spec_accepted_tokens,
            spec_accepted_per_position=stats.spec_accepted_per_position,
            spec_drafted_per_position=stats.spec_drafted_per_position,
            spec_method=self.config.speculative_config.method if self.config.speculative_config else "",
            spec_disabled_steps=self._spec_disabled_steps,
            kv_cache_tokens=self.memory_plan.kv_tokens,
            kv_cache_dtype=self.kv_cache_dtype_name,
        )

    def start_profile(self) -> None:
        """Start a torch.profiler window on every rank (:mod:`kvik.executor.profiling`)."""
        self._check_between_steps("start_profile")
        self.executor.start_profile()

    def stop_profile(self, trace_dir: str | None = None) -> list[ProfileSummary]:
        """End it: each rank's time by kernel (and its Chrome trace in ``trace_dir``, else
        ``$KVIK_TORCH_PROFILER_DIR``, when either is set)."""
        self._check_between_steps("stop_profile")
        return self.executor.stop_profile(trace_dir)

    def _check_between_steps(self, what: str) -> None:
        if self._in_flight:  # the ranks answer calls in order: a step's answer is still owed
            raise RuntimeError(f"{what}() needs the engine between steps; {len(self._in_flight)} step(s) in flight")

    def shutdown(self) -> None:
        self._in_flight.clear()
        self.structured.shutdown()
        self.executor.shutdown()

    def check_health(self) -> None:
        """Raise :class:`kvik.executor.ExecutorError` if a rank failed or its process died."""
        self.executor.check_health()
