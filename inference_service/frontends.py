"""Several gRPC frontend processes on one port, over one engine core.

One frontend process is CPU-bound at ≈ 1.06 cores (H200, 256 SmolLM2 streams: 0.70 of what
the engine makes; bench/README.md), so `kuiper serve-inference --frontends N` runs N of them:
frontend 0 is the process that was started (it owns the engine core, the metrics port and
the other frontends); frontends 1..N-1 are its children (multiprocessing, spawn). All bind the
same port with SO_REUSEPORT, so the kernel spreads connections over them, and each talks to
the core over its own connection (`engine_core.client.EngineClient(attach=True)`).

Metrics follow prometheus_client's multiprocess mode: every process writes its series to
files in one folder (PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is imported) and
frontend 0's /metrics sums them, so one scrape shows the whole server.

This module imports neither prometheus_client nor grpc nor the engine at the top: the CLI
reads its defaults and calls `prepare()` before prometheus_client is imported.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: the CLI reads this module's defaults for its help
    from inference_service.engine_core.process import CoreAddress

log = logging.getLogger("kuiper.frontends")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode
# GPU default: one frontend delivered ≈ 17 000 tok/s at ≈ 1.06 cores (H200, SmolLM2, 256
# streams) where the engine alone made 26 200: two cover today's engine, four leave room for
# the engine's targets (24 000-35 000 tok/s). Never more than the cores left beside the engine
# core and the tokenizer service.
GPU_FRONTENDS = 4
RESTART_FIRST_S = 1.0  # backoff before a crashed frontend is started again; doubles
RESTART_MAX_S = 30.0


def default_frontends(device_name: str, cpus: int | None = None) -> int:
    """1 on the CPU backend (the engine needs the cores); on a GPU GPU_FRONTENDS, at most
    the cores this process may use minus two."""
    if device_name == "cpu":
        return 1
    cpus = cpus if cpus is not None else available_cpus()
    return max(1, min(GPU_FRONTENDS, cpus - 2))


def available_cpus() -> int:
    """Cores this process may run on: its CPU affinity, and in a container with a CPU limit
    (cgroup v2 cpu.max) that limit rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    return cpus


def multi_frontend_possible(requested: int | None, device: str, single_process: bool) -> bool:
    """Whether this server may run more than one frontend (decided before the model loads:
    the device of "auto" is known only then)."""
    if single_process or not sys.platform.startswith("linux"):
        return False
    if requested is not None:
        return requested > 1
    return device != "cpu"


@dataclass(frozen=True)
class Runtime:
    """Frontend 0's private folder: the core's socket and the metrics files."""

    folder: Path
    core: CoreAddress

    @property
    def metrics_dir(self) -> Path:
        return self.folder / "metrics"


def prepare() -> Runtime:
    """Make the private folder and switch prometheus_client to multiprocess mode (before it
    is imported anywhere in this process; the frontends and the core inherit it)."""
    from inference_service.engine_core.process import CoreAddress

    if "prometheus_client" in sys.modules and METRICS_DIR_ENV not in os.environ:
        raise RuntimeError("prometheus_client was imported before the frontends were prepared")
    folder = Path(tempfile.mkdtemp(prefix="kuiper-"))  # mode 0700: ours alone
    runtime = Runtime(folder, CoreAddress(str(folder / "core.sock"), secrets.token_bytes(32)))
    runtime.metrics_dir.mkdir()
    os.environ[METRICS_DIR_ENV] = str(runtime.metrics_dir)
    return runtime


def cleanup(runtime: Runtime) -> None:
    shutil.rmtree(runtime.folder, ignore_errors=True)


def multiprocess_metrics() -> bool:
    return bool(os.environ.get(METRICS_DIR_ENV))


@dataclass(frozen=True)
class FrontendSlot:
    """What frontend `index` (>= 1) needs besides the ServerConfig."""

    index: int
    count: int
    port: int  # the port frontend 0 bound
    core: CoreAddress


def watch_parent() -> None:
    """In frontends 1..N-1: frontend 0 forwards SIGTERM (drain); if it dies without doing
    so, drain anyway."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def orphaned() -> None:
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="kuiper-parent-watch", daemon=True).start()


class FrontendPool:
    """Frontend 0's children: frontends 1..count-1, restarted (with backoff) when one dies.
    `target(cfg, slot)` is what each runs (server.frontend_main)."""

    def __init__(self, target: Callable, cfg, count: int, port: int, core: CoreAddress):
        self.target = target
        self.cfg = cfg
        self.count = count
        self.port = port
        self.core = core
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs.values() if p.pid is not None]

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)
        self._thread = threading.Thread(target=self._supervise, name="kuiper-frontends",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _spawn(self, index: int) -> None:
        slot = FrontendSlot(index, self.count, self.port, self.core)
        proc = self._ctx.Process(
            target=self.target, args=(self.cfg, slot), name=f"kuiper-frontend-{index}"
        )
        proc.start()
        with self._lock:
            self._procs[index] = proc
        log.info("frontend %d started (pid %s)", index, proc.pid)

    def _supervise(self) -> None:
        from multiprocessing.connection import wait

        crashes: dict[int, int] = {}
        while not self._stopping:
            with self._lock:
                by_sentinel = {p.sentinel: (i, p) for i, p in self._procs.items()}
            ready = wait(list(by_sentinel), timeout=1.0)
            for sentinel in ready:
                index, proc = by_sentinel[sentinel]
                proc.join()
                _forget_metrics(proc.pid)
                if self._stopping:
                    continue
                crashes[index] = crashes.get(index, 0) + 1
                delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (crashes[index] - 1))
                log.error("frontend %d (pid %s) exited (code %s); starting it again in %gs",
                          index, proc.pid, proc.exitcode, delay)  # fmt: skip
                time.sleep(delay)
                if self._stopping:
                    continue
                self._spawn(index)
                self.restarts += 1

    def terminate(self) -> None:
        """SIGTERM every frontend: each drains (stops accepting, finishes its streams)."""
        self._stopping = True
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)

    def join(self, timeout: float) -> None:
        """Wait for every frontend to exit; kill what is left after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning(
                    "frontend pid %s still running after the grace period; killed", proc.pid
                )
                proc.kill()
                proc.join()
            _forget_metrics(proc.pid)


def _forget_metrics(pid: int | None) -> None:
    """A frontend is gone: drop its live gauges (its counters stay in the sums)."""
    if pid is None or not multiprocess_metrics():
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)
