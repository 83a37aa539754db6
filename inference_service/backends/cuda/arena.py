"""Host-side packing of a model's weights for the CUDA backend: bf16 conversion and the layout
of the one device weight arena (the fused layout of models/layout.py: bf16 matrices, norms and
biases in fp32).
No device needed; memory.WeightArena copies each tensor to arena + offset."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

from inference_service.models.config import ModelConfig
from inference_service.models.layout import fuse, model_tensors
from inference_service.models.quantized import is_quantized

ALIGN = 256  # bytes: every tensor starts 256-aligned (128-bit loads, cp.async)
_CHUNK = 1 << 22  # elements converted at a time (bounds the temporaries of big tensors)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of a, rounded to nearest even. uint16 input is taken as bf16
    bits already (and ml_dtypes/torch-exported bfloat16 arrays as such)."""
    if a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return np.ascontiguousarray(a).view(np.uint16)
    flat = np.ascontiguousarray(a).reshape(-1)
    out = np.empty(flat.shape, np.uint16)
    for lo in range(0, flat.size, _CHUNK):
        f = flat[lo : lo + _CHUNK].astype(np.float32)
        u = f.view(np.uint32)
        r = (
            (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        ).astype(np.uint16)
        r[np.isnan(f)] = 0x7FC0
        out[lo : lo + _CHUNK] = r
    return out.reshape(a.shape)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(frozen=True)
class ArenaEntry:
    name: str
    offset: int  # bytes from the arena start
    nbytes: int
    build: Callable[[], np.ndarray]  # host array (uint16 bf16 bits or float32) to copy there


def _f32(a: np.ndarray) -> np.ndarray:
    """float32 values of a; uint16 (and bfloat16) input is bf16 bits, as in to_bf16_bits."""
    if a.dtype == np.uint16 or a.dtype.name == "bfloat16":
        return bf16_bits_to_f32(np.ascontiguousarray(a).view(np.uint16))
    return np.ascontiguousarray(a, dtype=np.float32)


def _bf16_of(a: object) -> np.ndarray:
    """bf16 bits of a host weight; quantized ones (models/quantized.py) are dequantized first:
    the arena holds bf16 whatever the source."""
    return to_bf16_bits(a.dequantize() if is_quantized(a) else a)


def plan_arena(c: ModelConfig, w: Mapping[str, object]) -> tuple[list[ArenaEntry], int]:
    """Entries (in upload order) and total bytes of the weight arena: the tensors of the fused
    layout (models/layout.py), matrices as bf16, norms and biases as fp32."""
    entries: list[ArenaEntry] = []
    off = 0
    for t in model_tensors(c):
        convert, itemsize = (_bf16_of, 2) if t.is_matrix else (_f32, 4)
        nbytes = itemsize * math.prod(t.shape)
        entries.append(ArenaEntry(t.name, off, nbytes, partial(fuse, t, w, convert)))
        off += -(-nbytes // ALIGN) * ALIGN
    return entries, off


def weight_bytes_read_per_token(c: ModelConfig) -> int:
    """bf16 bytes a batch-1 decode step must read: every layer matrix and the lm_head (the
    embedding row is one row, not the table). The HBM roofline's numerator."""
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    per_layer = (
        qkv * c.hidden_size
        + c.hidden_size * c.num_heads * c.head_dim
        + 3 * c.intermediate_size * c.hidden_size
    )
    return 2 * (c.num_layers * per_layer + c.vocab_size * c.hidden_size)
