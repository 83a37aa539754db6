"""The numba kernels behind backends/cpu_kernels.py, in their own module so that numba is
imported (and the kernels loaded from numba's cache) only when a quantized weight is used."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# fastmath lets LLVM reorder the float sums into SIMD lanes; results differ from a serial
# sum by rounding only (tests compare against float64 numpy with a tolerance). Inner loop
# lengths (group, half) are run-time arguments on purpose: with a constant 16 or 32 LLVM
# unrolls the loop fully and then fails to vectorize it (measured: 8x slower).


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def int8_matvec(x, q, scales, group, out):  # pragma: no cover - compiled
    n, k = q.shape
    t_count = x.shape[0]
    ng = k // group
    for r in prange(n):
        for t in range(t_count):
            acc = np.float32(0.0)
            for b in range(ng):
                part = np.float32(0.0)
                base = b * group
                for j in range(group):
                    part += np.float32(q[r, base + j]) * x[t, base + j]
                acc += part * scales[r, b]
            out[t, r] = acc


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def q4_matvec(x, xsum, qs, d, m, half, out):  # pragma: no cover - compiled
    n = qs.shape[0]
    nb = d.shape[1]
    t_count = x.shape[0]
    for r in prange(n):
        for t in range(t_count):
            acc = np.float32(0.0)
            for b in range(nb):
                part = np.float32(0.0)
                xo = 2 * half * b
                qo = half * b
                for j in range(half):
                    # Nibbles split in float: numba widens integer & and >> to int64,
                    # whose float conversion does not vectorize.
                    v = np.float32(qs[r, qo + j])
                    hi = np.floor(v * np.float32(0.0625))
                    lo = v - np.float32(16.0) * hi
                    part += lo * x[t, xo + j] + hi * x[t, xo + half + j]
                acc += d[r, b] * part + m[r, b] * xsum[t, b]
            out[t, r] = acc


# Serial on purpose: the tiles feed OpenBLAS, whose threads spin between calls; a parallel
# numba pool fighting them for 2 cores made prefill 10-30x slower (measured).
@njit(fastmath=True, cache=True, nogil=True)
def int8_dequant_rows(q, scales, group, r0, out):  # pragma: no cover - compiled
    rows, k = out.shape
    for i in range(rows):
        for b in range(k // group):
            sb = scales[r0 + i, b]
            for j in range(b * group, b * group + group):
                out[i, j] = np.float32(q[r0 + i, j]) * sb


@njit(fastmath=True, cache=True, nogil=True)
def q4_dequant_rows(qs, d, m, half, r0, out):  # pragma: no cover - compiled
    rows = out.shape[0]
    nb = d.shape[1]
    for i in range(rows):
        for b in range(nb):
            db = d[r0 + i, b]
            mb = m[r0 + i, b]
            for j in range(half):
                v = np.float32(qs[r0 + i, b * half + j])
                hi = np.floor(v * np.float32(0.0625))
                lo = v - np.float32(16.0) * hi
                out[i, 2 * half * b + j] = lo * db + mb
                out[i, 2 * half * b + half + j] = hi * db + mb
