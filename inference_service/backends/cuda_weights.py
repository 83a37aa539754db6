"""Host-side packing of a model's weights for the CUDA backend: bf16 conversion and the layout
of the one device weight arena (fused q|k|v and gate|up per layer, norms and biases in fp32).
No device needed; the backend copies each tensor to arena + offset."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from inference_service.models.config import ModelConfig

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
    """Entries (in upload order) and total bytes of the weight arena."""
    items: list[tuple[str, int, Callable[[], np.ndarray]]] = []

    def bf16(name: str, parts: list[str], n_elems: int) -> None:
        def build() -> np.ndarray:
            if len(parts) == 1:
                return to_bf16_bits(w[parts[0]])
            return np.concatenate([to_bf16_bits(w[p]) for p in parts], axis=0)

        items.append((name, 2 * n_elems, build))

    def f32(name: str, parts: list[str], n_elems: int) -> None:
        items.append((name, 4 * n_elems, lambda: _f32(np.concatenate([_f32(w[p]) for p in parts]))))

    hid, inter = c.hidden_size, c.intermediate_size
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    qd = c.num_heads * c.head_dim
    bf16("embed", ["model.embed_tokens.weight"], c.vocab_size * hid)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        f32(f"L{i}.attn_norm", [p + "input_layernorm.weight"], hid)
        bf16(
            f"L{i}.wqkv", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], qkv * hid
        )
        if c.attention_bias:
            f32(f"L{i}.bqkv", [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], qkv)
        bf16(f"L{i}.wo", [a + "o_proj.weight"], hid * qd)
        f32(f"L{i}.mlp_norm", [p + "post_attention_layernorm.weight"], hid)
        bf16(f"L{i}.wgu", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], 2 * inter * hid)
        bf16(f"L{i}.wd", [p + "mlp.down_proj.weight"], hid * inter)
    f32("final_norm", ["model.norm.weight"], hid)
    if not c.tie_word_embeddings:
        bf16("lm_head", ["lm_head.weight"], c.vocab_size * hid)

    entries: list[ArenaEntry] = []
    off = 0
    for name, nbytes, build in items:
        entries.append(ArenaEntry(name, off, nbytes, build))
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
