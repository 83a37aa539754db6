"""Optional cuBLASLt path for the prefill GEMMs, through nvmath-python's raw cuBLASLt bindings
(`nvmath.bindings.cublasLt`: plain C calls on integer handles and device pointers, no array
library). Our tensor-core GEMM (cuda_kernels/gemm.cuh) stays the path with no extra dependency;
CudaBackend(gemm=...) / $KUIPER_GEMM choose (see `auto_prefers` for the automatic rule).

Same contract as gemm.cuh's modes: C[M, N] (op)= A[M, K] . W[N, K]^T, A bf16 row-major (lda),
W the bf16 HF [out, in] weight row-major (ldw), fp32 accumulation;
  mode 0: C bf16 = acc + bias[n] (fp32 bias, may be null); 1: C fp32 += acc; 2: C fp32 = acc.

Row-major on column-major cuBLASLt: a row-major [R, C] matrix with leading dimension ld is the
column-major [C, R] matrix with the same ld. So C^T [N, M] = W [N, K] . A^T [K, M], where
cuBLASLt's "A" is our W stored as a column-major [K, N] matrix (ld = ldw) taken transposed, and
its "B" is our A stored as a column-major [K, M] matrix (ld = lda) taken as is (the "TN" case,
the best supported one); D (and C, the same buffer, for the in-place mode 1) is [N, M] with
ld = ldc. The BIAS epilogue adds a vector over D's rows, i.e. over our n.

Determinism: every call of one shape uses the algorithm cached at its first call (the
heuristic's first choice, no autotuning, so the choice does not depend on timings). cuBLAS
documents bit-wise identical results run to run for a given toolkit, architecture and SM
count when a single stream is used; cuBLASLt's split-K reductions are sequential (INPLACE:
counters in the workspace order the partial sums; the other schemes reduce from the
workspace in a second pass). The only atomics-based mode (ATOMIC_SYNC producer/consumer
counters) is opt-in and never set here. tests/gpu/test_blaslt.py checks repeat runs bitwise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

WORKSPACE_BYTES = 32 << 20
HEURISTIC_RESULTS = 8  # candidates asked for; the first usable one is taken
NVMATH_HINT = "pip install 'nvmath-python>=1.0' (or the project's cuda extra)"

# The automatic rule (gemm="auto"), from bench/prefill_blaslt.py on an H100 (cuBLASLt 13.1,
# weights streamed from HBM, kernels back to back; device us ours / cuBLASLt):
# * q|k|v, o_proj, down (modes 0-2): cuBLASLt is faster at every measured M (16 to 2048) on
#   all three model shapes, 1.3-2.5x (e.g. Llama-3.2-1B M=512: qkv 25.6 / 12.0, o_proj
#   20.5 / 11.9, down 73.8 / 33.0; M=64: 13.6 / 8.6, 13.7 / 7.6, 28.5 / 18.6). An enqueue costs
#   the host ~9 us against ~5.5 us for our launch, which small steps of small models feel, so
#   the rule starts at AUTO_MIN_M = 64 rows, the smallest step measured whole.
# * gate|up with SwiGLU (mode 3): ours is fused; cuBLASLt runs the plain GEMM then the swiglu
#   kernel. Ours wins up to M = 64 everywhere (1B M=64: 29.9 / 31.8) and on SmolLM2 up to
#   M = 256 (7.5 / 8.7 at 128); cuBLASLt wins from about 1.5 GFLOP (1B M=128: 37.6 / 34.9,
#   M=512: 95.1 / 58.0; Qwen2.5-0.5B M=128: 1.04x; SmolLM2 M=512: 1.06x).
# * A GEMM with a bias (Qwen2's q|k|v) stays on our kernel: cuBLASLt's BIAS epilogue takes a
#   bias of the output's type (bf16) only, and rounding our fp32 bias would change results.
# Whole prefill steps (CudaBackend.step() wall, same run), ours -> auto, 64 / 128 / 512 tokens:
# SmolLM2-135M 3.22 / 3.20 / 3.22 -> 2.49 / 2.54 / 2.50 ms, Llama-3.2-1B 2.19 / 2.43 / 4.80 ->
# 1.87 / 2.01 / 2.90 ms (gemm="cublaslt": 2.52 / 2.52 / 2.51 and 1.89 / 2.01 / 2.94 ms).
# Captured decode graphs (9..64 rows) always keep our kernels (see kernels.StepKernels.matmul).
AUTO_MIN_M = 64
AUTO_SWIGLU_MIN_M, AUTO_SWIGLU_MIN_FLOP = 128, 1.5e9
SWIGLU_MODE = 3  # gemm.cuh's fused SwiGLU mode (shapes.GEMM_SWIGLU)


def auto_prefers(m: int, n: int, k: int, mode: int) -> bool:
    """Whether gemm="auto" sends this GEMM to cuBLASLt (rule and numbers above). n = output
    columns (for SwiGLU the weight has 2n rows)."""
    if mode == SWIGLU_MODE:
        return m >= AUTO_SWIGLU_MIN_M and 2 * m * (2 * n) * k >= AUTO_SWIGLU_MIN_FLOP
    return m >= AUTO_MIN_M


GEMM_CHOICES = ("auto", "cublaslt", "ours")


class BlasLtUnavailable(RuntimeError):
    """nvmath-python (or the cuBLASLt library it loads) is missing or unusable."""


def gemm_choice(arg: str | None) -> str:
    """The prefill GEMM choice: the argument, else $KUIPER_GEMM, else "auto"."""
    choice = (arg or os.environ.get("KUIPER_GEMM") or "auto").strip().lower()
    if choice not in GEMM_CHOICES:
        src = "gemm" if arg else "$KUIPER_GEMM"
        raise ValueError(f"{src} must be one of {', '.join(GEMM_CHOICES)}, not {choice!r}")
    return choice


def open_blaslt(choice: str, stream_handle: int) -> CublasLt | None:
    """A CublasLt for the choice: None for "ours", and for "auto" when nvmath-python or the
    library is missing (silently: our kernel runs); "cublaslt" raises BlasLtUnavailable then."""
    if choice == "ours":
        return None
    try:
        return CublasLt(stream_handle)
    except BlasLtUnavailable:
        if choice == "cublaslt":
            raise
        return None


def use_blaslt(choice: str, m: int, n: int, k: int, mode: int) -> bool:
    """Whether this GEMM goes to cuBLASLt under the choice (given a CublasLt exists)."""
    return choice == "cublaslt" or (choice == "auto" and auto_prefers(m, n, k, mode))


def load_bindings() -> Any:
    """The nvmath.bindings.cublasLt module, or BlasLtUnavailable naming what to install."""
    try:
        from nvmath.bindings import cublasLt
    except Exception as e:  # noqa: BLE001 - ImportError, or a library load failure
        raise BlasLtUnavailable(f"cuBLASLt GEMMs need nvmath-python: {NVMATH_HINT} ({e})") from e
    return cublasLt


def _alignment(ptr: int) -> int:
    """Largest power of two (<= 256) dividing the address: cuBLASLt filters algorithms by it."""
    return min(256, ptr & -ptr) if ptr else 256


@dataclass
class _Plan:
    desc: int
    layouts: tuple[int, int, int]  # W (cuBLASLt A), A (cuBLASLt B), C = D
    algo: np.ndarray  # one cublasLtMatmulAlgo_t, kept alive for its address
    algo_ptr: int
    scalars: np.ndarray  # float32 [alpha, beta] (host pointer mode)
    alpha_ptr: int
    beta_ptr: int
    bias: bool  # BIAS epilogue: the bias pointer is set on the descriptor per call
    workspace: int  # bytes the algorithm needs (<= WORKSPACE_BYTES)


class CublasLt:
    """One cuBLASLt handle and workspace for one backend, enqueuing on one stream.

    gemm() returns False (enqueuing nothing) when cuBLASLt has no algorithm for a case, e.g. an
    fp32 bias with bf16 output if this cuBLASLt version refuses it: the caller runs our kernel.
    Plans (descriptor, layouts, algorithm) are cached per (M, N, K, lda, ldw, ldc, mode, bias?,
    pointer alignments): after its first call a shape makes no heuristic query."""

    def __init__(self, stream_handle: int, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        self.handle = 0
        self._plans: dict[tuple, _Plan | None] = {}
        self._lt = lt = load_bindings()
        import pycuda.driver as cuda
        from nvmath import CudaDataType
        from nvmath.bindings import cublas

        self._bf16, self._f32 = int(CudaDataType.CUDA_R_16BF), int(CudaDataType.CUDA_R_32F)
        self._compute = int(cublas.ComputeType.COMPUTE_32F)
        self._op_t, self._op_n = int(cublas.Operation.T), int(cublas.Operation.N)
        try:
            self.handle = lt.create()
        except Exception as e:  # noqa: BLE001 - e.g. the library did not load
            raise BlasLtUnavailable(f"cublasLtCreate failed: {e}") from e
        self.version = int(lt.get_version())
        self.stream = int(stream_handle)
        self._workspace = cuda.mem_alloc(workspace_bytes)
        self.workspace_ptr, self.workspace_bytes = int(self._workspace), workspace_bytes
        self.refused: list[tuple] = []  # plan keys cuBLASLt had no algorithm for
        self.heuristic_queries = 0

    # ------------------------------------------------------------------ attributes

    def _set_desc(self, desc: int, attr: Any, value: int) -> None:
        lt = self._lt
        buf = np.array(value, dtype=lt.get_matmul_desc_attribute_dtype(attr))
        lt.matmul_desc_set_attribute(desc, int(attr), buf.ctypes.data, buf.nbytes)

    def _set_pref(self, pref: int, attr: Any, value: int) -> None:
        lt = self._lt
        buf = np.array(value, dtype=lt.get_matmul_preference_attribute_dtype(attr))
        lt.matmul_preference_set_attribute(pref, int(attr), buf.ctypes.data, buf.nbytes)

    # ------------------------------------------------------------------ planning

    def plan(self, m: int, n: int, k: int, lda: int, ldw: int, ldc: int, mode: int,
             bias: bool, aligns: tuple[int, int, int] = (256, 256, 256)) -> _Plan | None:  # fmt: skip
        """The cached plan for this case (built at its first use), None if cuBLASLt refuses."""
        key = (m, n, k, lda, ldw, ldc, mode, bias, aligns)
        if key in self._plans:
            return self._plans[key]
        plan = self._build(m, n, k, lda, ldw, ldc, mode, bias, aligns)
        self._plans[key] = plan
        if plan is None:
            self.refused.append(key)
        return plan

    def _build(self, m, n, k, lda, ldw, ldc, mode, bias, aligns) -> _Plan | None:
        if mode not in (0, 1, 2):
            raise ValueError(f"cuBLASLt path: no GEMM mode {mode} (0, 1, 2)")
        if bias and mode != 0:
            raise ValueError("a bias only in mode 0")
        if k > lda or k > ldw or n > ldc:
            raise ValueError(f"leading dimensions too small: K {k} lda {lda} ldw {ldw}, "
                             f"N {n} ldc {ldc}")  # fmt: skip
        lt = self._lt
        D = lt.MatmulDescAttribute
        out_type = self._bf16 if mode == 0 else self._f32
        desc = lt.matmul_desc_create(self._compute, self._f32)
        layouts: list[int] = []
        pref = 0
        try:
            self._set_desc(desc, D.TRANSA, self._op_t)
            self._set_desc(desc, D.TRANSB, self._op_n)
            if bias:
                self._set_desc(desc, D.EPILOGUE, int(lt.Epilogue.BIAS))
                self._set_desc(desc, D.BIAS_DATA_TYPE, self._f32)
            layouts.append(lt.matrix_layout_create(self._bf16, k, n, ldw))  # W as [K, N], op T
            layouts.append(lt.matrix_layout_create(self._bf16, k, m, lda))  # A as [K, M], op N
            layouts.append(lt.matrix_layout_create(out_type, n, m, ldc))  # C = D as [N, M]
            pref = lt.matmul_preference_create()
            P = lt.MatmulPreferenceAttribute
            self._set_pref(pref, P.MAX_WORKSPACE_BYTES, self.workspace_bytes)
            a_al, w_al, c_al = aligns
            self._set_pref(pref, P.MIN_ALIGNMENT_A_BYTES, w_al)
            self._set_pref(pref, P.MIN_ALIGNMENT_B_BYTES, a_al)
            self._set_pref(pref, P.MIN_ALIGNMENT_C_BYTES, c_al)
            self._set_pref(pref, P.MIN_ALIGNMENT_D_BYTES, c_al)
            results = np.zeros(HEURISTIC_RESULTS, dtype=lt.matmul_heuristic_result_dtype)
            count = np.zeros(1, dtype=np.int32)
            self.heuristic_queries += 1
            wl, al, cl = layouts
            try:
                lt.matmul_algo_get_heuristic(self.handle, desc, wl, al, cl, cl, pref,
                                             HEURISTIC_RESULTS, results.ctypes.data,
                                             count.ctypes.data)  # fmt: skip
            except lt.cuBLASLtError:  # NOT_SUPPORTED: no algorithm for this combination
                count[0] = 0
            usable = [i for i in range(int(count[0])) if int(results["state"][i]) == 0]
            if not usable:
                raise LookupError
            i = usable[0]
            algo = results[i : i + 1]["algo"].copy()
            scalars = np.array([1.0, 1.0 if mode == 1 else 0.0], np.float32)
            return _Plan(desc=desc, layouts=(wl, al, cl), algo=algo, algo_ptr=algo.ctypes.data,
                         scalars=scalars, alpha_ptr=scalars.ctypes.data,
                         beta_ptr=scalars.ctypes.data + 4, bias=bias,
                         workspace=int(results["workspace_size"][i]))  # fmt: skip
        except LookupError:
            for lay in layouts:
                lt.matrix_layout_destroy(lay)
            lt.matmul_desc_destroy(desc)
            return None
        finally:
            if pref:
                lt.matmul_preference_destroy(pref)

    # ------------------------------------------------------------------ execution

    def gemm(self, a: int, lda: int, w: int, ldw: int, m: int, n: int, k: int, c: int, ldc: int,
             mode: int, bias: int = 0) -> bool:  # fmt: skip
        """Enqueue C (op)= A . W^T on the stream; False (nothing enqueued) if cuBLASLt refuses
        the case."""
        if m <= 0 or n <= 0:
            return True
        aligns = (_alignment(a), _alignment(w), _alignment(c))
        p = self.plan(m, n, k, lda, ldw, ldc, mode, bool(bias), aligns)
        if p is None:
            return False
        lt = self._lt
        if p.bias:
            self._set_desc(p.desc, lt.MatmulDescAttribute.BIAS_POINTER, bias)
        wl, al, cl = p.layouts
        lt.matmul(self.handle, p.desc, p.alpha_ptr, w, wl, a, al, p.beta_ptr, c, cl, c, cl,
                  p.algo_ptr, self.workspace_ptr, self.workspace_bytes, self.stream)  # fmt: skip
        return True

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the library may be gone
            self.close()

    def close(self) -> None:
        lt = self._lt
        for p in self._plans.values():
            if p is not None:
                for lay in p.layouts:
                    lt.matrix_layout_destroy(lay)
                lt.matmul_desc_destroy(p.desc)
        self._plans = {}
        if self.handle:
            lt.destroy(self.handle)
            self.handle = 0
        self._workspace = None
