"""The int8 format of `kuiper export`: symmetric per-group int8 along the input dimension
with fp16 scales (models/quantized.py holds the in-memory Int8Weight)."""

from __future__ import annotations

import numpy as np

GROUP_SIZES = (64, 128)  # what `kuiper export --group-size` accepts


def quantize_int8(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group int8 of a [out, in] matrix: (q int8 [out, in], scales float16
    [out, in // group]) with w ≈ q * scale.

    scale = max|w| / 127 of the group, rounded to fp16 first, and q = round(w / scale) with
    that fp16 scale, so the stored pair reconstructs w within scale / 2 per element (plus
    the clip at ±127 when fp16 rounding shrank the scale: still ≤ scale / 2 + ε). An all-zero
    group gets scale 0 and q 0."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8 needs a 2-D [out, in] matrix, got shape {w.shape}")
    out, k = w.shape
    if k % group:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {group}")
    g = w.reshape(out, k // group, group)
    amax = np.abs(g).max(axis=-1)
    scales = (amax / 127.0).astype(np.float16)
    s32 = scales.astype(np.float32)
    safe = np.where(s32 > 0, s32, 1.0)
    q = np.clip(np.rint(g / safe[:, :, None]), -127, 127).astype(np.int8)
    return q.reshape(out, k), scales


def choose_group(k: int, wanted: int) -> int:
    """The group size for an input dimension k: `wanted` when it divides k, else the largest
    power of two below it that does (at least 16), as the ancestor's exporter backed off."""
    g = wanted
    while g >= 16:
        if k % g == 0:
            return g
        g //= 2
    raise ValueError(f"input dimension {k} has no group size in 16..{wanted} dividing it")
