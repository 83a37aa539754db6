"""`kuiper bench` against live servers on loopback: what it reports must be what the servers'
own Prometheus metrics counted over the run.

Exact: calls by status code (requests_total{method,code}), generated tokens
(generation_tokens_total), inter-token latency samples (one per token after the first, on both
sides), finished reasons. Within a tolerance: time to first token, where the client's clock
starts before the request is sent and the server's when it arrives, so the client's mean is at
least the server's (less 5 ms of clock granularity) and at most 0.5 s more (this machine runs
both servers and the bench's workers on 2 shared cores). Pacing: --rps R for -z T starts R*T
calls."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from servers import free_port, kuiper_command, server_env, start_server
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
GENERATE = {"text": "hello world", "sampling": {"max_new_tokens": 8, "ignore_eos": True,
                                                "temperature": 0}}  # fmt: skip


def scrape(port: int) -> dict[str, float]:
    """Samples by name and labels, without model_name (one model per server)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN)$", line)
        if m:
            key = re.sub(r'model_name="[^"]*",?', "", m.group(1)).replace("{}", "")
            out[key.replace(",}", "}")] = float(m.group(2))
    return out


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def bench(*args: str, timeout: float = 240) -> dict:
    proc = subprocess.run(
        kuiper_command("bench", "--format", "json", "--no-progress", *args),
        capture_output=True, text=True, timeout=timeout, env=server_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def stack(tiny_model):  # noqa: F811
    with run_stack(tiny_model, "--block-size", "8") as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(tiny_model):  # noqa: F811
    port, metrics_port = free_port(), free_port()
    args = kuiper_command("serve-tokenizer", "--model", str(tiny_model), "--port", str(port),
                          "--metrics-port", str(metrics_port))  # fmt: skip
    with start_server(args, port) as server:
        yield server, metrics_port


def test_generate_report_matches_the_servers_metrics(stack) -> None:
    n, new = 24, GENERATE["sampling"]["max_new_tokens"]
    before = stack.metrics()
    rep = bench("--call", "Generate", "-n", str(n), "-c", "6", "--workers", "2",
                "-d", json.dumps(GENERATE), stack.address)  # fmt: skip
    after = stack.metrics()
    assert rep["count"] == n and rep["statusCodeDistribution"] == {"OK": n}
    ok = 'kuiper_inference_requests_total{code="OK",method="Generate"}'
    assert delta(after, before, ok) == n
    assert rep["tokens"]["count"] == n * new
    assert delta(after, before, "kuiper_inference_generation_tokens_total") == n * new
    length = 'kuiper_inference_request_success_total{finished_reason="length"}'
    assert delta(after, before, length) == n
    itl = "kuiper_inference_inter_token_latency_seconds_count"
    assert rep["interTokenLatency"]["count"] == n * (new - 1) == delta(after, before, itl)

    ttft = "kuiper_inference_time_to_first_token_seconds"
    server_mean = delta(after, before, ttft + "_sum") / delta(after, before, ttft + "_count")
    client_mean = rep["timeToFirstToken"]["average"] / 1e9
    assert server_mean - 0.005 <= client_mean <= server_mean + 0.5, (client_mean, server_mean)
    # ghz's report shape
    assert [d["percentage"] for d in rep["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert sum(b["count"] for b in rep["histogram"]) == n
    assert rep["fastest"] <= rep["latencyDistribution"][2]["latency"] <= rep["slowest"]
    assert rep["rps"] == pytest.approx(n / (rep["total"] / 1e9))
    assert len(rep["details"]) == n


def test_errors_are_counted_by_status_code(stack) -> None:
    too_long = {"text": "hello", "sampling": {"max_new_tokens": 10**6}}
    before = stack.metrics()
    rep = bench("--call", "InferenceService.Generate", "-n", "10", "-c", "2", "--workers", "1",
                "-d", json.dumps(too_long), stack.address)  # fmt: skip
    after = stack.metrics()
    assert rep["statusCodeDistribution"] == {"InvalidArgument": 10}
    bad = 'kuiper_inference_requests_total{code="INVALID_ARGUMENT",method="Generate"}'
    assert delta(after, before, bad) == 10
    ((message, count),) = rep["errorDistribution"].items()
    assert count == 10 and message.startswith("rpc error: code = InvalidArgument desc = ")
    assert rep["latencyDistribution"] == [] and "timeToFirstToken" not in rep


def test_rps_and_duration_pace_the_calls(tokenizer) -> None:
    server, metrics_port = tokenizer
    before = scrape(metrics_port)
    rep = bench("--call", "Encode", "-z", "2s", "--rps", "20", "-c", "4", "--workers", "2",
                "-d", '{"texts": ["pace me"]}', server.address)  # fmt: skip
    after = scrape(metrics_port)
    assert rep["count"] == 40 and rep["endReason"] == "timeout"
    ok = 'kuiper_tokenizer_requests_total{code="OK",method="Encode"}'
    assert delta(after, before, ok) == 40
    assert rep["rps"] == pytest.approx(20, rel=0.15)


def test_ghz_config_runs_and_streams_count_as_one_call_each(tokenizer) -> None:
    """--config reads a ghz config (here DecodeStream: 4 messages per stream)."""
    server, metrics_port = tokenizer
    before = scrape(metrics_port)
    rep = bench("--config", str(REPO / "deploy/ghz/decode_stream.json"), "-n", "12", "-c", "3",
                "--workers", "1", server.address)  # fmt: skip
    after = scrape(metrics_port)
    assert rep["statusCodeDistribution"] == {"OK": 12}
    ok = 'kuiper_tokenizer_requests_total{code="OK",method="DecodeStream"}'
    assert delta(after, before, ok) == 12
    assert rep["timeToFirstResponse"]["count"] == 12  # not a token stream: no ITL
    assert "interTokenLatency" not in rep


def test_summary_and_plot(stack, tmp_path) -> None:
    png = tmp_path / "bench.png"
    proc = subprocess.run(
        kuiper_command("bench", "--call", "Generate", "-n", "6", "-c", "3", "--no-progress",
                       "-d", json.dumps(GENERATE), "--plot", str(png), stack.address),
        capture_output=True, text=True, timeout=240, env=server_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for line in ("Count:\t6", "Time to first token (6 samples)", "Inter-token latency",
                 "[OK]\t6 responses"):  # fmt: skip
        assert line in proc.stdout, proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--call", "Nope"], "is not a kuiper.v1 method"),
        (["--call", "Generate", "-d", '{"bogus": 1}'], "does not fit kuiper.v1.GenerateRequest"),
        (["--call", "Generate", "-d", '{"text": "{{.Nope}}"}'], "unknown template variable"),
        (["--call", "Encode", "-c", "0"], "-c must be at least 1"),
    ],
)
def test_bad_flags_fail_before_any_call(args: list[str], message: str) -> None:
    proc = subprocess.run(kuiper_command("bench", *args, "127.0.0.1:9"), capture_output=True,
                          text=True, timeout=60, env=server_env(), cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_plot_counts_tokens_when_they_arrived() -> None:
    from kuiper_serve.cli.bench.plot import token_times
    from kuiper_serve.cli.bench.runner import CallResult

    # first message: 2 tokens at 0.5 s; then one token 0.1 s later, then one 0.2 s later
    r = CallResult(start=1.0, latency=2.0, status="OK", first=0.5, gaps=(0.0, 0.1, 0.2), tokens=4)
    assert token_times(r) == pytest.approx([1.5, 1.5, 1.6, 1.8])
    assert token_times(CallResult(start=0.0, latency=1.0, status="UNAVAILABLE")) == []
