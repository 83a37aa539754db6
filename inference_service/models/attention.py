"""Paged causal attention in numpy (the reference for the CUDA kernels).

The KV cache of one layer is a pool of blocks [num_blocks, block_size, kv_heads, head_dim]; a
sequence's positions live in the blocks its block table names, position p at
block_table[p // block_size], slot p % block_size. Query head h reads KV head
h // (num_heads // num_kv_heads) (grouped-query attention).

A step's plan is made once (`PagedAttention(...)`) and applied to every layer: single-token
(decode) sequences share one padded attention call; prefill chunks attend one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference_service.models.config import ModelConfig


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: token rows [row, row + n) at positions
    [start_pos, start_pos + n); attention reads positions [0, start_pos + n)."""

    row: int
    n: int
    start_pos: int
    block_table: list[int]


def causal_bias(start: int, n: int) -> np.ndarray:
    """Additive mask [n, start + n]: query i (at position start + i) sees positions <= its own."""
    future = np.arange(start + n)[None, :] > (start + np.arange(n))[:, None]
    return np.where(future, np.float32(-np.inf), np.float32(0.0))


class PagedAttention:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v for every sequence of one step."""

    def __init__(self, c: ModelConfig, spans: list[SeqSpan], block_size: int) -> None:
        self.c = c
        self.spans = spans
        self.block_size = block_size
        self.scale = np.float32(1.0 / np.sqrt(c.head_dim))
        singles = [s for s, span in enumerate(spans) if span.n == 1]
        self.decode = self._decode_plan(singles) if len(singles) > 1 else None
        grouped = set(singles) if self.decode is not None else set()
        self.chunked = [s for s in range(len(spans)) if s not in grouped]
        self.masks = {s: causal_bias(spans[s].start_pos, spans[s].n) for s in self.chunked}

    def __call__(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray) -> np.ndarray:
        """q [T, heads, head_dim] of every token of the step → output [T, heads * head_dim]."""
        out = np.empty((q.shape[0], self.c.num_heads * self.c.head_dim), dtype=np.float32)
        for s in self.chunked:
            span = self.spans[s]
            rows = slice(span.row, span.row + span.n)
            out[rows] = self._attend(q[rows], k_cache, v_cache, span, self.masks[s])
        if self.decode is not None:
            rows, tables, bias = self.decode
            out[rows] = self._attend_decode(q[rows], k_cache, v_cache, tables, bias)
        return out

    def _decode_plan(self, singles: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token rows, block tables padded to one width [D, nb], additive mask [D, 1, 1, L])
        for the single-token sequences of a step."""
        bs = self.block_size
        spans = [self.spans[s] for s in singles]
        lengths = np.array([span.start_pos + 1 for span in spans])
        nb = int(-(-lengths.max() // bs))
        tables = np.zeros((len(spans), nb), dtype=np.int64)  # pad with block 0: masked out
        for r, span in enumerate(spans):
            used = -(-int(lengths[r]) // bs)
            tables[r, :used] = span.block_table[:used]
        bias = np.where(np.arange(nb * bs)[None, :] < lengths[:, None], 0.0, -np.inf)
        rows = np.array([span.row for span in spans])
        return rows, tables, bias.astype(np.float32)[:, None, None, :]

    def _attend_decode(
        self, q: np.ndarray, kc: np.ndarray, vc: np.ndarray, tables: np.ndarray, bias: np.ndarray
    ) -> np.ndarray:
        """Attention of D single queries [D, heads, hd] over their padded block tables."""
        c = self.c
        d = q.shape[0]
        group = c.num_heads // c.num_kv_heads
        keys = kc[tables].reshape(d, -1, c.num_kv_heads, c.head_dim)  # [D, L, kv, hd]
        vals = vc[tables].reshape(d, -1, c.num_kv_heads, c.head_dim)
        qg = q.reshape(d, c.num_kv_heads, group, c.head_dim)
        scores = (qg @ keys.transpose(0, 2, 3, 1)) * self.scale + bias  # [D, kv, group, L]
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs @ vals.transpose(0, 2, 1, 3)  # [D, kv, group, hd]
        return out.reshape(d, c.num_heads * c.head_dim)

    def _attend(
        self, q: np.ndarray, kc: np.ndarray, vc: np.ndarray, span: SeqSpan, bias: np.ndarray
    ) -> np.ndarray:
        """Causal attention of one sequence's n queries [n, heads, hd] over positions
        [0, start + n) read from its KV blocks; returns [n, heads * hd]."""
        c = self.c
        n = q.shape[0]
        length = span.start_pos + n
        nb = -(-length // self.block_size)
        blocks = np.asarray(span.block_table[:nb], dtype=np.int64)
        keys = kc[blocks].reshape(-1, c.num_kv_heads, c.head_dim)[:length]  # [L, kv, hd]
        vals = vc[blocks].reshape(-1, c.num_kv_heads, c.head_dim)[:length]
        group = c.num_heads // c.num_kv_heads
        # [n, kv*group, hd] → [kv, group*n, hd]: query head h reads kv head h // group.
        qg = q.reshape(n, c.num_kv_heads, group, c.head_dim).transpose(1, 2, 0, 3)
        qg = qg.reshape(c.num_kv_heads, group * n, c.head_dim)
        scores = (qg * self.scale) @ keys.transpose(1, 2, 0)  # [kv, group*n, L]
        if n > 1:
            scores = scores.reshape(c.num_kv_heads, group, n, length)
            scores += bias
            scores = scores.reshape(c.num_kv_heads, group * n, length)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores, out=scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs @ vals.transpose(1, 0, 2)  # [kv, group*n, hd]
        out = out.reshape(c.num_kv_heads, group, n, c.head_dim).transpose(2, 0, 1, 3)
        return out.reshape(n, c.num_heads * c.head_dim)
