"""The prefill GEMM kernels (cuda_kernels/gemm.cuh), every tile of shapes.GEMM_TILES, every
mode and serial split-K, against a float64 numpy product of the bf16 operands, on fresh random data with odd
M / N / K (K a multiple of 8, the kernels' contract). Tolerances (relative L2 error): fp32
outputs 2e-3 (fp32 summation order), bf16 outputs 6e-3 (plus one bf16 rounding), SwiGLU 8e-3
(gate and up are rounded to bf16 before the product, as the swiglu kernel sees them, so a
rounding flip near a tie moves one element by an ulp). Outputs are poisoned before each launch,
and a margin of extra rows / columns around C must stay poisoned (no write outside [M, N])."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_util import bf16_round, kernel_context, rel_err

from inference_service.backends.cuda.arena import bf16_bits_to_f32, to_bf16_bits
from inference_service.backends.cuda.shapes import (
    GEMM_LOCKS,
    GEMM_SPLITS,
    GEMM_SWIGLU,
    GEMM_TILES,
    GemmTile,
    gemm_plan,
)

pytestmark = pytest.mark.gpu

TOL_F32, TOL_BF16, TOL_SWIGLU = 2e-3, 6e-3, 8e-3
SIG = "PiPiiiiPiiPP"
PAD_R, PAD_C = 3, 6  # margin of C that must stay untouched (ldc = N + PAD_C)
SHAPES = [(1, 64, 64), (37, 100, 72), (130, 260, 200), (129, 391, 8), (257, 250, 1000),
          (512, 384, 1024)]  # fmt: skip


@pytest.fixture(scope="module")
def K():
    with kernel_context() as (cuda, kernels):
        locks = cuda.to_device(np.zeros(GEMM_LOCKS, np.int32))
        yield cuda, kernels, locks
        assert (cuda.from_device(locks, (GEMM_LOCKS,), np.int32) == 0).all(), "a lock left set"


def bf(a: np.ndarray) -> np.ndarray:
    return to_bf16_bits(np.asarray(a, np.float32))


def run_gemm(K, tile: GemmTile, A, W, M, N, Kd, C, ldc, mode, bias=0, splits=1) -> None:
    cuda, kernels, locks = K
    grid = tile.grid(M, N, mode == GEMM_SWIGLU, splits)
    kernels.kernel(tile.name, SIG).launch(grid, (tile.threads, 1, 1), A, Kd, W, Kd, M, N, Kd, C,
                                          ldc, mode, bias, locks if splits > 1 else 0,
                                          shared=tile.smem)  # fmt: skip
    cuda.Context.synchronize()


def check_margin(out: np.ndarray, M: int, N: int, poison: np.ndarray) -> None:
    """Rows >= M and columns >= N of the padded C still hold the poison."""
    same = (out.view(np.uint8) == poison.view(np.uint8)).reshape(out.shape + (-1,)).all(-1)
    assert same[M:].all() and same[:, N:].all(), "write outside [M, N]"


@pytest.mark.parametrize("tile", GEMM_TILES, ids=lambda t: t.name)
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_modes(K, tile, mnk):
    cuda = K[0]
    M, N, Kd = mnk
    rng = np.random.default_rng()
    A, W = bf(rng.standard_normal((M, Kd))), bf(rng.standard_normal((N, Kd)))
    bias = rng.standard_normal(N).astype(np.float32)
    ref = bf16_bits_to_f32(A).astype(np.float64) @ bf16_bits_to_f32(W).T.astype(np.float64)
    dA, dW = cuda.to_device(A), cuda.to_device(W)
    ldc, rows = N + PAD_C, M + PAD_R

    # mode 0: bf16 out, with and without bias; the odd ldc takes the scalar-store path.
    for ld in (ldc, ldc + 1):
        for b in (bias, None):
            poison = np.full((rows, ld), 0x7FC0, np.uint16)
            C = cuda.to_device(poison)
            run_gemm(K, tile, dA, dW, M, N, Kd, C, ld, 0, cuda.to_device(b) if b is not None else 0)
            out = cuda.from_device(C, poison.shape, np.uint16)
            check_margin(out, M, N, poison)
            want = ref + (b if b is not None else 0)
            assert rel_err(bf16_bits_to_f32(out[:M, :N]), want) < TOL_BF16, (ld, b is None)

    # mode 1: fp32 residual add; mode 2: fp32 store.
    base = np.full((rows, ldc), np.nan, np.float32)
    base[:M, :N] = rng.standard_normal((M, N))
    C = cuda.to_device(base)
    run_gemm(K, tile, dA, dW, M, N, Kd, C, ldc, 1)
    out = cuda.from_device(C, base.shape, np.float32)
    check_margin(out, M, N, base)
    assert rel_err(out[:M, :N], base[:M, :N] + ref) < TOL_F32
    poison = np.full((rows, ldc), np.nan, np.float32)
    C = cuda.to_device(poison)
    run_gemm(K, tile, dA, dW, M, N, Kd, C, ldc, 2)
    out = cuda.from_device(C, poison.shape, np.float32)
    check_margin(out, M, N, poison)
    assert rel_err(out[:M, :N], ref) < TOL_F32


@pytest.mark.parametrize("tile", GEMM_TILES, ids=lambda t: t.name)
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_fused_swiglu(K, tile, mnk):
    """mode 3: W = [gate rows; up rows] (2N x K), C[M, N] = bf16(silu(bf16(g)) * bf16(u))."""
    cuda = K[0]
    M, N, Kd = mnk
    rng = np.random.default_rng()
    A, W = bf(rng.standard_normal((M, Kd))), bf(rng.standard_normal((2 * N, Kd)))
    gu = bf16_bits_to_f32(A).astype(np.float64) @ bf16_bits_to_f32(W).T.astype(np.float64)
    g, u = bf16_round(gu[:, :N]).astype(np.float64), bf16_round(gu[:, N:]).astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    for ldc in (N + PAD_C, N + PAD_C + 1):
        poison = np.full((M + PAD_R, ldc), 0x7FC0, np.uint16)
        C = cuda.to_device(poison)
        run_gemm(K, tile, cuda.to_device(A), cuda.to_device(W), M, N, Kd, C, ldc, GEMM_SWIGLU)
        out = cuda.from_device(C, poison.shape, np.uint16)
        check_margin(out, M, N, poison)
        assert rel_err(bf16_bits_to_f32(out[:M, :N]), ref) < TOL_SWIGLU, ldc


@pytest.mark.parametrize("tile", GEMM_TILES, ids=lambda t: t.name)
@pytest.mark.parametrize("mnk", [(130, 260, 520), (37, 391, 1000), (200, 128, 72)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_gemm_split_k(K, tile, mnk):
    """Serial split-K in the fp32 modes: splits add to C in a fixed order, so every split count
    gives the unsplit result within fp32 rounding, and a repeat gives the same bits."""
    cuda = K[0]
    M, N, Kd = mnk
    rng = np.random.default_rng()
    A, W = bf(rng.standard_normal((M, Kd))), bf(rng.standard_normal((N, Kd)))
    ref = bf16_bits_to_f32(A).astype(np.float64) @ bf16_bits_to_f32(W).T.astype(np.float64)
    dA, dW = cuda.to_device(A), cuda.to_device(W)
    ldc = N + PAD_C
    base = np.full((M + PAD_R, ldc), np.nan, np.float32)
    base[:M, :N] = rng.standard_normal((M, N))
    kt = -(-Kd // 64)
    for splits in GEMM_SPLITS[1:]:
        if -(-kt // splits) * (splits - 1) >= kt:
            continue  # the plan never leaves a split empty; still run one such case below
        outs = []
        for _ in range(2):
            C = cuda.to_device(base)
            run_gemm(K, tile, dA, dW, M, N, Kd, C, ldc, 1, splits=splits)
            outs.append(cuda.from_device(C, base.shape, np.float32))
        check_margin(outs[0], M, N, base)
        assert rel_err(outs[0][:M, :N], base[:M, :N] + ref) < TOL_F32, splits
        assert (outs[0].view(np.uint32) == outs[1].view(np.uint32)).all(), "not deterministic"
        poison = np.full((M + PAD_R, ldc), np.nan, np.float32)
        C = cuda.to_device(poison)
        run_gemm(K, tile, dA, dW, M, N, Kd, C, ldc, 2, splits=splits)
        out = cuda.from_device(C, poison.shape, np.float32)
        check_margin(out, M, N, poison)
        assert rel_err(out[:M, :N], ref) < TOL_F32, splits
    # more splits than k-tiles: the empty splits still take (and pass on) their turn
    C = cuda.to_device(base)
    run_gemm(K, tile, dA, dW, M, N, Kd, C, ldc, 1, splits=kt + 1)
    out = cuda.from_device(C, base.shape, np.float32)
    assert rel_err(out[:M, :N], base[:M, :N] + ref) < TOL_F32


def test_gemm_tile_plan_matches_the_kernels(K):
    """Every planned tile exists with the planned threads and shared memory."""
    _, kernels, _ = K
    for tile in GEMM_TILES:
        f = kernels.kernel(tile.name, SIG)
        assert f.attribute("MAX_THREADS_PER_BLOCK") == tile.threads, tile.name
        assert tile.smem <= f.attribute("MAX_DYNAMIC_SHARED_SIZE_BYTES"), tile.name
    assert gemm_plan(512, 8192, 2048, 132, GEMM_SWIGLU)[0] in GEMM_TILES
