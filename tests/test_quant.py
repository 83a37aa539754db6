"""int8 format round trips, GGUF block repacking, and the CPU kernels against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from inference_service.backends import cpu_kernels
from inference_service.models.quantized import (
    Int8Weight,
    Q4Weight,
    concat_rows,
    from_gguf_blocks,
    int8_weight,
)
from inference_service.quant.int8 import choose_group, quantize_int8


def rand(shape, seed=0, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("group", [64, 128])
def test_int8_round_trip_error_is_at_most_half_a_step(group):
    w = rand((96, 512), seed=group)
    w[3, :group] = 0.0  # an all-zero group: scale 0, exact zeros back
    w[5, 7] = 40.0  # an outlier only widens its own group's step
    q, scales = quantize_int8(w, group)
    assert q.dtype == np.int8 and scales.dtype == np.float16
    assert scales.shape == (96, 512 // group)
    assert np.abs(q).max() <= 127
    back = int8_weight(q, scales).dequantize()
    step = np.repeat(scales.astype(np.float32), group, axis=1)
    err = np.abs(back.astype(np.float64) - w)
    # |w - q s| <= s / 2 from rounding; fp16 rounding of s can clip the max to 127 s, which
    # is within s * 2^-11 * 127 < s / 16 of it.
    assert np.all(err <= step / 2 + 1e-7)
    assert np.all(back[3, :group] == 0.0)
    # Relative error of the whole matrix: ~1/(2*127*sqrt(3)) of the group max, well under 1%.
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < 0.01
    # Groups without the outlier keep their fine step.
    assert scales[5, 0] > 40 / 127 * 0.99 and scales[4, 0] < 5 / 127


def test_int8_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_int8(rand((4, 100)), 64)
    with pytest.raises(ValueError, match="do not fit"):
        int8_weight(np.zeros((4, 128), np.int8), np.zeros((4, 3), np.float16))
    assert choose_group(576, 128) == 64 and choose_group(96, 64) == 32


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_repack_to_what_gguf_dequantizes(qtype):
    """Oracle: the gguf library's own quantize + dequantize of the same blocks."""
    t = GGMLQuantizationType[qtype]
    w = rand((24, 256), seed=1)
    raw = quants.quantize(w, t)
    ref = quants.dequantize(raw, t)
    kept = from_gguf_blocks(raw, qtype, w.shape)
    assert isinstance(kept, Int8Weight if qtype == "Q8_0" else Q4Weight)
    np.testing.assert_allclose(kept.dequantize(), ref, rtol=1e-6, atol=1e-7)
    # 4-bit: 20 (Q4_0: 18) bytes per 32 weights on disk; kept as 16 bytes + two fp32.
    assert kept.nbytes <= w.nbytes * (0.32 if qtype == "Q8_0" else 0.19)
    rows = np.array([5, 0, 23, 7])
    np.testing.assert_array_equal(kept.take_rows(rows).dequantize(), ref[rows])


def _weights(kind: str, n: int, k: int, seed: int):
    w = rand((n, k), seed=seed, scale=0.05)
    if kind == "int8":
        return int8_weight(*quantize_int8(w, 64))
    if kind == "q8_0":
        return from_gguf_blocks(quants.quantize(w, GGMLQuantizationType.Q8_0), "Q8_0", w.shape)
    return from_gguf_blocks(quants.quantize(w, GGMLQuantizationType.Q4_1), "Q4_1", w.shape)


@pytest.mark.parametrize("kind", ["int8", "q8_0", "q4_1"])
@pytest.mark.parametrize("tokens", [1, 3, cpu_kernels.PREFILL_TOKENS + 5])
def test_cpu_kernels_match_float64(kind, tokens):
    n, k = 200, 384  # rows not a multiple of any vector width
    w = _weights(kind, n, k, seed=tokens)
    x = rand((tokens, k), seed=99)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    got = cpu_kernels.linear(x, w)
    assert got.dtype == np.float32 and got.shape == (tokens, n)
    # fp32 accumulation over 384 terms in a different order than float64's.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # Both paths agree whatever the token count.
    np.testing.assert_allclose(cpu_kernels.matvec(x, w), cpu_kernels.matmul_tiled(x, w),
                               rtol=1e-4, atol=1e-5 * np.abs(ref).max())  # fmt: skip


def test_tiled_matmul_crosses_tile_boundaries(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "TILE_ELEMS", 384 * 7)  # 7-row tiles over 50 rows
    w = _weights("q4_1", 50, 384, seed=5)
    x = rand((20, 384), seed=6)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    np.testing.assert_allclose(cpu_kernels.matmul_tiled(x, w), ref, rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())  # fmt: skip


def test_concat_rows_keeps_quantized_parts_quantized():
    a, b = _weights("int8", 8, 128, 1), _weights("int8", 4, 128, 2)
    fused = concat_rows([a, b])
    assert isinstance(fused, Int8Weight) and fused.shape == (12, 128)
    np.testing.assert_array_equal(fused.dequantize(), np.vstack([a.dequantize(), b.dequantize()]))
    q4 = _weights("q4_1", 4, 128, 3)
    mixed = concat_rows([a, q4])  # mixed kinds: float32
    assert isinstance(mixed, np.ndarray)
    np.testing.assert_array_equal(mixed, np.vstack([a.dequantize(), q4.dequantize()]))


def test_embedding_rows_dequantize_only_the_rows_asked_for():
    w = _weights("q8_0", 64, 96, 4)
    ids = np.array([3, 3, 60, 0])
    np.testing.assert_array_equal(cpu_kernels.embedding_rows(w, ids), w.dequantize()[ids])
