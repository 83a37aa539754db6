"""Metric names and types of both services, against the list dashboards and autoscalers rely
on (deploy/k8s, deploy/grafana, docs/deploy.md), and the behaviour of the derived metrics:
cumulative engine counts become Counters that advance by the difference, the KV ratio is
used / total, inter-token latency is observed once per token."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from inference_service.engine.engine import StepStats
from inference_service.metrics import InferenceMetrics

REPO = Path(__file__).resolve().parent.parent

# vLLM's name for each (vllm:X): dashboards and rules carry over by swapping the prefix.
INFERENCE = {
    "kuiper_inference_requests": "counter",  # {method, code}: gRPC status of every RPC
    "kuiper_inference_request_success": "counter",  # {finished_reason}
    "kuiper_inference_e2e_request_latency_seconds": "histogram",
    "kuiper_inference_request_queue_time_seconds": "histogram",
    "kuiper_inference_request_prefill_time_seconds": "histogram",
    "kuiper_inference_request_decode_time_seconds": "histogram",
    "kuiper_inference_request_inference_time_seconds": "histogram",
    "kuiper_inference_time_to_first_token_seconds": "histogram",
    "kuiper_inference_inter_token_latency_seconds": "histogram",
    "kuiper_inference_request_prompt_tokens": "histogram",
    "kuiper_inference_request_generation_tokens": "histogram",
    "kuiper_inference_prompt_tokens": "counter",
    "kuiper_inference_generation_tokens": "counter",
    "kuiper_inference_num_requests_running": "gauge",
    "kuiper_inference_num_requests_waiting": "gauge",
    "kuiper_inference_batch_size": "histogram",
    "kuiper_inference_kv_cache_usage_perc": "gauge",
    "kuiper_inference_kv_blocks_used": "gauge",
    "kuiper_inference_kv_blocks_total": "gauge",
    "kuiper_inference_frontend_streams": "gauge",
    "kuiper_inference_prefix_cache_hits": "counter",
    "kuiper_inference_prefix_cache_queries": "counter",
    "kuiper_inference_num_preemptions": "counter",
}
TOKENIZER = {
    "kuiper_tokenizer_requests": "counter",
    "kuiper_tokenizer_request_seconds": "histogram",
    "kuiper_tokenizer_tokens": "counter",
    "kuiper_tokenizer_active_streams": "gauge",
    "kuiper_tokenizer_open_sequences": "gauge",
    "kuiper_tokenizer_model_info": "gauge",
}


def families(registry: CollectorRegistry) -> dict[str, str]:
    return {m.name: m.type for m in registry.collect()}


SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def series_names(registry: CollectorRegistry) -> set[str]:
    """The series names a scrape shows (labelled families have none until first use)."""
    return {n + suf for n, t in families(registry).items() for suf in SUFFIXES[t]}


def exported_series() -> set[str]:
    """Every series name either service exposes."""
    from tokenizer_service.server import Metrics

    tok = CollectorRegistry()
    Metrics(tok, "tok")
    return series_names(InferenceMetrics(model_name="m").registry) | series_names(tok)


def test_inference_metric_names_and_types() -> None:
    metrics = InferenceMetrics(model_name="m")
    assert families(metrics.registry) == INFERENCE
    # Every series carries the model name (vLLM's model_name label).
    for fam in metrics.registry.collect():
        for sample in fam.samples:
            assert sample.labels.get("model_name") == "m", sample


def test_tokenizer_metric_names_and_types() -> None:
    from tokenizer_service.server import Metrics

    registry = CollectorRegistry()
    Metrics(registry, "tok")
    assert families(registry) == TOKENIZER


def stats(**kw: int) -> StepStats:
    base = dict(num_running=0, num_waiting=0, batch_size=0, num_batched_tokens=0,
                kv_blocks_used=0, kv_blocks_total=100, prefix_cache_hit_blocks=0,
                prefix_cache_queried_blocks=0, num_preemptions=0, step_time_s=0.0)  # fmt: skip
    base.update(kw)
    return StepStats(**base)


def value(metrics: InferenceMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, {"model_name": "m", **labels})
    return 0.0 if got is None else got


def test_engine_cumulative_counts_become_counters_in_tokens() -> None:
    m = InferenceMetrics(model_name="m")
    m.block_size = 16
    m.on_step(stats(prefix_cache_hit_blocks=2, prefix_cache_queried_blocks=5, num_preemptions=1))
    m.on_step(stats(prefix_cache_hit_blocks=2, prefix_cache_queried_blocks=5, num_preemptions=1))
    m.on_step(stats(prefix_cache_hit_blocks=7, prefix_cache_queried_blocks=9, num_preemptions=3,
                    kv_blocks_used=25, num_running=3, num_waiting=4))  # fmt: skip
    assert value(m, "kuiper_inference_prefix_cache_hits_total") == 7 * 16
    assert value(m, "kuiper_inference_prefix_cache_queries_total") == 9 * 16
    assert value(m, "kuiper_inference_num_preemptions_total") == 3
    assert value(m, "kuiper_inference_kv_cache_usage_perc") == 0.25
    assert value(m, "kuiper_inference_num_requests_running") == 3
    assert value(m, "kuiper_inference_num_requests_waiting") == 4


def test_inter_token_latency_counts_each_token() -> None:
    m = InferenceMetrics(model_name="m")
    m.observe_token_gap(0.3, 3)  # three tokens in one message, 0.3 s after the last one
    m.observe_token_gap(0.05, 1)
    name = "kuiper_inference_inter_token_latency_seconds"
    assert value(m, name + "_count") == 4
    assert value(m, name + "_sum") == pytest.approx(0.35)
    assert value(m, name + "_bucket", le="0.1") == 4  # each 0.1 s, not one 0.3 s gap


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    """Every kuiper_* series a dashboard panel queries exists (with its suffix)."""
    exported = exported_series()
    for path in sorted((REPO / "deploy" / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
        assert exprs, path
        # template variables' queries too (label_values(METRIC, label))
        exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
        for expr in exprs:
            for name in re.findall(r"\bkuiper_[a-z0-9_]+", expr):
                assert name in exported, f"{path.name}: {name} is not exported"


def test_a_half_written_multiprocess_file_is_read_again_not_a_failed_scrape(tmp_path) -> None:
    """prometheus_client's multiprocess reader fails on a file cut mid-entry (a frontend
    starting, or killed while writing); the scrape reads again instead of answering 500."""
    import shutil
    import subprocess
    import sys

    from prometheus_client import generate_latest, multiprocess

    from inference_service.metrics import RereadingCollector

    code = ("from prometheus_client import Counter; "
            "Counter('kuiper_test_events', 'doc', ['kind']).labels('long-label-value').inc(3)")  # fmt: skip
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": ""}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    (good,) = tmp_path.glob("counter_*.db")
    whole = good.read_bytes()
    # The real failure: the same file cut inside its entry's key.
    cut = tmp_path / "counter_999999.db"
    cut.write_bytes(whole[:8] + whole[8:][:40].ljust(len(whole) - 8, b"\0"))
    inner = multiprocess.MultiProcessCollector(None, path=str(tmp_path))
    with pytest.raises((ValueError, struct.error)):
        list(inner.collect())

    class HealsAfterOneRead:
        """Reads the directory; the cut file is complete again after the first failure."""

        def __init__(self) -> None:
            self.reads = 0

        def collect(self):
            self.reads += 1
            try:
                return list(inner.collect())
            finally:
                shutil.copyfile(good, cut)

    healing = HealsAfterOneRead()
    registry = CollectorRegistry()
    registry.register(RereadingCollector(healing, pause_s=0))
    text = generate_latest(registry).decode()
    assert healing.reads == 2
    assert 'kuiper_test_events_total{kind="long-label-value"} 6.0' in text  # both files

    # A file that stays broken still fails the scrape (after ATTEMPTS reads), not hidden.
    cut.write_bytes(whole[:8] + whole[8:][:40].ljust(len(whole) - 8, b"\0"))
    with pytest.raises((ValueError, struct.error)):
        RereadingCollector(inner, pause_s=0).collect()
