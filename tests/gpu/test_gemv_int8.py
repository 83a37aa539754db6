"""The int8 weight-only decode GEMV (cuda_kernels/gemv_int8.cu) against float64 numpy on the
exact int8 values and fp16 scales it reads. Tolerances as in test_kernels.py (relative L2):
fp32 outputs 2e-3 (fp32 summation order; x is bf16, exact), bf16 outputs 6e-3."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_util import kernel_context, rel_err

from inference_service.backends.cuda.arena import bf16_bits_to_f32, to_bf16_bits
from inference_service.quant.int8 import quantize_int8

pytestmark = pytest.mark.gpu
TOL_F32, TOL_BF16 = 2e-3, 6e-3


@pytest.fixture(scope="module")
def K():
    with kernel_context() as k:
        yield k


def gemv_i8(K, nt, q, scales, x_bits, y, ymode, y_stride, bias, grid=None):
    cuda, kernels = K
    n, k = q.shape
    grid = grid or max(1, min(-(-n // 4), 132 * 8))
    kernels.kernel(f"gemv_i8_t{nt}", "PPiiiPiPiiP").launch(
        (grid, 1, 1), (128, 1, 1), cuda.to_device(q), cuda.to_device(scales), n, k,
        k // scales.shape[1], cuda.to_device(x_bits), k, y, ymode, y_stride, bias,
        shared=nt * k * 2,
    )  # fmt: skip
    cuda.Context.synchronize()


@pytest.mark.parametrize("nt", [1, 2, 4, 8])
@pytest.mark.parametrize("shape,group", [((333, 128), 64), ((1000, 576), 64), ((77, 8192), 128),
                                         ((2048, 2048), 128)])  # fmt: skip
def test_gemv_int8_against_float64(K, nt, shape, group):
    cuda, _ = K
    n, k = shape
    rng = np.random.default_rng(nt * 7 + n)
    q, scales = quantize_int8(rng.standard_normal((n, k)).astype(np.float32) * 0.05, group)
    x_bits = to_bf16_bits(rng.standard_normal((nt, k)).astype(np.float32))
    w = q.astype(np.float64).reshape(n, k // group, group) * scales.astype(np.float64)[:, :, None]
    ref = bf16_bits_to_f32(x_bits).astype(np.float64) @ w.reshape(n, k).T  # [nt, n]
    bias = rng.standard_normal(n).astype(np.float32)
    # ymode 2: fp32 store
    y = cuda.to_device(np.full((nt, n), np.nan, np.float32))
    gemv_i8(K, nt, q, scales, x_bits, y, 2, n, 0)
    assert rel_err(cuda.from_device(y, (nt, n), np.float32), ref) < TOL_F32
    # ymode 1: fp32 accumulate into a residual; a small grid makes warps loop over rows
    base = rng.standard_normal((nt, n)).astype(np.float32)
    y = cuda.to_device(base)
    gemv_i8(K, nt, q, scales, x_bits, y, 1, n, 0, grid=3)
    assert rel_err(cuda.from_device(y, (nt, n), np.float32), base + ref) < TOL_F32
    # ymode 0: bf16 + bias
    y = cuda.to_device(np.full((nt, n), 0x7FC0, np.uint16))
    gemv_i8(K, nt, q, scales, x_bits, y, 0, n, cuda.to_device(bias))
    got = bf16_bits_to_f32(cuda.from_device(y, (nt, n), np.uint16))
    assert rel_err(got, ref + bias) < TOL_BF16


def test_gemv_int8_extreme_codes(K):
    """-127..127 and all-zero groups decode exactly (the 2^23 trick in unpack_i8x4)."""
    cuda, _ = K
    n, k = 64, 256
    q = np.tile(np.arange(-127, 129, dtype=np.int16)[:k].clip(-127, 127), (n, 1)).astype(np.int8)
    scales = np.full((n, k // 64), 0.5, np.float16)
    scales[:, 1] = 0
    x_bits = to_bf16_bits(np.ones((1, k), np.float32))
    y = cuda.to_device(np.full((1, n), np.nan, np.float32))
    gemv_i8(K, 1, q, scales, x_bits, y, 2, n, 0)
    want = 0.5 * (q[0, :64].sum() + q[0, 128:].sum())
    np.testing.assert_array_equal(cuda.from_device(y, (1, n), np.float32)[0], np.full(n, want))
