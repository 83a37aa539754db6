"""Run a gRPC server as a subprocess for a test: free loopback port, wait for health SERVING,
logs captured to a file, clean stop by signal with the exit code returned.

    from servers import free_port, kuiper_command, start_server

    port = free_port()
    with start_server(kuiper_command("serve-tokenizer", "--model", str(path),
                                     "--port", str(port), "--metrics-port", "-1"), port) as srv:
        channel = grpc.insecure_channel(srv.address)
        ...
        assert srv.stop() == 0  # SIGTERM, drain, exit 0

Works for any server that serves grpc.health.v1 (the tokenizer and the inference service).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kuiper_command(*cli_args: str) -> list[str]:
    """argv for the `kuiper` CLI run by this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "kuiper_serve.cli", *cli_args]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate + key (PEM) for localhost and 127.0.0.1, made with the openssl
    command (pytest.skip when it is missing). The certificate is its own CA."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one when `credentials` are given."""
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def wait_until(pred, timeout: float = 20.0, what: str = ""):
    """pred()'s first truthy value, asked every 50 ms; the test fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def health_status(
    address: str,
    service: str = "",
    timeout: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> int | None:
    """The server's health status for `service`, or None when it does not answer."""
    with open_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return reply.status


class ServerProcess:
    """A server subprocess. Use as a context manager to be sure it is gone afterwards."""

    def __init__(
        self,
        proc: subprocess.Popen,
        port: int,
        log_path: Path,
        host: str,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.proc = proc
        self.credentials = credentials
        self.port = port
        self.host = host
        self.log_path = log_path
        self.address = f"{host}:{port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> ServerProcess:
        """Block until health reports SERVING; raise (with the server log) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before serving:\n"
                    f"{self.log_text()}"
                )
            status = health_status(self.address, service, 0.5, self.credentials)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server not SERVING within {timeout:g}s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig`, wait for the exit and return the exit code (kill after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(
                    f"server still running {timeout:g}s after signal {sig}; killed it:\n"
                    f"{self.log_text()}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_server(
    args: list[str],
    port: int,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    *,
    wait: bool = True,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    health_service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Start `args` (a full argv, e.g. from kuiper_command) that will listen on `port`.

    With wait=True (default) return once gRPC health says SERVING; with wait=False return at
    once, so several servers can start side by side, then call `wait_ready()` on each.
    `env` defaults to this environment with the repo on PYTHONPATH. `credentials`: channel
    credentials for a TLS server's health probe.
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"server-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else server_env(),
            cwd=REPO_ROOT,
        )
    server = ServerProcess(proc, port, log_path, host, credentials)
    if wait:
        try:
            server.wait_ready(timeout, health_service)
        except BaseException:
            server.kill()
            raise
    return server
