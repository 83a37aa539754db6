"""Prometheus metrics of the inference service (own registry, served over HTTP).

Named and shaped like vLLM's (`vllm:X` is `kuiper_inference_X` here), so its dashboards,
autoscaling rules and gateway settings carry over by swapping the prefix: cumulative values are
Counters, every series carries `model_name`, the KV pool's fill is a 0-1 ratio
(`kv_cache_usage_perc`), requests end in `request_success_total{finished_reason}` with vLLM's
reasons, and latencies are histograms in seconds (inter-token latency once per token).

With several frontend processes (`--frontends N`) prometheus_client runs in multiprocess
mode (inference_service/frontends.py): counters and histograms are summed over the
processes, the engine's gauges (set by frontend 0 alone) are the live maximum, and
`frontend_streams` has one series per process (label `pid`)."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inference_service.engine.engine import StepStats
from inference_service.engine.sequence import FinishReason

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# vLLM's finished_reason values: an end-of-sequence token and a stop string are both "stop".
FINISHED_REASON = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.CANCELLED: "abort",
}


class RereadingCollector:
    """A collector read again when it fails: in multiprocess mode a frontend process that
    starts (its files half written) or is killed mid-write can make one read of the files
    fail, which prometheus_client answers with HTTP 500; a scrape should not fail for it."""

    ATTEMPTS = 3

    def __init__(self, inner: Any, pause_s: float = 0.02) -> None:
        self._inner = inner
        self._pause_s = pause_s

    def collect(self) -> list:
        for attempt in range(self.ATTEMPTS):
            try:
                return list(self._inner.collect())
            except (ValueError, struct.error, OSError):  # ValueError: JSON / UTF-8 of a key
                if attempt == self.ATTEMPTS - 1:
                    raise
                time.sleep(self._pause_s)
        raise AssertionError("unreachable")


class WithModel:
    """A labelled metric whose first label, model_name, is already given: `.labels(*rest)`
    (what count_rejections and the servicer call with (method, code))."""

    def __init__(self, metric: Any, model_name: str) -> None:
        self._metric = metric
        self._model = model_name

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._model, *values)


@dataclass(frozen=True)
class _MetricFactory:
    """Metrics named `prefix + name`, all in one registry, all labelled model_name (the
    unlabelled ones come back as the child for this model)."""

    prefix: str
    registry: CollectorRegistry
    model_name: str

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        c = Counter(self.prefix + name, doc, ["model_name", *labels], registry=self.registry)
        return WithModel(c, self.model_name) if labels else c.labels(self.model_name)

    def gauge(self, name: str, doc: str, multiprocess_mode: str = "livemax") -> Any:
        """multiprocess_mode: how several processes' values combine (multiprocess mode only)."""
        g = Gauge(self.prefix + name, doc, ["model_name"], registry=self.registry,
                  multiprocess_mode=multiprocess_mode)  # fmt: skip
        return g.labels(self.model_name)

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Any:
        h = Histogram(
            self.prefix + name, doc, ["model_name"], buckets=buckets, registry=self.registry
        )
        return h.labels(self.model_name)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = ""):
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        m = _MetricFactory("kuiper_inference_", self.registry, model_name)
        # ---- requests
        self.requests = m.counter(
            "requests", "Finished RPCs by method and gRPC status code.", ["method", "code"]
        )
        self.request_success = m.counter(
            "request_success",
            "Generations that ran to an end, by vLLM's finished_reason (stop, length, abort).",
            ["finished_reason"],
        )
        self.e2e_latency = m.histogram(
            "e2e_request_latency_seconds",
            "RPC arrival to the last token of the stream.",
            REQUEST_BUCKETS,
        )
        self.queue_time = m.histogram(
            "request_queue_time_seconds",
            "Time waiting in the engine before the first scheduling step.",
            REQUEST_BUCKETS,
        )
        self.prefill_time = m.histogram(
            "request_prefill_time_seconds",
            "First scheduling step to the first token.",
            REQUEST_BUCKETS,
        )
        self.decode_time = m.histogram(
            "request_decode_time_seconds", "First token to the last token.", REQUEST_BUCKETS
        )
        self.inference_time = m.histogram(
            "request_inference_time_seconds",
            "First scheduling step to the last token (prefill + decode).",
            REQUEST_BUCKETS,
        )
        self.ttft = m.histogram(
            "time_to_first_token_seconds",
            "RPC arrival to the first generated token.",
            LATENCY_BUCKETS,
        )
        self.itl = m.histogram(
            "inter_token_latency_seconds",
            "Time between generated tokens (a message of k tokens after t s counts k times t/k).",
            LATENCY_BUCKETS,
        )
        self.prompt_length = m.histogram(
            "request_prompt_tokens", "Prompt tokens per request.", LENGTH_BUCKETS
        )
        self.generation_length = m.histogram(
            "request_generation_tokens", "Generated tokens per request.", LENGTH_BUCKETS
        )
        self.prompt_tokens = m.counter("prompt_tokens", "Prompt tokens accepted.")
        self.generation_tokens = m.counter("generation_tokens", "Tokens generated and streamed.")
        # ---- engine
        self.running = m.gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = m.gauge("num_requests_waiting", "Sequences waiting for a batch slot.")
        self.batch_size = m.histogram("batch_size", "Sequences per engine step.", BATCH_BUCKETS)
        self.kv_usage = m.gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.kv_used = m.gauge("kv_blocks_used", "KV cache blocks in use.")
        self.kv_total = m.gauge("kv_blocks_total", "KV cache blocks in the pool.")
        self.prefix_hits = m.counter(
            "prefix_cache_hits", "Prompt tokens whose KV blocks came from the prefix cache."
        )
        self.prefix_queries = m.counter(
            "prefix_cache_queries", "Prompt tokens in full blocks looked up in the prefix cache."
        )
        self.frontend_streams = m.gauge(
            "frontend_streams",
            "Streams open on this frontend process (several frontends: one series each, by pid).",
            multiprocess_mode="liveall",
        )
        self.preemptions = m.counter(
            "num_preemptions", "Sequences preempted (to be recomputed) for KV space."
        )
        self._last: StepStats | None = None
        self.block_size = 1

    def on_step(self, stats: StepStats) -> None:
        """Engine-thread hook (prometheus_client is thread-safe). The engine reports
        cumulative block counts; the counters advance by the difference."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        if stats.kv_blocks_total:
            self.kv_usage.set(stats.kv_blocks_used / stats.kv_blocks_total)
        last = self._last
        hits = stats.prefix_cache_hit_blocks - (last.prefix_cache_hit_blocks if last else 0)
        queried = stats.prefix_cache_queried_blocks - (
            last.prefix_cache_queried_blocks if last else 0
        )
        preempted = stats.num_preemptions - (last.num_preemptions if last else 0)
        self.prefix_hits.inc(max(0, hits) * self.block_size)
        self.prefix_queries.inc(max(0, queried) * self.block_size)
        self.preemptions.inc(max(0, preempted))
        self._last = stats

    def observe_token_gap(self, seconds: float, num_tokens: int) -> None:
        """A message of num_tokens tokens arrived `seconds` after the previous one: each of its
        tokens took seconds / num_tokens."""
        for _ in range(num_tokens):
            self.itl.observe(seconds / num_tokens)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: a free one); returns the port it listens on. In
        multiprocess mode: every frontend process's series, combined."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            registry.register(RereadingCollector(multiprocess.MultiProcessCollector(None)))
        server, _ = start_http_server(port, addr=host, registry=registry)
        return server.server_port
