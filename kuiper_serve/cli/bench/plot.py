"""`kuiper bench --plot FILE.png`: each call's latency over the run, and throughput per second
(calls, and tokens for token streams). matplotlib is optional: `pip install 'kuiper-serve[bench]'`."""

from __future__ import annotations

import math
from pathlib import Path

from kuiper_serve.cli.bench.runner import CallResult


def require_matplotlib() -> None:
    """Fail before the run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install 'kuiper-serve[bench]' (or matplotlib)"
        ) from None


def token_times(r: CallResult) -> list[float]:
    """When each token of a call arrived (seconds since the run's start): the first at
    `first`, each later one a recorded gap after the one before."""
    if not r.tokens or r.first is None:
        return []
    t = r.start + r.first
    out = [t]
    for gap in r.gaps[: r.tokens - 1]:
        t += gap
        out.append(t)
    return out


def plot(results: list[CallResult], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ok = [r for r in results if r.status == "OK"]
    bad = [r for r in results if r.status != "OK"]
    lat.scatter([r.start for r in ok], [r.latency * 1000 for r in ok], s=6, label="OK")
    if bad:
        lat.scatter([r.start for r in bad], [r.latency * 1000 for r in bad], s=6, c="red",
                    label="error")  # fmt: skip
    firsts = [r for r in ok if r.first is not None]
    if firsts and any(r.tokens for r in ok):
        lat.scatter([r.start for r in firsts], [r.first * 1000 for r in firsts], s=6,
                    label="time to first token")  # fmt: skip
    lat.set_ylabel("latency (ms)")
    lat.ticklabel_format(axis="y", useOffset=False, style="plain")
    lat.set_title(title)
    lat.legend(loc="upper right")

    end = max((r.start + r.latency for r in results), default=0.0)
    seconds = max(1, math.ceil(end))
    calls = [0] * seconds
    tokens = [0] * seconds
    for r in results:
        calls[min(seconds - 1, int(r.start + r.latency))] += 1
        for t in token_times(r):  # tokens count when they arrived, not when the call ended
            tokens[min(seconds - 1, int(t))] += 1
    xs = [i + 0.5 for i in range(seconds)]
    thr.step(xs, calls, where="mid", label="calls finished/s")
    thr.set_ylabel("calls/s")
    thr.set_xlabel("seconds since start")
    if any(tokens):
        tok = thr.twinx()
        tok.step(xs, tokens, where="mid", color="tab:orange", label="tokens/s")
        tok.set_ylabel("tokens/s")
        tok.legend(loc="upper right")
    thr.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
