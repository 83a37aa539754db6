"""Helpers for calling single kernels from tests: a pushed context, bf16 round trips."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from inference_service.backends.cuda.arena import bf16_bits_to_f32, to_bf16_bits


def bf16_round(a: np.ndarray) -> np.ndarray:
    """a rounded to bf16 and back to float32 (what the device sees)."""
    return bf16_bits_to_f32(to_bf16_bits(np.asarray(a, np.float32)))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), "non-finite output"
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


@contextmanager
def kernel_context():
    """The device's primary context pushed in this thread, and every kernel compiled and
    loaded: yields (pycuda.driver, cuda_kernels.Kernels); pops the context after."""
    import pycuda.driver as cuda

    from cuda_kernels import load_kernels

    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        yield cuda, load_kernels()
        cuda.Context.synchronize()
    finally:
        ctx.pop()
