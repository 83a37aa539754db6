"""Rotary position embedding tables (HF rotate-half convention), computed as transformers does:
in float32, so our logits match its to the last few ulps."""

from __future__ import annotations

import math

import numpy as np

from inference_service.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, with llama3 scaling or GGUF freq factors."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_freq_factors is not None:
        return (inv / np.asarray(config.rope_freq_factors, dtype=np.float32)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    # transformers' _compute_llama3_parameters
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [n, head_dim // 2] for the given positions."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs), np.sin(freqs)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [n, heads, head_dim] in place-free rotate-half form: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
