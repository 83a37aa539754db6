"""Helpers for calling single kernels from tests: a pushed context, bf16 round trips."""

from __future__ import annotations

import numpy as np

from inference_service.backends.cuda_weights import bf16_bits_to_f32, to_bf16_bits


def bf16_round(a: np.ndarray) -> np.ndarray:
    """a rounded to bf16 and back to float32 (what the device sees)."""
    return bf16_bits_to_f32(to_bf16_bits(np.asarray(a, np.float32)))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), "non-finite output"
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
