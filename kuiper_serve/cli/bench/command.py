"""`kuiper bench`: load-test any RPC of either service, ghz-style, with time to first token and
inter-token latency for token streams. Flags follow ghz (-c, -n, --rps, -z, -d, -D,
--metadata, -t, --format json, -o) and `--config` reads a ghz JSON config."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from kuiper_serve.common.defaults import AUTH_TOKEN_ENV

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# ghz config keys → our flag destinations (the config's values are defaults the command line
# overrides).
GHZ_KEYS = {
    "call": "call",
    "host": "target",
    "total": "total",
    "concurrency": "concurrency",
    "rps": "rps",
    "duration": "duration",
    "timeout": "timeout",
    "name": "name",
    "metadata": "metadata",
    "data": "data",
    "cacert": "tls_ca",
}


def duration(text: str) -> float:
    """'90s', '2m', '500ms', '1h' or plain seconds → seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30s, 2m, 500ms)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test an RPC of either service (ghz-like; adds TTFT and inter-token latency)",
        description="Send calls of one kuiper.v1 method from several worker processes and "
        "report count, status codes, requests/s, the latency histogram and percentiles, and "
        "for Generate/Chat the time to first token and inter-token latency. "
        "Example: kuiper bench --call Generate -c 16 -n 256 "
        '-d \'{"text": "Once upon a time", "sampling": {"max_new_tokens": 64}}\'',
    )
    p.add_argument("target", nargs="?", default=None,
                   help="HOST:PORT (default: localhost and the called service's default port)")  # fmt: skip
    p.add_argument("--call", help="method: Generate, TokenizerService.Encode, "
                   "kuiper.v1.InferenceService.Chat, ... (required unless --config gives it)")  # fmt: skip
    p.add_argument("--config", metavar="JSON", help="a ghz JSON config (deploy/ghz/*.json); "
                   "flags given on the command line override its values")  # fmt: skip
    p.add_argument("-d", "--data", help="request as JSON (a list of messages for DecodeStream); "
                   "ghz template variables like {{.RequestNumber}} are filled in per call")  # fmt: skip
    p.add_argument("-D", "--data-file", metavar="FILE", help="read the request JSON from FILE")
    p.add_argument("-c", "--concurrency", type=int, help="calls in flight at once (default 50)")
    p.add_argument("-n", "--total", type=int,
                   help="calls to make (default 200; ignored with -z)")  # fmt: skip
    p.add_argument("--rps", type=float,
                   help="start at most this many calls per second overall (default: no limit)")  # fmt: skip
    p.add_argument("-z", "--duration", type=duration,
                   help="run for this long (e.g. 30s, 2m); calls in progress then finish")  # fmt: skip
    p.add_argument("-t", "--timeout", type=duration,
                   help="deadline of each call (default 60s)")  # fmt: skip
    p.add_argument("-m", "--metadata", help='call metadata as a JSON object, e.g. '
                   '\'{"x-request-source": "bench"}\'')  # fmt: skip
    p.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_ENV),
                   help=f"bearer token sent as 'authorization: Bearer TOKEN' (default ${AUTH_TOKEN_ENV})")  # fmt: skip
    p.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system CAs")
    p.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting this CA")
    p.add_argument("--authority", help="override the :authority (TLS name) of the target")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes sharing the callers (default: CPU count, at most -c)")  # fmt: skip
    p.add_argument("--format", choices=["summary", "json"], default="summary",
                   help="report format (json: ghz's report fields, plus TTFT/ITL)")  # fmt: skip
    p.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot latency and throughput over time (needs matplotlib: "
                   "pip install 'kuiper-serve[bench]')")  # fmt: skip
    p.add_argument("--name", default="", help="a name for the report")
    p.add_argument("--no-progress", action="store_true",
                   help="no live progress line on stderr (shown on a terminal)")  # fmt: skip
    p.set_defaults(func=run_bench)


def _apply_config(args: argparse.Namespace) -> None:
    """Fill flags the command line left unset from the ghz config."""
    cfg = json.loads(Path(args.config).read_text())
    for key, dest in GHZ_KEYS.items():
        if key not in cfg or getattr(args, dest, None) not in (None, ""):
            continue
        value = cfg[key]
        if key in ("duration", "timeout"):
            value = duration(value)
        elif key in ("data", "metadata"):
            value = json.dumps(value)
        setattr(args, dest, value)
    if cfg.get("insecure") is False and not args.tls_ca:
        args.tls = True


def plan_from_args(args: argparse.Namespace):
    """The run's Plan; raises ValueError with a message for the user."""
    from kuiper_serve.cli.bench.calls import RequestData, resolve_call
    from kuiper_serve.cli.bench.runner import Plan

    if args.config:
        _apply_config(args)
    if not args.call:
        raise ValueError("--call is required (e.g. --call Generate), or give --config")
    call = resolve_call(args.call)
    if args.data and args.data_file:
        raise ValueError("give -d or -D, not both")
    data = Path(args.data_file).read_text() if args.data_file else (args.data or "{}")
    RequestData(call, data)  # parses now: a bad request fails before any worker starts
    metadata: list[tuple[str, str]] = []
    if args.metadata:
        md = json.loads(args.metadata)
        if not isinstance(md, dict):
            raise ValueError("--metadata must be a JSON object")
        metadata = [(str(k).lower(), str(v)) for k, v in md.items()]
    if args.auth_token:
        metadata.append(("authorization", f"Bearer {args.auth_token}"))
    target = args.target or f"localhost:{call.default_port}"
    concurrency = args.concurrency if args.concurrency is not None else 50
    total = args.total if args.total is not None else 200
    duration_s = args.duration or 0.0
    for name, value in (("-c", concurrency), ("--workers", args.workers or 1)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1")
    if duration_s <= 0 and total < 1:
        raise ValueError("-n must be at least 1 (or give -z)")
    if args.rps is not None and args.rps <= 0:
        raise ValueError("--rps must be positive")
    if args.tls_ca:
        Path(args.tls_ca).read_bytes()  # unreadable: OSError now, not in every worker
    workers = args.workers or min(os.cpu_count() or 1, concurrency)
    return Plan(
        call=call.name,
        target=target,
        data=data,
        total=total,
        concurrency=concurrency,
        rps=args.rps or 0.0,
        duration_s=duration_s,
        timeout_s=args.timeout or 60.0,
        workers=min(workers, concurrency),
        metadata=tuple(metadata),
        tls=args.tls,
        tls_ca=args.tls_ca,
        authority=args.authority,
    ), call


class Progress:
    """One live line on stderr (a terminal only): calls done (of the total, or seconds of the
    duration), calls/s, errors; redrawn at most 5 times a second."""

    def __init__(self, what: str, total: int | None, duration_s: float, enabled: bool) -> None:
        self.what, self.total, self.duration_s, self.enabled = what, total, duration_s, enabled
        self.done = self.errors = 0
        self.elapsed = 0.0  # seconds of the run so far (the latest call end seen)
        self.drawn = 0.0

    def update(self, batch) -> None:
        self.done += len(batch)
        self.errors += sum(r.status != "OK" for r in batch)
        self.elapsed = max([self.elapsed, *(r.start + r.latency for r in batch)])
        now = time.monotonic()
        if self.enabled and now - self.drawn >= 0.2:
            self.drawn = now
            elapsed = max(self.elapsed, 1e-9)
            if self.total:
                where = f"{self.done}/{self.total} calls ({100 * self.done / self.total:.0f} %)"
            else:
                where = f"{self.done} calls, {elapsed:.0f}/{self.duration_s:g} s"
            rate = self.done / elapsed
            sys.stderr.write(f"\r{self.what}: {where}, {rate:.1f}/s, {self.errors} errors ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.drawn:
            sys.stderr.write("\n")


def run_bench(args: argparse.Namespace) -> int:
    from kuiper_serve.cli.bench import report
    from kuiper_serve.cli.bench.runner import run

    try:
        plan, call = plan_from_args(args)
        if args.plot:
            from kuiper_serve.cli.bench.plot import require_matplotlib

            require_matplotlib()
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        print(f"kuiper bench: {exc}", file=sys.stderr)
        return 2

    progress = Progress(
        call.method,
        plan.total if plan.duration_s <= 0 else None,
        plan.duration_s,
        enabled=not args.no_progress and sys.stderr.isatty(),
    )

    try:
        result = run(plan, progress.update)
    except RuntimeError as exc:
        progress.close()
        print(f"kuiper bench: {exc}", file=sys.stderr)
        return 1
    progress.close()
    rep = report.build(plan, result, args.name, streaming_tokens=call.counts_tokens)
    text = json.dumps(rep, indent=2) + "\n" if args.format == "json" else report.summary_text(rep)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        from kuiper_serve.cli.bench.plot import plot

        plot(result.results, args.plot, args.name or f"kuiper bench {call.name}")
    return 0
