"""CPU matmuls over quantized weights (numba), without expanding the weights to float32.

`linear(x, w)` computes x @ w.T for x [T, in] float32 and w a float32 array, an Int8Weight
or a Q4Weight. Quantized weights take one of two paths:

* few tokens (decode, T < PREFILL_TOKENS): a compiled kernel reads each weight row once and
  dequantizes in registers, rows spread over threads. Decode is memory-bound, so reading
  4-8 bits instead of 32 per weight is where the speed comes from.
* many tokens (prefill): tiles of rows are dequantized into a small float32 buffer that stays
  in cache and multiplied by BLAS sgemm, which keeps prefill as fast as the float32 path.

bench/quant.py measured both against the alternatives (numpy dequantize-per-call, float32
BLAS); bench/README.md has the figures.
"""

from __future__ import annotations

import numpy as np

from inference_service.models.quantized import Q4_BLOCK, Int8Weight, Q4Weight

PREFILL_TOKENS = 16  # from here on, dequantized tiles + sgemm beat the direct kernel
TILE_ELEMS = 1 << 21  # weights dequantized per sgemm tile (8 MiB of fp32, L3-resident);
# few large sgemm calls: each call wakes OpenBLAS's thread pool, which costs on a busy machine


def set_threads(n: int) -> None:
    """Threads the kernels use (numba's pool; at most its size, NUMBA_NUM_THREADS)."""
    try:
        import numba
    except ImportError:  # float32-only use needs no numba (see _jit)
        return
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _jit():
    """The compiled kernels; numba is imported here, on the first quantized weight."""
    from inference_service.backends import cpu_jit

    return cpu_jit


# ---------------------------------------------------------------------------- entry points


def matvec(x: np.ndarray, w: Int8Weight | Q4Weight) -> np.ndarray:
    """x [T, in] @ w.T with the direct kernel (any T; meant for few tokens)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = w.shape
    if x.shape[1] != k:
        raise ValueError(f"input has {x.shape[1]} features, the weight expects {k}")
    out = np.empty((x.shape[0], n), dtype=np.float32)
    if isinstance(w, Int8Weight):
        _jit().int8_matvec(x, w.q, w.scales, w.group, out)
    else:
        xsum = x.reshape(x.shape[0], k // Q4_BLOCK, Q4_BLOCK).sum(axis=-1)
        _jit().q4_matvec(x, xsum, w.qs, w.d, w.m, Q4_BLOCK // 2, out)
    return out


def dequantize_rows(w: Int8Weight | Q4Weight, r0: int, out: np.ndarray) -> None:
    """Rows r0 .. r0 + len(out) of w, dequantized into out (float32 [rows, in])."""
    if isinstance(w, Int8Weight):
        _jit().int8_dequant_rows(w.q, w.scales, w.group, r0, out)
    else:
        _jit().q4_dequant_rows(w.qs, w.d, w.m, Q4_BLOCK // 2, r0, out)


def matmul_tiled(x: np.ndarray, w: Int8Weight | Q4Weight) -> np.ndarray:
    """x [T, in] @ w.T by dequantizing tiles of rows into a buffer and multiplying them with
    sgemm (for many tokens)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = w.shape
    tile_rows = max(1, min(n, TILE_ELEMS // k))
    out_t = np.empty((n, x.shape[0]), dtype=np.float32)
    buf = np.empty((tile_rows, k), dtype=np.float32)
    xt = x.T
    for r0 in range(0, n, tile_rows):
        rows = min(tile_rows, n - r0)
        tile = buf[:rows]
        dequantize_rows(w, r0, tile)
        np.matmul(tile, xt, out=out_t[r0 : r0 + rows])
    return np.ascontiguousarray(out_t.T)


def linear(x: np.ndarray, w: np.ndarray | Int8Weight | Q4Weight) -> np.ndarray:
    """x [T, in] @ w.T for a float32 array or a quantized weight."""
    if isinstance(w, np.ndarray):
        return x @ w.T
    if x.shape[0] < PREFILL_TOKENS:
        return matvec(x, w)
    return matmul_tiled(x, w)


def embedding_rows(w: np.ndarray | Int8Weight | Q4Weight, ids: np.ndarray) -> np.ndarray:
    """float32 rows `ids` of an embedding table (quantized tables dequantize only those)."""
    if isinstance(w, np.ndarray):
        return np.asarray(w[ids], dtype=np.float32)
    return w.take_rows(np.asarray(ids)).dequantize()


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, on tiny inputs, so the first
    request does not wait for it."""
    from inference_service.models.quantized import from_gguf_blocks

    x = np.ones((1, 32), np.float32)
    i8 = Int8Weight(np.ones((2, 32), np.int8), np.ones((2, 1), np.float32), 32)
    q4 = from_gguf_blocks(np.zeros((2, 20), np.uint8), "Q4_1", (2, 32))
    for w in (i8, q4):
        matvec(x, w)
        dequantize_rows(w, 0, np.empty((1, 32), np.float32))


class QuantMatrix:
    """A quantized [out, in] matrix the reference forward (models/forward.py) uses as it uses
    a float32 array: `x @ m.T` runs `linear`, `m[ids]` dequantizes those rows.
    `__array_ufunc__ = None` makes numpy hand `ndarray @ m.T` over to `__rmatmul__`."""

    __array_ufunc__ = None

    def __init__(self, w: Int8Weight | Q4Weight) -> None:
        self.w = w

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    @property
    def T(self) -> _Transposed:  # noqa: N802 - mirrors ndarray.T
        return _Transposed(self.w)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        return embedding_rows(self.w, ids)


class _Transposed:
    __array_ufunc__ = None

    def __init__(self, w: Int8Weight | Q4Weight) -> None:
        self.w = w

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return linear(x, self.w)
