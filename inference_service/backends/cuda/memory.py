"""Device memory of the CUDA backend, allocated once through PyCUDA: the weight arena (laid out
by arena.plan_arena), the paged KV pool and the activation workspace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference_service.backends.cuda.arena import plan_arena
from inference_service.backends.cuda.shapes import InputLayout, blocks_for_memory, kv_block_bytes
from inference_service.models.config import ModelConfig


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
