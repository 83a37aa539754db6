"""`kuiper up`: the tokenizer and inference services as two processes, for one machine."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kuiper_serve.cli.args import (
    add_engine_flags,
    add_model_flags,
    add_security_arguments,
    apply_threads_flag,
)
from kuiper_serve.cli.remote import summary_line
from kuiper_serve.common.defaults import (
    AUTH_TOKEN_ENV,
    DEFAULT_HOST,
    INFERENCE_METRICS_PORT,
    INFERENCE_PORT,
    TOKENIZER_PORT,
)
from kuiper_serve.common.ports import port_in_use


def register(subparsers) -> None:
    u = subparsers.add_parser(
        "up",
        help="start the tokenizer and inference services together",
        description="Start both services as separate processes, wait until both are "
        "healthy, print where they listen, and serve until Ctrl-C / SIGTERM. A service that "
        "exits is restarted after a backoff (1, 2, 4 ... 30 s), five crashes in a row stop both.",
    )
    add_model_flags(u)
    u.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface both services listen on (default {DEFAULT_HOST})")  # fmt: skip
    u.add_argument("--port", type=int, default=INFERENCE_PORT,
                   help=f"inference service port (default {INFERENCE_PORT})")  # fmt: skip
    u.add_argument("--tokenizer-port", type=int, default=TOKENIZER_PORT,
                   help=f"tokenizer service port (default {TOKENIZER_PORT})")  # fmt: skip
    u.add_argument(
        "--metrics-port",
        type=int,
        default=INFERENCE_METRICS_PORT,
        help=f"inference metrics port (default {INFERENCE_METRICS_PORT}; the tokenizer's is the "
        "next one; 0: a free port each, logged; -1: off)",
    )
    u.add_argument(
        "--demo",
        metavar="PROMPT",
        default=None,
        help="once healthy, stream a generated answer for PROMPT",
    )
    u.add_argument("--demo-max-new-tokens", type=int, default=128,
                   help="length of the --demo answer (default 128)")  # fmt: skip
    u.add_argument(
        "--exit-after-demo",
        action="store_true",
        help="stop both services after the demo instead of serving on",
    )
    u.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds each service gets to become healthy (default 900)")  # fmt: skip
    add_security_arguments(u)
    u.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA that signed --tls-cert, trusted by the inference service (for the tokenizer) "
        "and by the health checks and demo (default: --tls-cert itself, right for a "
        "self-signed certificate; it must name --host)",
    )
    add_engine_flags(u)
    u.set_defaults(func=cmd_up)


def wait_healthy(
    address: str,
    proc: subprocess.Popen,
    timeout: float,
    service: str = "",
    tls_ca: str | None = None,
) -> None:
    """Poll grpc.health.v1 until SERVING (over TLS trusting `tls_ca` when given; health needs
    no token); raise if the process exits or time runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from kuiper_client.channel import open_channel

    deadline = time.monotonic() + timeout
    channel, _ = open_channel(address, ca=tls_ca)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} before becoming healthy")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout:.0f}s")


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when `kuiper up` dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen], timeout: float = 40.0) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def _run_demo(
    address: str, prompt: str, max_new_tokens: int, tls_ca: str | None, token: str | None
) -> None:
    from kuiper_client import KuiperClient

    print(f"\n>>> {prompt}", flush=True)
    with KuiperClient(address, tls_ca=tls_ca, token=token) as client:
        sys.stdout.write(prompt)
        final = None
        start = time.monotonic()
        for chunk in client.generate(
            prompt, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=0
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            final = chunk
        elapsed = time.monotonic() - start
    if final is not None and final.usage is not None:
        u = final.usage
        line = summary_line(final.finish_reason, u.prompt_tokens, u.completion_tokens,
                            u.time_to_first_token_s, elapsed)  # fmt: skip
        print(f"\n{line}", flush=True)


RESTART_FIRST_S = 1.0  # backoff before the first restart of a crashed child; doubles
RESTART_MAX_S = 30.0
RESTART_GIVE_UP = 5  # crashes in a row (each within STABLE_S of its start): stop everything
STABLE_S = 60.0  # a child that ran this long starts its backoff over


@dataclass
class _Child:
    """One service `kuiper up` runs, and how to start it again."""

    name: str
    cmd: list[str]
    address: str
    service: str  # the health service name it reports
    log: Path  # named by port: two `kuiper up` on one machine keep separate logs
    started_at: float = 0.0
    crashes: int = 0  # in a row

    def launch(self, env: dict[str, str], append: bool) -> subprocess.Popen:
        self.started_at = time.monotonic()
        with open(self.log, "ab" if append else "wb") as log_file:
            # Own session: Ctrl-C reaches only us, and we stop the children in order.
            return subprocess.Popen(
                self.cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )  # fmt: skip


def _supervise(
    children: tuple[_Child, ...],
    procs: list[subprocess.Popen],
    env: dict[str, str],
    startup_timeout: float,
    tls_ca: str | None,
) -> bool:
    """Restart a child that exits, after a backoff (1, 2, 4 ... 30 s), and say so. Returns
    False (stop everything) after RESTART_GIVE_UP crashes in a row of one child. Ends with
    KeyboardInterrupt (the stop signal)."""
    while True:
        time.sleep(0.5)
        for i, child in enumerate(children):
            code = procs[i].poll()
            if code is None:
                continue
            child.crashes = (
                1 if time.monotonic() - child.started_at > STABLE_S else child.crashes + 1
            )
            tail = _log_tail(child.log)
            if child.crashes >= RESTART_GIVE_UP:
                print(f"kuiper up: {child.name} service exited ({code}) {child.crashes} times in "
                      f"a row; stopping\n{tail}", file=sys.stderr)  # fmt: skip
                return False
            delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (child.crashes - 1))
            print(f"kuiper up: {child.name} service exited ({code}); restarting it in "
                  f"{delay:g}s (restart {child.crashes} in a row)\n{tail}",
                  file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(delay)
            procs[i] = child.launch(env, append=True)
            try:
                wait_healthy(child.address, procs[i], startup_timeout, child.service, tls_ca)
            except (RuntimeError, TimeoutError) as exc:
                print(f"kuiper up: restarted {child.name} service {exc}", file=sys.stderr)
                procs[i].kill()
                continue  # seen as exited (or killed by the timeout) on the next round
            print(f"kuiper up: {child.name} service restarted (pid {procs[i].pid}) and healthy",
                  file=sys.stderr, flush=True)  # fmt: skip


def cmd_up(args: argparse.Namespace) -> int:
    from kuiper_serve.common.model_source import kuiper_home, resolve_model

    apply_threads_flag(args)  # the inference server inherits the environment
    ports = [("--port", args.port), ("--tokenizer-port", args.tokenizer_port)]
    if args.metrics_port > 0:
        ports += [
            ("--metrics-port", args.metrics_port),
            ("--metrics-port + 1", args.metrics_port + 1),
        ]
    if args.tls_cert and args.tls_key:  # before anything starts: one line, not a traceback
        for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                           ("--tls-ca", args.tls_ca or args.tls_cert)):  # fmt: skip
            if not os.access(path, os.R_OK) or os.path.isdir(path):
                print(f"kuiper up: cannot read {flag} {path}", file=sys.stderr)
                return 1
    for flag, port in ports:
        if port_in_use(args.host, port):
            print(f"kuiper up: {args.host}:{port} ({flag}) is already in use (another kuiper "
                  f"up?); stop that server or pick another {flag.split()[0]}", file=sys.stderr)  # fmt: skip
            return 1
    try:
        model = resolve_model(args.model)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"kuiper up: {exc}", file=sys.stderr)
        return 1
    logs = kuiper_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tok_addr = f"{args.host}:{args.tokenizer_port}"
    inf_addr = f"{args.host}:{args.port}"
    base = [sys.executable, "-m", "kuiper_serve.cli"]
    # > 0: the tokenizer's on the next port; 0: each a free port (logged); < 0: none.
    tok_metrics = args.metrics_port + 1 if args.metrics_port > 0 else args.metrics_port
    tok_cmd = base + ["serve-tokenizer", "--model", str(model), "--host", args.host,
                      "--port", str(args.tokenizer_port), "--metrics-port", str(tok_metrics)]  # fmt: skip
    inf_cmd = base + [
        "serve-inference", "--model", str(model), "--device", args.device, "--host", args.host,
        "--port", str(args.port), "--tokenizer-address", tok_addr,
        "--metrics-port", str(args.metrics_port), "--block-size", str(args.block_size),
        "--max-waiting", str(args.max_waiting),
        "--max-batched-tokens", str(args.max_batched_tokens), "--grace", str(args.grace),
        "--engine-stall-timeout", str(args.engine_stall_timeout),
        "--engine-restart-timeout", str(args.engine_restart_timeout),
    ]  # fmt: skip
    # Same TLS and token on both; the token travels in the environment (not seen in ps).
    tls_ca = (args.tls_ca or args.tls_cert) if args.tls_cert else None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("kuiper up: TLS needs both --tls-cert and --tls-key", file=sys.stderr)
            return 1
        tls = ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]
        tok_cmd += tls
        inf_cmd += tls + ["--tokenizer-tls-ca", tls_ca]
    if args.max_batch_size is not None:
        inf_cmd += ["--max-batch-size", str(args.max_batch_size)]
    if args.single_process:
        inf_cmd += ["--single-process"]
    if args.frontends is not None:
        inf_cmd += ["--frontends", str(args.frontends)]
    if args.kv_memory is not None:
        inf_cmd += ["--kv-memory", str(args.kv_memory)]
    if args.num_kv_blocks is not None:
        inf_cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if args.max_request_bytes is not None:
        inf_cmd += ["--max-request-bytes", str(args.max_request_bytes)]

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.auth_token:
        env[AUTH_TOKEN_ENV] = args.auth_token
    started = {}
    children = (
        _Child("tokenizer", tok_cmd, tok_addr, "", logs / f"tokenizer-{args.tokenizer_port}.log"),
        _Child("inference", inf_cmd, inf_addr, "kuiper.v1.InferenceService",
               logs / f"inference-{args.port}.log"),
    )  # fmt: skip
    try:
        for child in children:
            name, addr, service, log_path = child.name, child.address, child.service, child.log
            proc = child.launch(env, append=False)
            procs.append(proc)
            started[name] = (proc, log_path)
            print(f"starting {name} service (pid {proc.pid}, log: {log_path}) ...", flush=True)
            try:
                wait_healthy(addr, proc, args.startup_timeout, service, tls_ca)
            except (RuntimeError, TimeoutError) as exc:
                print(f"kuiper up: {name} service {exc}\n{_log_tail(log_path)}", file=sys.stderr)
                _stop(procs)
                return 1
        print(f"tokenizer service: {tok_addr}", flush=True)
        print(f"inference service: {inf_addr}  (model {model})", flush=True)
        if args.metrics_port > 0:
            print(f"metrics: http://{args.host}:{args.metrics_port}/metrics (inference), "
                  f"http://{args.host}:{tok_metrics}/metrics (tokenizer)", flush=True)  # fmt: skip
        elif args.metrics_port == 0:
            print(f"metrics: on free ports, named in the service logs ({logs})", flush=True)
        secure = f" --tls-ca {tls_ca}" if tls_ca else ""
        print(f'try: kuiper generate --address {inf_addr}{secure} "Once upon a time"', flush=True)
        if args.demo is not None:
            try:
                _run_demo(
                    inf_addr, args.demo, args.demo_max_new_tokens, tls_ca, args.auth_token or None
                )
            except Exception as exc:  # a failed demo must still stop both services
                print(f"\nkuiper up: demo failed: {exc}", file=sys.stderr)
                _stop(list(reversed(procs)))
                return 1
        if not args.exit_after_demo:
            print("serving; Ctrl-C to stop", flush=True)
            if not _supervise(children, procs, env, args.startup_timeout, tls_ca):
                _stop(list(reversed(procs)))
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print("stopping ...", flush=True)
    # Inference first (it drains its streams, which still need the tokenizer).
    codes = _stop(list(reversed(procs)))
    print("stopped", flush=True)
    return 0 if all(c == 0 for c in codes) else 1
