"""The reference forward pass of a Llama / Qwen2 decoder, in numpy, over a paged KV cache.

This is the model's math in one place; the numpy backend runs it as is, and the CUDA backend's
kernels compute the same steps (fused differently, in bf16). Shapes: T = tokens of the step
(every sequence's new tokens, concatenated), H = hidden size. All arithmetic is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference_service.models.attention import PagedAttention, SeqSpan
from inference_service.models.config import ModelConfig
from inference_service.models.layout import FusedWeights, LayerWeights, qkv_sizes
from inference_service.models.rope import apply_rope, rope_cos_sin


@dataclass
class KVCache:
    """Per layer, the paged K and V pools [num_blocks, block_size, kv_heads, head_dim]."""

    k: list[np.ndarray]
    v: list[np.ndarray]

    @classmethod
    def allocate(
        cls, c: ModelConfig, num_blocks: int, block_size: int, dtype: type = np.float32
    ) -> KVCache:
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        # np.zeros maps untouched pages lazily, so a large pool costs only what is used.
        return cls(
            [np.zeros(shape, dtype) for _ in range(c.num_layers)],
            [np.zeros(shape, dtype) for _ in range(c.num_layers)],
        )

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]


@dataclass
class StepInputs:
    """What one forward pass runs: the new tokens of every sequence of a step."""

    token_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # [T]: position of each token in its sequence
    slots: np.ndarray  # int64 [T]: flat KV slot each token's K/V is written to
    seqs: list[SeqSpan]  # which rows belong to which sequence, and its block table


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(var + np.float32(eps)))


def qkv_projection(
    c: ModelConfig, layer: LayerWeights, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [T, heads, hd], k and v [T, kv_heads, hd] from one fused matmul (+ bias)."""
    qkv = h @ layer.wqkv.T
    if layer.bqkv is not None:
        qkv += layer.bqkv
    q_dim, kv_dim = qkv_sizes(c)
    t = h.shape[0]
    q = qkv[:, :q_dim].reshape(t, c.num_heads, c.head_dim)
    k = qkv[:, q_dim : q_dim + kv_dim].reshape(t, c.num_kv_heads, c.head_dim)
    v = qkv[:, q_dim + kv_dim :].reshape(t, c.num_kv_heads, c.head_dim)
    return q, k, v


def write_kv(
    k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray, k: np.ndarray, v: np.ndarray
) -> None:
    """Store the step's K/V rows at their flat slots (block * block_size + offset)."""
    _, _, kv_heads, head_dim = k_cache.shape
    k_cache.reshape(-1, kv_heads, head_dim)[slots] = k
    v_cache.reshape(-1, kv_heads, head_dim)[slots] = v


def mlp(c: ModelConfig, layer: LayerWeights, h: np.ndarray) -> np.ndarray:
    """down(silu(gate(h)) * up(h)), gate and up from one fused matmul."""
    gu = h @ layer.wgu.T
    gate = gu[:, : c.intermediate_size]
    up = gu[:, c.intermediate_size :]
    return ((gate / (1.0 + np.exp(-gate))) * up) @ layer.wd.T


def forward(
    c: ModelConfig,
    w: FusedWeights,
    kv: KVCache,
    inv_freq: np.ndarray,
    step: StepInputs,
    logit_rows: np.ndarray,
) -> np.ndarray:
    """Run the step through the model, writing its K/V into kv; return float32 logits
    [len(logit_rows), vocab] of the token rows listed in logit_rows."""
    cos, sin = rope_cos_sin(inv_freq, step.positions)
    attention = PagedAttention(c, step.seqs, kv.block_size)
    eps = c.rms_norm_eps

    x = w.embed[step.token_ids]  # [T, H]
    for layer, k_cache, v_cache in zip(w.layers, kv.k, kv.v, strict=True):
        h = rms_norm(x, layer.attn_norm, eps)
        q, k, v = qkv_projection(c, layer, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(k_cache, v_cache, step.slots, k, v)
        x = x + attention(q, k_cache, v_cache) @ layer.wo.T

        h = rms_norm(x, layer.mlp_norm, eps)
        x = x + mlp(c, layer, h)

    h = rms_norm(x[logit_rows], w.final_norm, eps)
    return np.ascontiguousarray(h @ w.lm_head.T, dtype=np.float32)
