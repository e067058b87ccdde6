"""Prometheus metrics on a per-app registry (two apps in one process never share counters).

Names mirror vLLM's (``vllm:x`` → ``kvik:x``) so dashboards port with a prefix change.
Engine state (queue lengths, KV usage, token counters) is read from ``engine.get_stats()``
at scrape time; request latencies are observed by the server as it sees them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kvik.outputs import RequestOutput
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvik_server.context import ServingContext

# Seconds; dense below 1 s where CPU-served tiny models and GPUs both live.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Histograms and counters the server records, plus a collector over the engine's stats."""

    def __init__(self, engine: Any, model_name: str, context: ServingContext | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram(
            "kvik:time_to_first_token_seconds", "Time from admission to the first generated token.",
            labels, buckets=_TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "kvik:time_per_output_token_seconds", "(e2e - ttft) / (output tokens - 1) per request.",
            labels, buckets=_TPOT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "kvik:e2e_request_latency_seconds", "Time from admission to the last token.",
            labels, buckets=_E2E_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.success = Counter(
            "kvik:request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry,
        )  # fmt: skip
        self.http = Counter(
            "kvik:http_requests", "HTTP requests by route and status code.",
            ["path", "status"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(_EngineCollector(engine, model_name, context))

    def observe_finished(
        self, output: RequestOutput, arrival: float, first_token: float | None, end: float, model_name: str | None = None
    ) -> None:
        """Record one finished request; times are ``time.time()`` seconds seen by the server.

        ``model_name``: the LoRA adapter it ran under (the label), None for the base model."""
        name = model_name or self.model_name
        self.e2e.labels(name).observe(max(0.0, end - arrival))
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if first_token is not None:
            self.ttft.labels(name).observe(max(0.0, first_token - arrival))
            if num_tokens > 1:
                self.tpot.labels(name).observe(max(0.0, end - first_token) / (num_tokens - 1))
        for completion in output.outputs:
            self.success.labels(name, completion.finish_reason or "unknown").inc()

    def observe_http(self, path: str, status: int) -> None:
        self.http.labels(path, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Reads ``engine.get_stats()`` at scrape time so gauges are never stale."""

    def __init__(self, engine: Any, model_name: str, context: ServingContext | None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.context = context

    def describe(self) -> list[Metric]:
        return []  # dynamic collector: nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.get_stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(value, v)
            return family

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(value, v)
            return family

        yield gauge("kvik:num_requests_running", "Sequences in the engine's running batch.", stats.num_running)
        yield gauge("kvik:num_requests_waiting", "Sequences waiting for admission to the batch.", stats.num_waiting)
        yield gauge("kvik:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", stats.kv_cache_usage)
        capacity = GaugeMetricFamily(
            "kvik:kv_cache_capacity_tokens",
            "Tokens the KV cache holds (blocks x block size), labelled with what it stores (kv_cache_dtype).",
            labels=[*labels, "cache_dtype"],
        )
        capacity.add_metric([*value, stats.kv_cache_dtype], stats.kv_cache_tokens)
        yield capacity
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        yield gauge(
            "kvik:prefix_cache_hit_rate",
            "Prefix-cache hit tokens / queried tokens.",
            hits / queries if queries else 0.0,
        )
        yield counter("kvik:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield counter("kvik:prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield counter("kvik:num_preemptions", "Sequences preempted to free KV blocks.", stats.num_preemptions)
        yield counter("kvik:prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens_total)
        yield counter("kvik:generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        yield counter("kvik:engine_steps", "Engine steps that did work.", stats.num_steps)
        if stats.spec_method:
            yield from _spec_decode_families(stats, labels, value)
        yield gauge(
            "kvik:engine_seconds_since_last_step", "Seconds since the engine last did work.",
            max(0.0, time.monotonic() - stats.last_step_time),
        )  # fmt: skip
        if self.context is not None:
            yield gauge(
                "kvik:num_requests_inflight", "Requests the HTTP server is serving.", len(self.context.inflight)
            )


def _spec_decode_families(stats: Any, labels: list[str], value: list[str]) -> Iterator[Metric]:
    """Speculative decoding (vLLM's spec_decode_* families), labelled with the method."""
    labels, value = [*labels, "method"], [*value, stats.spec_method]

    def family(kind: type, name: str, doc: str, v: float) -> Metric:
        metric = kind(name, doc, labels=labels)
        metric.add_metric(value, v)
        return metric

    drafts, accepted = stats.spec_draft_tokens, stats.spec_accepted_tokens
    yield family(CounterMetricFamily, "kvik:spec_decode_num_draft_tokens", "Draft tokens verified.", drafts)
    yield family(CounterMetricFamily, "kvik:spec_decode_num_accepted_tokens", "Draft tokens accepted.", accepted)
    yield family(
        GaugeMetricFamily, "kvik:spec_decode_acceptance_rate", "Accepted / verified draft tokens since start.",
        accepted / drafts if drafts else 0.0,
    )  # fmt: skip
    yield family(
        CounterMetricFamily, "kvik:spec_decode_disabled_steps",
        "Steps that proposed no drafts because the batch reached disable_by_batch_size.", stats.spec_disabled_steps,
    )  # fmt: skip
    per_position = CounterMetricFamily(
        "kvik:spec_decode_num_accepted_tokens_per_pos",
        "Verify steps that accepted the draft at each position.",
        labels=[*labels, "position"],
    )
    rate = GaugeMetricFamily(
        "kvik:spec_decode_acceptance_rate_per_pos",
        "Accepted / drafted at each draft position since start.",
        labels=[*labels, "position"],
    )
    drafted = stats.spec_drafted_per_position
    for i, n in enumerate(stats.spec_accepted_per_position):
        per_position.add_metric([*value, str(i)], n)
    for i, d in enumerate(drafted):
        accepted_i = stats.spec_accepted_per_position[i] if i < len(stats.spec_accepted_per_position) else 0
        rate.add_metric([*value, str(i)], accepted_i / d if d else 0.0)
    yield per_position
    yield rate
