"""Prometheus metrics of one server: latency histograms observed by the routes, engine
gauges read from `engine.stats()` at scrape time, token and request counters.

Each app owns its own `CollectorRegistry`, so two apps in one process (tests) never share
or clash. Names use the `hubdeploy:` prefix (vLLM uses `vllm:` the same way).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)

# engine stats field -> (metric name, help). Missing fields are simply not exported.
_ENGINE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("num_running", "hubdeploy:num_requests_running", "Sequences in the running batch."),
    ("num_waiting", "hubdeploy:num_requests_waiting", "Sequences waiting to be scheduled."),
    ("num_preempted", "hubdeploy:num_requests_preempted", "Waiting sequences that were preempted (KV freed) and wait to resume."),
    ("kv_cache_usage", "hubdeploy:kv_cache_usage_perc", "Fraction of KV-cache blocks held by live sequences (0..1)."),
    ("prefix_cache_hit_rate", "hubdeploy:prefix_cache_hit_rate", "Fraction of looked-up prompt blocks found in the prefix cache since start."),
    ("num_kv_blocks", "hubdeploy:kv_cache_blocks", "KV-cache blocks in total."),
    ("lora_resident", "hubdeploy:lora_resident_adapters", "LoRA adapters in device slots now."),
    ("lora_registered", "hubdeploy:lora_loaded_adapters", "LoRA adapters servable (device, host or on disk)."),
)
_ENGINE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("prompt_tokens_total", "hubdeploy:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)."),
    ("generation_tokens_total", "hubdeploy:generation_tokens", "Tokens generated."),
    ("preemptions_total", "hubdeploy:preemptions", "Preemptions since start."),
    ("prefix_cache_queries", "hubdeploy:prefix_cache_queries", "Prompt blocks looked up in the prefix cache."),
    ("prefix_cache_hits", "hubdeploy:prefix_cache_hits", "Prompt blocks found in the prefix cache."),
    ("requests_finished_total", "hubdeploy:engine_requests_finished", "Requests the engine finished."),
    ("requests_aborted_total", "hubdeploy:engine_requests_aborted", "Requests aborted (client gone or error)."),
    ("lora_swaps_total", "hubdeploy:lora_swaps", "LoRA adapters copied into a device slot (swap-ins)."),
)


def _stat(stats: Any, name: str) -> float | None:
    value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time (no background polling thread)."""

    def __init__(self, get_stats: Callable[[], Any]) -> None:
        self._get_stats = get_stats

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        try:
            stats = self._get_stats()
        except Exception:  # a scrape must never fail because the engine is busy or loading
            stats = None
        ready = GaugeMetricFamily("hubdeploy:engine_ready", "1 when the engine is loaded and serving.")
        ready.add_metric([], 0.0 if stats is None else 1.0)
        yield ready
        if stats is None:
            return
        for field, name, help_text in _ENGINE_GAUGES:
            value = _stat(stats, field)
            if value is not None:
                g = GaugeMetricFamily(name, help_text)
                g.add_metric([], value)
                yield g
        for field, name, help_text in _ENGINE_COUNTERS:
            value = _stat(stats, field)
            if value is not None:
                c = CounterMetricFamily(name, help_text)
                c.add_metric([], value)
                yield c


class ServerMetrics:
    """The metrics one app exports; routes call `observe_*`, `/metrics` calls `render`."""

    def __init__(self, model_name: str, get_stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("hubdeploy:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("hubdeploy:inter_token_latency_seconds", "Time between streamed tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("hubdeploy:e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry)
        self.request_prompt_tokens = Histogram(
            "hubdeploy:request_prompt_tokens", "Prompt tokens per finished sequence.", labels,
            buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=self.registry)
        self.request_generation_tokens = Histogram(
            "hubdeploy:request_generation_tokens", "Generated tokens per finished sequence.", labels,
            buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=self.registry)
        self.requests = Counter("hubdeploy:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.errors = Counter("hubdeploy:request_errors", "Requests answered with an error, by HTTP status.",
                              labels + ["status"], registry=self.registry)
        self.registry.register(_EngineCollector(get_stats))
        # the served model's children, resolved once: `labels()` takes a lock and builds a
        # tuple key, which the streaming path would otherwise pay once per token
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)
        self._e2e = self.e2e.labels(model_name)
        self._prompt_tokens = self.request_prompt_tokens.labels(model_name)
        self._generation_tokens = self.request_generation_tokens.labels(model_name)

    def observe_ttft(self, seconds: float, model: str | None = None) -> None:
        (self._ttft if model is None else self.ttft.labels(model)).observe(seconds)

    def observe_itl(self, seconds: float, model: str | None = None, count: int = 1) -> None:
        """`count` equal gaps of `seconds` (several tokens that arrived in one engine output)."""
        child = self._itl if model is None else self.itl.labels(model)
        for _ in range(count):
            child.observe(seconds)

    def observe_finished(self, e2e_s: float, prompt_tokens: int, completion_tokens: int,
                         finish_reason: str | None, model: str | None = None) -> None:
        if model is None:
            self._e2e.observe(e2e_s)
            self._prompt_tokens.observe(prompt_tokens)
            self._generation_tokens.observe(completion_tokens)
        else:
            self.e2e.labels(model).observe(e2e_s)
            self.request_prompt_tokens.labels(model).observe(prompt_tokens)
            self.request_generation_tokens.labels(model).observe(completion_tokens)
        self.requests.labels(model or self.model_name, finish_reason or "abort").inc()

    def observe_error(self, status: int, model: str | None = None) -> None:
        self.errors.labels(model or self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
