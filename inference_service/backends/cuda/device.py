"""The GPU a CUDA backend runs on: PyCUDA's primary context, pushed once per thread that uses
it, and the backend's one stream (PyCUDA's, with its driver handle for cuda.bindings)."""

from __future__ import annotations

import atexit
import threading
from typing import Any

# Threads in which a backend pushed the primary context (one push per thread). PyCUDA insists
# that the main thread's context stack is empty at exit, so that push is popped at exit.
_PUSHED: dict[int, Any] = {}


def _pop_main_thread_context() -> None:
    if _PUSHED.pop(threading.get_ident(), None) is not None:
        import pycuda.driver as cuda

        try:
            cuda.Context.synchronize()
            cuda.Context.pop()
        except cuda.Error:
            pass


class Device:
    """Device `index`: its primary context (current in the constructing thread afterwards),
    name, SM count and one stream."""

    def __init__(self, index: int) -> None:
        import pycuda.driver as cuda
        from cuda.bindings import driver

        self.cuda = cuda
        cuda.init()
        dev = cuda.Device(index)
        self._ctx = dev.retain_primary_context()
        self.enter()
        self.name = f"cuda:{index} ({dev.name()})"
        self.sm_count = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.stream = cuda.Stream()
        self.cu_stream = driver.CUstream(self.stream.handle)  # what cuda.bindings launches take

    def enter(self) -> None:
        """Make the primary context current in the calling thread (the engine thread may
        differ from the one that built the backend); push it once per thread."""
        tid = threading.get_ident()
        if tid in _PUSHED:
            return
        self._ctx.push()
        _PUSHED[tid] = self._ctx
        if threading.current_thread() is threading.main_thread():
            atexit.register(_pop_main_thread_context)

    def leave(self) -> None:
        """Pop the context pushed in the calling thread, unless that is the main thread
        (popped at exit). PyCUDA aborts the process when any thread ends with a non-empty
        context stack."""
        tid = threading.get_ident()
        if threading.current_thread() is not threading.main_thread() and tid in _PUSHED:
            self.cuda.Context.synchronize()
            del _PUSHED[tid]
            self.cuda.Context.pop()

    def synchronize(self) -> None:
        self.stream.synchronize()
