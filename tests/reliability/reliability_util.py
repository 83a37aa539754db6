"""Fixtures and helpers of the reliability suite (not a conftest.py: a second module named
conftest would shadow tests/conftest.py for `from conftest import ...`): one served stack (tiny random Llama + BPE tokenizer, both
services as subprocesses on loopback, a bearer token) shared by the modules that do not stop or restart it.

Short mode (the default, what CI runs) keeps every test bounded to seconds; `pytest -m long
tests/reliability` runs the long variants (more streams, more time, more fuzz examples)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from servers import wait_until  # noqa: F401  (the reliability tests import it from here)
from serving_stack import StackSecurity, run_stack, tiny_model  # noqa: F401  (fixture)

TOKEN = "reliability-s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def long_mode(config: pytest.Config) -> bool:
    """`-m long` selects the long runs; the short variants then scale up too."""
    return "long" in (config.getoption("-m") or "")


@pytest.fixture(scope="session")
def secured_stack(tiny_model):  # noqa: F811
    """Both services with the bearer token (plaintext), 128 KV blocks of 8 tokens."""
    with run_stack(tiny_model, "--num-kv-blocks", "128", "--block-size", "8",
                   security=StackSecurity(token=TOKEN)) as stack:  # fmt: skip
        yield stack


def rss_mb(pid: int) -> float:
    """The resident memory of process pid, in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class TimedStream:
    """A Generate stream read on a thread, recording when each message arrived."""

    def __init__(self, stub, request, metadata=AUTH, timeout: float = 120.0) -> None:
        self.times: list[float] = []
        self.messages: list = []
        self.error: grpc.RpcError | None = None
        self.call = stub.Generate(request, metadata=metadata, timeout=timeout)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.times.append(time.monotonic())
                self.messages.append(msg)
        except grpc.RpcError as exc:
            self.error = exc

    def max_gap(self, start: float, end: float) -> float:
        """The longest wait between messages (or the window's ends) within [start, end]."""
        inside = [start] + [t for t in self.times if start <= t <= end] + [end]
        return max(b - a for a, b in zip(inside, inside[1:], strict=False))

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
