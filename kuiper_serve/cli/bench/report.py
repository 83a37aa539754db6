"""The report of a run: ghz's JSON report fields where they overlap (count, total, average,
fastest, slowest, rps, errorDistribution, statusCodeDistribution, latencyDistribution,
histogram, details; durations in nanoseconds, histogram marks in seconds, status names as Go
spells them), plus what ghz cannot measure for streams: time to first token, inter-token
latency and tokens received. `summary_text` prints it the way ghz's summary does."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kuiper_serve.cli.bench.runner import Plan, RunResult, go_code_name

PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10


def ns(seconds: float) -> int:
    return round(seconds * 1e9)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest rank, as ghz computes its latency distribution."""
    if not sorted_values:
        return 0.0
    rank = p / 100 * len(sorted_values)
    i = int(rank) - 1 if rank == int(rank) else int(rank)
    return sorted_values[max(0, min(i, len(sorted_values) - 1))]


def histogram(sorted_values: Sequence[float]) -> list[dict[str, float]]:
    """ghz's: 10 equal-width buckets from the fastest to the slowest, each counting the values
    up to its mark."""
    if not sorted_values:
        return []
    lo, hi = sorted_values[0], sorted_values[-1]
    width = (hi - lo) / HISTOGRAM_BUCKETS
    marks = [lo + width * i for i in range(HISTOGRAM_BUCKETS)] + [hi]
    counts = [0] * len(marks)
    b = 0
    for v in sorted_values:
        while v > marks[b] and b < len(marks) - 1:
            b += 1
        counts[b] += 1
    n = len(sorted_values)
    return [{"mark": m, "count": c, "frequency": c / n} for m, c in zip(marks, counts, strict=True)]


def distribution(values: list[float]) -> dict[str, Any]:
    """count, average and p50/p90/p99 of a list of seconds, in nanoseconds."""
    values = sorted(values)
    out: dict[str, Any] = {"count": len(values)}
    out["average"] = ns(sum(values) / len(values)) if values else 0
    for p in (50, 90, 99):
        out[f"p{p}"] = ns(percentile(values, p))
    return out


def build(plan: Plan, run: RunResult, name: str = "", streaming_tokens: bool = False) -> dict:
    results = run.results
    ok = sorted(r.latency for r in results if r.status == "OK")
    total_s = run.wall_s
    report: dict[str, Any] = {
        "name": name,
        "endReason": run.end_reason,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "options": {
            "host": plan.target,
            "call": plan.call,
            "insecure": not (plan.tls or plan.tls_ca),
            "total": plan.total if plan.duration_s <= 0 else 0,
            "concurrency": plan.concurrency,
            "rps": plan.rps,
            "duration": ns(plan.duration_s),
            "timeout": ns(plan.timeout_s),
            "metadata": {k: v for k, v in plan.metadata if k != "authorization"},
            "CPUs": plan.workers,
        },
        "count": len(results),
        "total": ns(total_s),
        "average": ns(sum(r.latency for r in results) / len(results)) if results else 0,
        "fastest": ns(ok[0]) if ok else 0,
        "slowest": ns(ok[-1]) if ok else 0,
        "rps": len(results) / total_s if total_s > 0 else 0.0,
        "errorDistribution": dict(Counter(r.error for r in results if r.error)),
        "statusCodeDistribution": dict(Counter(go_code_name(r.status) for r in results)),
        "latencyDistribution": [
            {"percentage": p, "latency": ns(percentile(ok, p))} for p in PERCENTAGES
        ]
        if ok
        else [],
        "histogram": histogram(ok),
        "details": [
            {
                "timestamp": ns(r.start),  # since the run's start (ghz: wall-clock time)
                "latency": ns(r.latency),
                "error": r.error,
                "status": go_code_name(r.status),
            }
            for r in results
        ],
    }
    firsts = [r.first for r in results if r.status == "OK" and r.first is not None]
    if firsts:
        key = "timeToFirstToken" if streaming_tokens else "timeToFirstResponse"
        report[key] = distribution(firsts)
    if streaming_tokens:
        gaps = [g for r in results if r.status == "OK" for g in r.gaps]
        tokens = sum(r.tokens for r in results)
        report["interTokenLatency"] = distribution(gaps)
        report["tokens"] = {
            "count": tokens,
            "rate": tokens / total_s if total_s > 0 else 0.0,
        }
    return report


def _ms(nanos: int) -> str:
    return f"{nanos / 1e6:.2f} ms"


def summary_text(report: dict) -> str:
    lines = ["", "Summary:"]
    if report["name"]:
        lines.append(f"  Name:\t{report['name']}")
    lines += [
        f"  Count:\t{report['count']}",
        f"  Total:\t{_ms(report['total'])}",
        f"  Slowest:\t{_ms(report['slowest'])}",
        f"  Fastest:\t{_ms(report['fastest'])}",
        f"  Average:\t{_ms(report['average'])}",
        f"  Requests/sec:\t{report['rps']:.2f}",
    ]
    if report["histogram"]:
        lines += ["", "Response time histogram:"]
        top = max(b["count"] for b in report["histogram"]) or 1
        for b in report["histogram"]:
            bar = "∎" * round(40 * b["count"] / top)
            lines.append(f"  {b['mark'] * 1000:10.3f} [{b['count']}]\t|{bar}")
    if report["latencyDistribution"]:
        lines += ["", "Latency distribution:"]
        lines += [
            f"  {d['percentage']} % in {_ms(d['latency'])} " for d in report["latencyDistribution"]
        ]
    for key, title in (
        ("timeToFirstToken", "Time to first token"),
        ("timeToFirstResponse", "Time to first response"),
        ("interTokenLatency", "Inter-token latency"),
    ):
        if key in report and report[key]["count"]:
            d = report[key]
            lines += ["", f"{title} ({d['count']} samples):"]
            lines.append(
                f"  average {_ms(d['average'])}, p50 {_ms(d['p50'])}, p90 {_ms(d['p90'])}, "
                f"p99 {_ms(d['p99'])}"
            )
    if "tokens" in report:
        t = report["tokens"]
        lines += ["", f"Tokens received:\t{t['count']} ({t['rate']:.1f} tokens/s)"]
    lines += ["", "Status code distribution:"]
    for code, n in sorted(report["statusCodeDistribution"].items()):
        lines.append(f"  [{code}]\t{n} responses")
    if report["errorDistribution"]:
        lines += ["", "Error distribution:"]
        for err, n in sorted(report["errorDistribution"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  [{n}]\t{err}")
    return "\n".join(lines) + "\n"
