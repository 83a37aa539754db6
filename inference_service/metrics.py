"""Prometheus metrics of the inference service (own registry, served over HTTP)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inference_service.engine.engine import StepStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class _MetricFactory:
    """Metrics named `prefix + name`, all in one registry."""

    prefix: str
    registry: CollectorRegistry

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(self.prefix + name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(self.prefix + name, doc, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(self.prefix + name, doc, buckets=buckets, registry=self.registry)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        m = _MetricFactory("kuiper_inference_", self.registry)
        self.requests = m.counter(
            "requests", "Finished RPCs by method and gRPC status code.", ["method", "code"]
        )
        self.ttft = m.histogram(
            "time_to_first_token_seconds",
            "Request arrival to first generated token.",
            LATENCY_BUCKETS,
        )
        self.itl = m.histogram(
            "inter_token_latency_seconds", "Time between streamed token messages.", LATENCY_BUCKETS
        )
        self.queue_time = m.histogram(
            "queue_time_seconds", "Time waiting before the first scheduling step.", LATENCY_BUCKETS
        )
        self.prompt_tokens = m.counter("prompt_tokens", "Prompt tokens accepted.")
        self.generation_tokens = m.counter("generation_tokens", "Tokens generated and streamed.")
        self.running = m.gauge("running_sequences", "Sequences holding KV blocks.")
        self.waiting = m.gauge("waiting_sequences", "Sequences waiting to run.")
        self.batch_size = m.histogram("batch_size", "Sequences per engine step.", BATCH_BUCKETS)
        self.kv_used = m.gauge("kv_blocks_used", "KV cache blocks in use.")
        self.kv_total = m.gauge("kv_blocks_total", "KV cache blocks in the pool.")
        self.prefix_hits = m.gauge(
            "prefix_cache_hit_blocks", "KV blocks reused from the prefix cache (cumulative)."
        )
        self.prefix_queries = m.gauge(
            "prefix_cache_queried_blocks",
            "Full prompt blocks looked up in the prefix cache (cumulative).",
        )
        self.preemptions = m.gauge("preemptions", "Sequences preempted for KV space (cumulative).")

    def on_step(self, stats: StepStats) -> None:
        """Engine-thread hook (prometheus_client is thread-safe)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        self.prefix_hits.set(stats.prefix_cache_hit_blocks)
        self.prefix_queries.set(stats.prefix_cache_queried_blocks)
        self.preemptions.set(stats.num_preemptions)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
