"""The optional cuBLASLt GEMM path (inference_service/backends/cuda/blaslt.py, nvmath-python's
raw bindings): every mode of gemm.cuh's contract against a float64 numpy product of the bf16
operands, on fresh random data with odd M / N / K (K a multiple of 8), leading dimensions
larger than K / N, poisoned outputs and a margin of C that must stay untouched; repeat runs
bitwise equal (determinism); no heuristic query after a shape's first call; and whole tiny
models: prefill logits with gemm="cublaslt" against gemm="ours" and the numpy backend.

Tolerances (relative L2 error), as for our kernel in test_gemm.py: fp32 outputs 2e-3, bf16
outputs 6e-3 (one bf16 rounding of the result). Whole model: max |a - b| / max |b| < 3e-2,
the bf16 tolerance of test_cuda_backend.py. GPU tests skip with the reason when nvmath-python
is not installed; the choice parsing tests run anywhere."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from kernel_util import bf16_round, rel_err

from inference_service.backends.cuda.arena import bf16_bits_to_f32, to_bf16_bits
from inference_service.backends.cuda.blaslt import (
    AUTO_MIN_M,
    BlasLtUnavailable,
    auto_prefers,
    gemm_choice,
    open_blaslt,
    use_blaslt,
)

TOL_F32, TOL_BF16, TOL_MODEL = 2e-3, 6e-3, 3e-2
PAD_R, PAD_C = 3, 6  # margin of C that must stay poisoned (ldc = N + PAD_C, 3 extra rows)
SHAPES = [(9, 64, 64), (37, 100, 72), (130, 261, 200), (129, 391, 8), (257, 250, 1000),
          (512, 3072, 2048)]  # fmt: skip
HAVE_NVMATH = importlib.util.find_spec("nvmath") is not None
needs_nvmath = pytest.mark.skipif(
    not HAVE_NVMATH, reason="nvmath-python not installed (pip install 'nvmath-python>=1.0')"
)


# ------------------------------------------------------------------ anywhere


def test_gemm_choice_from_argument_and_env(monkeypatch):
    monkeypatch.delenv("KUIPER_GEMM", raising=False)
    assert gemm_choice(None) == "auto"
    assert gemm_choice("ours") == "ours"
    monkeypatch.setenv("KUIPER_GEMM", "cuBLASLt")
    assert gemm_choice(None) == "cublaslt"
    assert gemm_choice("auto") == "auto"  # the argument wins over the environment
    monkeypatch.setenv("KUIPER_GEMM", "cutlass")
    with pytest.raises(ValueError, match="KUIPER_GEMM"):
        gemm_choice(None)
    assert use_blaslt("cublaslt", 9, 64, 64, 0)
    assert not use_blaslt("ours", 4096, 4096, 4096, 0)
    assert use_blaslt("auto", AUTO_MIN_M, 4096, 4096, 1)
    assert not use_blaslt("auto", AUTO_MIN_M - 1, 4096, 4096, 1)
    # fused SwiGLU (mode 3): ours below ~1.5 GFLOP or 128 rows (n = output columns)
    assert not auto_prefers(64, 8192, 2048, 3) and auto_prefers(128, 8192, 2048, 3)
    assert not auto_prefers(128, 1536, 576, 3) and auto_prefers(512, 1536, 576, 3)


def test_without_nvmath_auto_falls_back_and_cublaslt_names_the_package(monkeypatch):
    for name in [m for m in sys.modules if m == "nvmath" or m.startswith("nvmath.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvmath", None)  # import nvmath -> ImportError
    assert open_blaslt("auto", 0) is None
    assert open_blaslt("ours", 0) is None
    with pytest.raises(BlasLtUnavailable, match="nvmath-python"):
        open_blaslt("cublaslt", 0)


# ------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def L():
    import pycuda.driver as cuda

    from inference_service.backends.cuda.blaslt import CublasLt

    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    stream = cuda.Stream()
    lt = CublasLt(stream.handle)
    yield cuda, stream, lt
    stream.synchronize()
    lt.close()
    ctx.pop()


def bf(a: np.ndarray) -> np.ndarray:
    return to_bf16_bits(np.asarray(a, np.float32))


def operands(rng, M, N, K, lda, ldw):
    a = np.zeros((M, lda), np.float32)
    w = np.zeros((N, ldw), np.float32)
    a[:, :K] = rng.standard_normal((M, K))
    w[:, :K] = rng.standard_normal((N, K)) / np.sqrt(K)
    a[:, K:] = np.nan  # padding past K must never be read
    w[:, K:] = np.nan
    ref = bf16_round(a[:, :K]).astype(np.float64) @ bf16_round(w[:, :K]).astype(np.float64).T
    return bf(a), bf(w), ref


def run(L, A, lda, W, ldw, M, N, K, c_host, ldc, mode, bias=None):
    """c_host [M + PAD_R, ldc] (bf16 bits or fp32) in, the whole buffer after the GEMM out."""
    cuda, stream, lt = L
    dA, dW, dC = cuda.to_device(A), cuda.to_device(W), cuda.to_device(c_host)
    dB = cuda.to_device(bias.astype(np.float32)) if bias is not None else None
    ok = lt.gemm(int(dA), lda, int(dW), ldw, M, N, K, int(dC), ldc, mode,
                 int(dB) if dB is not None else 0)  # fmt: skip
    stream.synchronize()
    return ok, cuda.from_device(dC, c_host.shape, c_host.dtype)


@needs_nvmath
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["bf16", "bf16+bias", "f32+=", "f32="])
def test_modes_against_float64(L, shape, mode):
    M, N, K = shape
    lda, ldw, ldc = K + 24, K + 8, N + PAD_C
    rng = np.random.default_rng(hash((shape, mode)) & 0xFFFF)
    A, W, ref = operands(rng, M, N, K, lda, ldw)
    if mode.startswith("bf16"):
        bias = rng.standard_normal(N).astype(np.float32) if mode == "bf16+bias" else None
        c = np.full((M + PAD_R, ldc), 0x7FC1, np.uint16)  # bf16 NaN poison
        ok, out = run(L, A, lda, W, ldw, M, N, K, c, ldc, 0, bias)
        if not ok:
            assert bias is not None, "cuBLASLt refused a plain bf16 GEMM"
            pytest.skip("this cuBLASLt refuses an fp32 bias with bf16 output: the backend "
                        "runs mode 0 with a bias on our kernel")  # fmt: skip
        got = bf16_bits_to_f32(out[:M, :N])
        want = ref + (bias if bias is not None else 0)
        tol = TOL_BF16
        assert (out[M:] == 0x7FC1).all() and (out[:M, N:] == 0x7FC1).all(), "write outside C"
    else:
        c0 = rng.standard_normal((M + PAD_R, ldc)).astype(np.float32)
        c0[M:] = np.nan
        c0[:, N:] = np.nan
        if mode == "f32=":
            c0[:M, :N] = np.nan  # overwritten: never read
        ok, out = run(L, A, lda, W, ldw, M, N, K, c0.copy(), ldc, 1 if mode == "f32+=" else 2)
        assert ok, "cuBLASLt refused an fp32 GEMM"
        got = out[:M, :N]
        want = ref + (c0[:M, :N] if mode == "f32+=" else 0)
        tol = TOL_F32
        assert np.isnan(out[M:]).all() and np.isnan(out[:M, N:]).all(), "write outside C"
    assert rel_err(got, want) < tol


@needs_nvmath
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 2048, 8192), (512, 16384, 2048), (33, 576, 1536)])
def test_repeat_runs_are_bitwise_equal_and_plans_cached(L, shape):
    """Small M with large K is where a library picks split-K: the reduction must still be
    deterministic. The second call of a shape must not query the heuristic again."""
    M, N, K = shape
    rng = np.random.default_rng(7)
    A, W, _ = operands(rng, M, N, K, K, K)
    c0 = rng.standard_normal((M + PAD_R, N)).astype(np.float32)
    _, _, lt = L
    outs = []
    for rep in range(3):
        for mode in (1, 2):
            ok, out = run(L, A, K, W, K, M, N, K, c0.copy(), N, mode)
            assert ok
            outs.append(out)
        if rep == 0:
            queries = lt.heuristic_queries
    assert lt.heuristic_queries == queries, "a cached shape queried the heuristic again"
    for i in range(2, len(outs)):
        np.testing.assert_array_equal(outs[i], outs[i % 2])


# ------------------------------------------------------------------ whole model


@pytest.fixture(scope="module", params=["llama2", "llama3", "qwen2"])
def tiny(request, tmp_path_factory):
    from models_util import BUILDERS

    from inference_service.models import load_model

    folder, _ = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    return request.param, load_model(folder)


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@needs_nvmath
@pytest.mark.gpu
def test_prefill_logits_cublaslt_vs_ours_vs_numpy(tiny):
    """Prefill of 70 tokens (the GEMM path) then a 12-row decode batch: eager (cuBLASLt under
    gemm="cublaslt") and through a captured graph (our GEMM: no cuBLASLt in captures)."""
    from models_util import VOCAB

    from inference_service.backends.base import BatchItem
    from inference_service.backends.cuda.backend import CudaBackend
    from inference_service.backends.numpy_backend import NumpyBackend

    name, model = tiny
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, 70).tolist()
    table = list(range(20))
    item = BatchItem(0, np.array(ids), 0, table)
    ref = NumpyBackend(model, 64, 4).logits([item])
    lt_b = CudaBackend(model, num_blocks=80, block_size=4, gemm="cublaslt")
    ours_b = CudaBackend(model, num_blocks=64, block_size=4, gemm="ours")
    assert lt_b.blaslt is not None and ours_b.blaslt is None
    got_lt, got_ours = lt_b.logits([item]), ours_b.logits([item])
    assert lt_b.blaslt.heuristic_queries > 0, "cuBLASLt never ran"
    refused = lt_b.blaslt.refused
    assert all(key[7] for key in refused), f"cuBLASLt refused a GEMM without bias: {refused}"
    e_lt, e_ours = max_rel(got_lt, ref), max_rel(got_ours, ref)
    print(f"{name}: cublaslt vs numpy {e_lt:.2e}, ours vs numpy {e_ours:.2e}, "
          f"cublaslt vs ours {max_rel(got_lt, got_ours):.2e}, refused {refused}")  # fmt: skip
    assert e_lt < TOL_MODEL and e_ours < TOL_MODEL
    assert max_rel(got_lt, got_ours) < TOL_MODEL

    # 12 one-token sequences: eager decode (M = 12, cuBLASLt) vs the 16-row graph (ours).
    seqs = [rng.integers(3, VOCAB, 5 + s).tolist() for s in range(12)]
    tables = [[20 + 4 * s + j for j in range(4)] for s in range(12)]  # up to 16 positions
    for s, p in enumerate(seqs):
        lt_b.logits([BatchItem(s, np.array(p[:-1]), 0, tables[s])])
    batch = [BatchItem(s, np.array(p[-1:]), len(p) - 1, tables[s]) for s, p in enumerate(seqs)]
    graph = lt_b.decode_logits_graph(batch)
    eager = lt_b.logits(batch)
    assert max_rel(graph, eager) < TOL_MODEL
