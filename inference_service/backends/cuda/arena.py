"""Host-side packing of a model's weights for the CUDA backend: bf16 conversion and the layout
of the one device weight arena (the fused layout of models/layout.py: bf16 matrices, norms and
biases in fp32).
No device needed; the backend copies each tensor to arena + offset."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from inference_service.backends.cuda.shapes import InputLayout, blocks_for_memory, kv_block_bytes
from inference_service.models.config import ModelConfig
from inference_service.models.layout import fuse, model_tensors

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


def plan_arena(c: ModelConfig, w: Mapping[str, np.ndarray]) -> tuple[list[ArenaEntry], int]:
    """Entries (in upload order) and total bytes of the weight arena: the tensors of the fused
    layout (models/layout.py), matrices as bf16, norms and biases as fp32."""
    entries: list[ArenaEntry] = []
    off = 0
    for t in model_tensors(c):
        convert, itemsize = (to_bf16_bits, 2) if t.is_matrix else (_f32, 4)
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


class WeightArena:
    """Every weight in one device allocation; `ptr[name]` is a tensor's device address (names
    as in plan_arena; a tied lm_head is the embedding table)."""

    def __init__(self, cuda: Any, c: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
        entries, total = plan_arena(c, weights)
        self._mem = cuda.mem_alloc(total)
        base = int(self._mem)
        self.ptr: dict[str, int] = {}
        for e in entries:
            host = e.build()
            assert host.nbytes == e.nbytes, (e.name, host.nbytes, e.nbytes)
            cuda.memcpy_htod(base + e.offset, host)
            self.ptr[e.name] = base + e.offset
        if c.tie_word_embeddings:
            self.ptr["lm_head"] = self.ptr["embed"]
        self.nbytes = total


KV_FREE_FRACTION = 0.90  # of the memory left after weights + workspace, when no size is given


class KvPool:
    """The paged KV cache: [layer][k|v][block][slot][kv head][head dim] bf16, plus one scratch
    block (index num_blocks) that padded graph rows read and write. Sized from num_blocks, else
    from kv_memory_bytes, else from KV_FREE_FRACTION of the free device memory."""

    def __init__(self, cuda: Any, c: ModelConfig, block_size: int, num_blocks: int | None,
                 kv_memory_bytes: int | None, device_name: str) -> None:  # fmt: skip
        per_block = kv_block_bytes(c, block_size)
        if not num_blocks:
            if kv_memory_bytes:
                num_blocks = blocks_for_memory(kv_memory_bytes, c, block_size)
            else:
                free, _ = cuda.mem_get_info()
                num_blocks = blocks_for_memory(int(free * KV_FREE_FRACTION), c, block_size)
        if num_blocks < 1:
            raise ValueError(
                f"no room for a KV cache on {device_name}: one block needs {per_block} bytes"
            )
        self.num_blocks = int(num_blocks)
        self.scratch_block = self.num_blocks
        self._mem = cuda.mem_alloc((self.num_blocks + 1) * per_block)
        self.layer_bytes = (self.num_blocks + 1) * block_size * c.num_kv_heads * c.head_dim * 2

    def k_cache(self, layer: int) -> int:
        return int(self._mem) + 2 * layer * self.layer_bytes

    def v_cache(self, layer: int) -> int:
        return self.k_cache(layer) + self.layer_bytes


@dataclass
class Workspace:
    """Activation buffers for `tokens` token rows, and the step's packed int32 inputs (device
    buffer and its pinned host mirror) laid out by shapes.InputLayout."""

    tokens: int
    resid: Any  # fp32 residual stream [tokens, hidden]
    xnorm: Any  # bf16 normalized rows [tokens, hidden] (GEMM path)
    qkv: Any  # bf16 [tokens, q|k|v]
    attn: Any  # bf16 attention output [tokens, heads * head_dim]
    gate_up: Any  # bf16 [tokens, 2 * intermediate] (cuBLASLt SwiGLU)
    act: Any  # bf16 SwiGLU output [tokens, intermediate]
    inputs: Any  # packed int32 step inputs (device)
    inputs_host: np.ndarray  # pinned mirror
    counters: Any  # attention split counters [tokens, kv heads], kept zero by the kernels

    @classmethod
    def allocate(cls, cuda: Any, c: ModelConfig, tokens: int, max_batch: int,
                 max_width: int) -> Workspace:  # fmt: skip
        hid, qkv = c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        layout = InputLayout(tokens, tokens, max_batch, max_width, tokens)
        ws = cls(
            tokens=tokens,
            resid=cuda.mem_alloc(tokens * hid * 4),
            xnorm=cuda.mem_alloc(tokens * hid * 2),
            qkv=cuda.mem_alloc(tokens * qkv * 2),
            attn=cuda.mem_alloc(tokens * c.num_heads * c.head_dim * 2),
            gate_up=cuda.mem_alloc(tokens * 2 * c.intermediate_size * 2),
            act=cuda.mem_alloc(tokens * c.intermediate_size * 2),
            inputs=cuda.mem_alloc(layout.total * 4),
            inputs_host=cuda.pagelocked_empty(layout.total, np.int32),
            counters=cuda.mem_alloc(tokens * c.num_kv_heads * 4),
        )
        cuda.memset_d32(ws.counters, 0, tokens * c.num_kv_heads)
        return ws
