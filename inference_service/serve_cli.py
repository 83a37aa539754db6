"""`kuiper serve-inference` (the inference service alone, e.g. in Kubernetes) and `kuiper up`
(tokenizer + inference services as two processes, for one machine)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tokenizer_service.cli import add_security_arguments
from tokenizer_service.defaults import AUTH_TOKEN_ENV

DEFAULT_PORT = 50051
DEFAULT_TOKENIZER_PORT = 50052
DEFAULT_METRICS_PORT = 9091


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): cuda when a GPU and pycuda exist, else cpu")  # fmt: skip


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    kv = p.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-memory",
        type=float,
        default=None,
        metavar="MB",
        help="KV cache pool size in MiB (default: backend's choice)",
    )
    kv.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache pool size in blocks")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-batch-size", type=int, default=32, help="running sequences at most")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="queued requests at most; beyond: RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=512,
        help="tokens per engine step (prefill chunks + decodes)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running streams get to finish after SIGTERM",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-inference",
        help="run the inference service (needs a tokenizer service)",
        description="Serve kuiper.v1.InferenceService over gRPC. The tokenizer service is "
        "reached at --tokenizer-address (env KUIPER_TOKENIZER_ADDRESS).",
    )
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on, gRPC and metrics (default 127.0.0.1, this machine "
                   "only; use 0.0.0.0 in a container or to accept remote clients)")  # fmt: skip
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT})"
    )
    p.add_argument(
        "--tokenizer-address",
        default=None,
        help="host:port of the tokenizer service "
        "(default: $KUIPER_TOKENIZER_ADDRESS or localhost:50052)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT}; 0: off)",
    )
    add_security_arguments(p)
    p.add_argument(
        "--tokenizer-tls",
        action="store_true",
        help="reach the tokenizer service over TLS, trusting the system's CAs",
    )
    p.add_argument(
        "--tokenizer-tls-ca",
        metavar="PEM",
        help="reach the tokenizer service over TLS, trusting this CA certificate "
        "(for a self-signed tokenizer certificate: that certificate)",
    )
    p.add_argument(
        "--tokenizer-auth-token",
        default=None,
        help="bearer token for the tokenizer service (default: the same as --auth-token)",
    )
    _add_engine_flags(p)
    p.set_defaults(func=cmd_serve_inference)

    u = subparsers.add_parser(
        "up",
        help="start the tokenizer and inference services together",
        description="Start both services as separate processes, wait until both are "
        "healthy, print where they listen, and serve until Ctrl-C / SIGTERM.",
    )
    _add_model_flags(u)
    u.add_argument("--host", default="127.0.0.1",
                   help="interface both services listen on (default 127.0.0.1)")  # fmt: skip
    u.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"inference service port (default {DEFAULT_PORT})")  # fmt: skip
    u.add_argument("--tokenizer-port", type=int, default=DEFAULT_TOKENIZER_PORT,
                   help=f"tokenizer service port (default {DEFAULT_TOKENIZER_PORT})")  # fmt: skip
    u.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"inference metrics port (default {DEFAULT_METRICS_PORT}; the tokenizer's is the "
        "next one; 0: off)",
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
    _add_engine_flags(u)
    u.set_defaults(func=cmd_up)


def cmd_serve_inference(args: argparse.Namespace) -> int:
    from inference_service.server import ServerConfig, serve
    from tokenizer_service.auth import Security

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServerConfig(
        model=args.model,
        device=args.device,
        host=args.host,
        port=args.port,
        tokenizer_address=args.tokenizer_address,
        metrics_port=args.metrics_port,
        kv_memory_mb=args.kv_memory,
        num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        max_batch_size=args.max_batch_size,
        max_waiting=args.max_waiting,
        max_num_batched_tokens=args.max_batched_tokens,
        grace_s=args.grace,
        security=Security(args.tls_cert, args.tls_key, args.auth_token or None),
        tokenizer_tls=args.tokenizer_tls,
        tokenizer_tls_ca=args.tokenizer_tls_ca,
        tokenizer_auth_token=args.tokenizer_auth_token or args.auth_token or None,
    )
    try:
        return asyncio.run(serve(cfg))
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        print(f"kuiper serve-inference: {exc}", file=sys.stderr)
        return 1


# ---- kuiper up ---------------------------------------------------------------------------
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

    from tokenizer_service.auth import open_channel

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


def _port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port. Checked before starting: otherwise
    the health check could find another server on that port healthy and take it for ours."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return False  # the server itself will say what is wrong with the address
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


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
        for chunk in client.generate(
            prompt, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=0
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            final = chunk
    if final is not None and final.usage is not None:
        u = final.usage
        print(
            f"\n[{u.completion_tokens} tokens, finish {final.finish_reason}, "
            f"first token after {u.time_to_first_token_s * 1000:.0f} ms]",
            flush=True,
        )


def cmd_up(args: argparse.Namespace) -> int:
    from tokenizer_service.model_source import kuiper_home, resolve_model

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
        if _port_taken(args.host, port):
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
    base = [sys.executable, "-m", "kuiper_client.cli"]
    tok_metrics = args.metrics_port + 1 if args.metrics_port > 0 else -1
    tok_cmd = base + ["serve-tokenizer", "--model", str(model), "--host", args.host,
                      "--port", str(args.tokenizer_port), "--metrics-port", str(tok_metrics)]  # fmt: skip
    inf_cmd = base + [
        "serve-inference", "--model", str(model), "--device", args.device, "--host", args.host,
        "--port", str(args.port), "--tokenizer-address", tok_addr,
        "--metrics-port", str(args.metrics_port), "--block-size", str(args.block_size),
        "--max-batch-size", str(args.max_batch_size), "--max-waiting", str(args.max_waiting),
        "--max-batched-tokens", str(args.max_batched_tokens), "--grace", str(args.grace),
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
    if args.kv_memory is not None:
        inf_cmd += ["--kv-memory", str(args.kv_memory)]
    if args.num_kv_blocks is not None:
        inf_cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]

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
    try:
        for name, cmd, addr, service in (
            ("tokenizer", tok_cmd, tok_addr, ""),
            ("inference", inf_cmd, inf_addr, "kuiper.v1.InferenceService"),
        ):
            # Named by port: two `kuiper up` on one machine keep separate logs.
            log_path = logs / f"{name}-{addr.rsplit(':', 1)[1]}.log"
            with open(log_path, "wb") as log_file:
                # Own session: Ctrl-C reaches only us, and we stop the children in order.
                proc = subprocess.Popen(
                    cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )  # fmt: skip
            procs.append(proc)
            started[name] = (proc, log_path)
            print(f"starting {name} service (log: {log_path}) ...", flush=True)
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
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            for name, (proc, log_path) in started.items():
                if proc.poll() is not None:
                    print(f"kuiper up: {name} service exited ({proc.returncode}); stopping\n"
                          f"{_log_tail(log_path)}", file=sys.stderr)  # fmt: skip
            _stop(procs)
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
