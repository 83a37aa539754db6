"""Quantized weight matrices that stay quantized in memory (what loaders return with
keep_quantized=True; quant/int8.py makes int8 ones, backends/cpu_kernels.py multiplies them).

Two kinds cover every quantized weight a backend sees:

* `Int8Weight`: symmetric per-group int8 along the input dimension, value = q * scale, one
  scale per `group` consecutive inputs of a row. `kuiper export` writes it (group 64 or 128, fp16
  scales on disk), GGUF Q8_0 is the same thing with group 32, and the ancestor's int8 files
  are the same with group 64 and fp32 scales.
* `Q4Weight`: GGUF Q4_0 / Q4_1 blocks of 32 inputs, value = nibble * d + m (Q4_0 is
  m = -8 d). Nibbles stay packed two per byte in GGUF's block order: byte j of a block holds
  input j in its low half and input j + 16 in its high half.

Scales are widened to float32 once at load (they are 1/32 of the weights or less), so the
kernels never convert fp16 on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Q4_BLOCK = 32


@dataclass(frozen=True)
class Int8Weight:
    q: np.ndarray  # int8 [out, in]
    scales: np.ndarray  # float32 [out, in // group]
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        out, k = self.q.shape
        w = self.q.reshape(out, k // self.group, self.group).astype(np.float32)
        return (w * self.scales[:, :, None]).reshape(out, k)

    def take_rows(self, rows: np.ndarray) -> Int8Weight:
        return Int8Weight(self.q[rows], self.scales[rows], self.group)


@dataclass(frozen=True)
class Q4Weight:
    qs: np.ndarray  # uint8 [out, in // 2], GGUF block order (see the module docstring)
    d: np.ndarray  # float32 [out, in // 32]
    m: np.ndarray  # float32 [out, in // 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + self.m.nbytes

    def dequantize(self) -> np.ndarray:
        out, k = self.shape
        b = self.qs.reshape(out, k // Q4_BLOCK, Q4_BLOCK // 2)
        nib = np.concatenate([b & 15, b >> 4], axis=-1).astype(np.float32)
        return (nib * self.d[:, :, None] + self.m[:, :, None]).reshape(out, k)

    def take_rows(self, rows: np.ndarray) -> Q4Weight:
        return Q4Weight(self.qs[rows], self.d[rows], self.m[rows])


QuantizedWeight = Int8Weight | Q4Weight


def is_quantized(w: object) -> bool:
    return isinstance(w, Int8Weight | Q4Weight)


def dequantize(w: np.ndarray | QuantizedWeight) -> np.ndarray:
    """float32 [out, in] of any weight (a plain array is returned as float32)."""
    if isinstance(w, Int8Weight | Q4Weight):
        return w.dequantize()
    return np.asarray(w, dtype=np.float32)


def weight_nbytes(w: np.ndarray | QuantizedWeight) -> int:
    return w.nbytes


def concat_rows(parts: list[np.ndarray | QuantizedWeight]) -> np.ndarray | QuantizedWeight:
    """Stack weights along the output dimension (q|k|v, gate|up). Quantized parts of one
    kind and group stay quantized; any mix falls back to float32."""
    first = parts[0]
    if all(isinstance(p, Int8Weight) and p.group == first.group for p in parts):
        return Int8Weight(
            np.concatenate([p.q for p in parts]),
            np.concatenate([p.scales for p in parts]),
            first.group,
        )
    if all(isinstance(p, Q4Weight) for p in parts):
        return Q4Weight(
            np.concatenate([p.qs for p in parts]),
            np.concatenate([p.d for p in parts]),
            np.concatenate([p.m for p in parts]),
        )
    return np.ascontiguousarray(np.concatenate([dequantize(p) for p in parts]))


# ---------------------------------------------------------------------------- int8 format


def int8_weight(q: np.ndarray, scales: np.ndarray) -> Int8Weight:
    """An Int8Weight from stored arrays (scales of any float type); the group size follows
    from the shapes."""
    out, k = q.shape
    if scales.ndim != 2 or scales.shape[0] != out or scales.shape[1] == 0 or k % scales.shape[1]:
        raise ValueError(f"scales of shape {scales.shape} do not fit int8 weights {q.shape}")
    return Int8Weight(
        np.ascontiguousarray(q, dtype=np.int8),
        np.ascontiguousarray(scales, dtype=np.float32),
        k // scales.shape[1],
    )


# ---------------------------------------------------------------------------- GGUF blocks


def from_gguf_blocks(raw: np.ndarray, qtype_name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """Repack GGUF Q8_0 / Q4_0 / Q4_1 rows of raw bytes [out, row bytes] without expanding
    them to float32."""
    out, k = shape
    nb = k // Q4_BLOCK
    raw = np.ascontiguousarray(raw).reshape(out, nb, -1)
    if qtype_name == "Q8_0":  # fp16 d, 32 x int8
        d = raw[:, :, :2].copy().view(np.float16)[:, :, 0]
        q = raw[:, :, 2:].copy().view(np.int8).reshape(out, k)
        return Int8Weight(q, d.astype(np.float32), Q4_BLOCK)
    if qtype_name == "Q4_0":  # fp16 d, 16 bytes of nibbles; value = (nib - 8) d
        d = raw[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        qs = raw[:, :, 2:].reshape(out, k // 2).copy()
        return Q4Weight(qs, d, -8.0 * d)
    if qtype_name == "Q4_1":  # fp16 d, fp16 m, 16 bytes; value = nib d + m
        dm = raw[:, :, :4].copy().view(np.float16)
        qs = raw[:, :, 4:].reshape(out, k // 2).copy()
        return Q4Weight(qs, dm[:, :, 0].astype(np.float32), dm[:, :, 1].astype(np.float32))
    raise ValueError(f"GGUF type {qtype_name} is not kept quantized")


GGUF_KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
