"""The GPU benchmarks' device setup: device 0's primary context, current in this thread for
the `with` block (synchronized and popped after it, as PyCUDA requires before exit)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def primary_context(index: int = 0) -> Iterator[tuple[Any, Any]]:
    """(pycuda.driver, the pycuda Device) with the device's primary context pushed."""
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(index)
    ctx = dev.retain_primary_context()
    ctx.push()
    try:
        yield cuda, dev
    finally:
        cuda.Context.synchronize()
        ctx.pop()
