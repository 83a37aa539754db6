"""Prometheus metrics of the inference service (own registry, served over HTTP)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inference_service.engine.engine import StepStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "kuiper_inference_"
        self.requests = Counter(
            p + "requests",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Request arrival to first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between streamed token messages.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            p + "queue_time_seconds",
            "Time waiting before the first scheduling step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens accepted.", registry=r)
        self.generation_tokens = Counter(
            p + "generation_tokens", "Tokens generated and streamed.", registry=r
        )
        self.running = Gauge(p + "running_sequences", "Sequences holding KV blocks.", registry=r)
        self.waiting = Gauge(p + "waiting_sequences", "Sequences waiting to run.", registry=r)
        self.batch_size = Histogram(
            p + "batch_size", "Sequences per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.kv_used = Gauge(p + "kv_blocks_used", "KV cache blocks in use.", registry=r)
        self.kv_total = Gauge(p + "kv_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.prefix_hits = Gauge(
            p + "prefix_cache_hit_blocks",
            "KV blocks reused from the prefix cache (cumulative).",
            registry=r,
        )
        self.prefix_queries = Gauge(
            p + "prefix_cache_queried_blocks",
            "Full prompt blocks looked up in the prefix cache (cumulative).",
            registry=r,
        )
        self.preemptions = Gauge(
            p + "preemptions", "Sequences preempted for KV space (cumulative).", registry=r
        )

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
