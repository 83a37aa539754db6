"""The kernels one forward step launches, as named calls with keyword arguments. Each wrapper
knows its kernel's signature and launch shape (grid, block, shared memory: the arithmetic is in
shapes.py), so the forward plan (plan.py) reads as a list of operations. Every launch goes to the
backend's stream through cuda_kernels.Kernel; under `profiling` each launch sits between two
events; while `pdl` is set (decode-graph capture) launches carry the programmatic dependent
launch attribute."""

from __future__ import annotations

from typing import Any

import numpy as np

from cuda_kernels import Kernels
from inference_service.backends.cuda.blaslt import use_blaslt
from inference_service.backends.cuda.graphs import stream_capturing
from inference_service.backends.cuda.shapes import (
    ATT_THREADS,
    DEC_THREADS,
    DEC_UNROLLS,
    GEMM_LOCKS,
    GEMM_SWIGLU,
    GEMM_TILES,
    GEMV_MAX_TOKENS,
    GEMV_THREADS,
    attention_kernel,
    attention_splits,
    ceil_div,
    decode_attention_kernel,
    decode_splits,
    decode_unroll_for,
    gemm_plan,
    gemv_grid,
    gemv_smem,
    prefill_attention_kernel,
    prefill_kgroups,
    prefill_smem,
    prefill_threads,
    resident_blocks,
)
from inference_service.models.config import ModelConfig

# Kernel signatures (cuda_kernels.loader: P pointer, i int32, f float32, q int64).
SIGNATURES = {
    "embedding_gather": "PPPiiPi",
    "add_rmsnorm": "PPiPPif",
    "swiglu": "PPi",
    "rope_kv_write": "PiPPPPPiiii",
    "argmax_rows": "PiiP",
    "argmax_finish": "PiP",
    "spin_wait": "q",
}
GEMV_SIG = "PiiPiiPPfPiiPP"
GEMV_ROPE_SIG = GEMV_SIG + "PPPPPiii"
GEMM_SIG = "PiPiiiiPiiPP"
ATT_SIG = "PiPPPiPPPiPPPiiiif"
PF_SIG = "PiPPPiPiPiiif"  # prefill_attention_d*_k*: q, caches, tables, out, tiles, shape

# gemv.cu input and output modes.
X_BF16, X_RESID_NORM = 0, 1  # bf16 rows / fp32 residual rows RMS-normalized in the prologue
Y_BF16, Y_ADD_F32, Y_F32 = 0, 1, 2  # bf16 (+ bias) / fp32 += (residual) / fp32 (+ argmax)
# gemm.cuh modes: bf16 (+ bias), fp32 += (residual), fp32, SwiGLU over gate|up rows.
GEMM_BF16, GEMM_ADD_F32 = 0, 1

PARTIAL_TOKENS = 64  # token rows the flash-decoding partials buffer holds at max splits
MAX_SPLITS = 32


class StepKernels:
    """The launches of one backend: its kernels, stream, model shape and attention scratch."""

    def __init__(self, cuda: Any, kernels: Kernels, c: ModelConfig, stream: Any, cu_stream: Any,
                 sm_count: int, block_size: int) -> None:  # fmt: skip
        self._cuda = cuda
        self.config = c
        self.stream = stream  # PyCUDA stream (events, copies)
        self.cu_stream = cu_stream  # its cuda.bindings handle (launches)
        self.sm_count = sm_count
        self.inv_freq = 0  # fp32 RoPE inverse frequencies on the device; set by the backend
        self.qkv_dim = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.q_dim = c.num_heads * c.head_dim
        self.scale = float(1.0 / np.sqrt(c.head_dim))
        self._block_size = block_size
        self.pdl = False  # set while a decode graph is captured with PDL
        self.profile: list | None = None  # (label, start event, end event) per launch
        self.blaslt: Any = None  # a blaslt.CublasLt when prefill GEMMs may use cuBLASLt
        self.gemm_choice = "ours"
        self.gate_up_scratch = 0  # bf16 [tokens, 2 * intermediate]: cuBLASLt's SwiGLU input

        self._k: dict[str, Any] = {}
        for name, sig in SIGNATURES.items():
            self._k[name] = kernels.kernel(name, sig)
        for t in range(1, GEMV_MAX_TOKENS + 1):
            for kind in ("gemv", "gemv_pair"):
                self._k[f"{kind}_t{t}"] = kernels.kernel(f"{kind}_t{t}", GEMV_SIG)
            self._k[f"gemv_qkv_rope_t{t}"] = kernels.kernel(f"gemv_qkv_rope_t{t}", GEMV_ROPE_SIG)
        # Registers and static shared memory of the GEMVs: their grid is one resident wave.
        self._regs = {
            name: (k.attribute("NUM_REGS"), k.attribute("SHARED_SIZE_BYTES"))
            for name, k in self._k.items()
            if name.startswith("gemv")
        }
        for tile in GEMM_TILES:
            self._k[tile.name] = kernels.kernel(tile.name, GEMM_SIG)
        self._gemm_locks = cuda.mem_alloc(4 * GEMM_LOCKS)  # split-K turnstiles, kept 0
        cuda.memset_d32(self._gemm_locks, 0, GEMM_LOCKS)
        d = c.head_dim
        for name in [attention_kernel(d)] + [decode_attention_kernel(d, u) for u in DEC_UNROLLS]:
            self._k[name] = kernels.kernel(name, ATT_SIG)
        self.prefill_attention_name = prefill_attention_kernel(d)  # None: no such kernel for d
        for kg in (2, 4):
            name = prefill_attention_kernel(d, kg)
            if name is not None:
                self._k[name] = kernels.kernel(name, PF_SIG)
        self._att_name = attention_kernel(d)
        self._part_o = self._part_ml = None

    def alloc_attention_scratch(self) -> None:
        """The flash-decoding partials (o, m, l) buffers, for PARTIAL_TOKENS rows at MAX_SPLITS
        (separate from __init__ so the backend allocates in the order it always did)."""
        c, cuda = self.config, self._cuda
        self._part_o = cuda.mem_alloc(PARTIAL_TOKENS * c.num_heads * MAX_SPLITS * c.head_dim * 4)
        self._part_ml = cuda.mem_alloc(PARTIAL_TOKENS * c.num_heads * MAX_SPLITS * 2 * 4)

    # ------------------------------------------------------------------ launching

    def _launch(self, label: str, name: str, grid, block, *args, shared: int = 0) -> None:
        """Enqueue one kernel on the stream; under profiling, between two events."""
        prof = self.profile
        if prof is not None:
            start, end = self._cuda.Event(), self._cuda.Event()
            start.record(self.stream)
        self._k[name].launch(grid, block, *args, stream=self.cu_stream, shared=shared,
                             pdl=self.pdl)  # fmt: skip
        if prof is not None:
            end.record(self.stream)
            prof.append((label, start, end))

    def spin(self, cycles: int) -> None:
        """Hold the stream for `cycles` clocks (profile_step queues the step behind it)."""
        self._k["spin_wait"].launch((1, 1, 1), (1, 1, 1), cycles, stream=self.cu_stream)

    # ------------------------------------------------------------------ element-wise

    def embed(self, tokens: int, *, table: int, ids: int, out: int, argmax: int,
              rows: int) -> None:  # fmt: skip
        """out[t] = fp32 table[ids[t]]; also clears the `rows` fused-argmax slots."""
        c = self.config
        self._launch("embedding", "embedding_gather", (tokens, 1, 1), (128, 1, 1), table, ids,
                     out, c.hidden_size, c.vocab_size, argmax, rows)  # fmt: skip

    def rmsnorm(self, tokens: int, *, x: int, weight: int, out: int) -> None:
        """out (bf16) = RMSNorm(x fp32 rows) * weight."""
        c = self.config
        self._launch("rmsnorm", "add_rmsnorm", (tokens, 1, 1), (256, 1, 1), x, 0, 0, weight, out,
                     c.hidden_size, c.rms_norm_eps)  # fmt: skip

    def rope_kv_write(self, tokens: int, *, qkv: int, positions: int, slots: int, k_cache: int,
                      v_cache: int) -> None:  # fmt: skip
        """RoPE on the q and k of each q|k|v row (in place); k and v into the paged cache."""
        c = self.config
        self._launch("rope+kv", "rope_kv_write", (tokens, 1, 1), (128, 1, 1), qkv, self.qkv_dim,
                     positions, slots, self.inv_freq, k_cache, v_cache, c.num_heads,
                     c.num_kv_heads, c.head_dim, 0)  # fmt: skip

    # ------------------------------------------------------------------ GEMV (<= 8 rows)

    def _gemv(self, label: str, kind: str, tokens: int, weight: int, n: int, k: int, x: int,
              xmode: int, x_rows: int, norm: int, y: int, ymode: int, y_stride: int,
              bias: int = 0, argmax: int = 0, rope: tuple = ()) -> None:  # fmt: skip
        name = f"{kind}_t{tokens}"
        args = (weight, n, k, x, xmode, k, x_rows, norm, self.config.rms_norm_eps, y, ymode,
                y_stride, bias, argmax, *rope)  # x rows of k elements  # fmt: skip
        regs, static_smem = self._regs[name]
        smem = gemv_smem(tokens, k)
        per_sm = resident_blocks(regs, GEMV_THREADS, smem + static_smem)
        self._launch(label, name, (gemv_grid(n, self.sm_count, per_sm), 1, 1),
                     (GEMV_THREADS, 1, 1), *args, shared=smem)  # fmt: skip

    def qkv_rope(self, tokens: int, *, resid: int, norm: int, weight: int, bias: int, out: int,
                 positions: int, slots: int, k_cache: int, v_cache: int) -> None:  # fmt: skip
        """out = q|k|v of RMSNorm(resid) (+ bias), RoPE on q and k; k and v written into the
        paged cache at slots (q rows stay in out)."""
        c = self.config
        rope = (positions, slots, self.inv_freq, k_cache, v_cache, c.num_heads, c.num_kv_heads,
                c.head_dim)  # fmt: skip
        self._gemv("qkv+norm+rope", "gemv_qkv_rope", tokens, weight, self.qkv_dim // 2,
                   c.hidden_size, resid, X_RESID_NORM, 0, norm, out, Y_BF16, self.qkv_dim, bias,
                   rope=rope)  # fmt: skip

    def gemv(self, label: str, tokens: int, *, weight: int, n: int, k: int, x: int, out: int,
             residual: bool) -> None:  # fmt: skip
        """x (bf16 [tokens, k]) times weight^T ([n, k]): added to the fp32 rows of out when
        residual, else stored as bf16."""
        self._gemv(label, "gemv", tokens, weight, n, k, x, X_BF16, 0, 0, out,
                   Y_ADD_F32 if residual else Y_BF16, n)  # fmt: skip

    def mlp(self, tokens: int, *, resid: int, norm: int, weight: int, out: int) -> None:
        """out (bf16) = silu(gate) * up of RMSNorm(resid), weight = gate rows | up rows."""
        c = self.config
        inter = c.intermediate_size
        self._gemv("gate_up+norm+swiglu", "gemv_pair", tokens, weight, inter, c.hidden_size,
                   resid, X_RESID_NORM, 0, norm, out, Y_BF16, inter)  # fmt: skip

    def lm_head(self, rows: int, *, resid: int, row_index: int, norm: int, weight: int,
                n: int, logits: int, argmax: int) -> None:  # fmt: skip
        """fp32 logits[r, :n] of RMSNorm(resid[row_index[r]]) for `rows` (<= 8) rows, and the
        argmax of each row fused in (atomicMax on argmax[r])."""
        c = self.config
        self._gemv("lm_head+norm+argmax", "gemv", rows, weight, n, c.hidden_size, resid,
                   X_RESID_NORM, row_index, norm, logits, Y_F32, c.vocab_size, 0, argmax)  # fmt: skip

    # ------------------------------------------------------------------ GEMM (> 8 rows)

    def matmul(self, label: str, *, x: int, weight: int, m: int, n: int, k: int, out: int,
               bias: int = 0, residual: bool = False, swiglu: bool = False) -> None:  # fmt: skip
        """x (bf16 [m, k]) times weight^T ([n, k], or [2n, k] gate | up rows with swiglu):
        bf16 out (+ bias), fp32 out += with residual, bf16 silu(gate) * up with swiglu. Our
        tensor-core GEMM, or cuBLASLt where the backend's gemm choice says (eager steps)."""
        mode = GEMM_SWIGLU if swiglu else GEMM_ADD_F32 if residual else GEMM_BF16
        lt = self.blaslt
        # cuBLASLt only in eager steps: captured decode graphs (9..64 rows) keep our kernels.
        if (lt is not None and use_blaslt(self.gemm_choice, m, n, k, mode) and not self.pdl
                and not stream_capturing(self.cu_stream)):  # fmt: skip
            prof = self.profile
            if prof is not None:
                start, end = self._cuda.Event(), self._cuda.Event()
                start.record(self.stream)
            # SwiGLU: the plain gate|up GEMM into the gate_up buffer, then the swiglu kernel.
            dst, ldo = (self.gate_up_scratch, 2 * n) if swiglu else (out, n)
            if lt.gemm(x, k, weight, k, m, 2 * n if swiglu else n, k, dst, ldo,
                       0 if swiglu else mode, bias):  # fmt: skip
                if prof is not None:
                    end.record(self.stream)
                    prof.append((label, start, end))
                if swiglu:
                    self._launch("swiglu", "swiglu", (ceil_div(n // 8, 256), m, 1), (256, 1, 1),
                                 dst, out, n)  # fmt: skip
                return
        tile, splits = gemm_plan(m, n, k, self.sm_count, mode)
        self._launch(label, tile.name, tile.grid(m, n, swiglu, splits), (tile.threads, 1, 1),
                     x, k, weight, k, m, n, k, out, n, mode, bias, int(self._gemm_locks),
                     shared=tile.smem)  # fmt: skip

    # ------------------------------------------------------------------ attention

    def attention_choice(self, tokens: int, max_ctx: int,
                         decode_unroll: int | None) -> tuple[str, int, int]:  # fmt: skip
        """(kernel, threads, splits) of attention() for a step: <= 8 rows run the split decode
        kernel, U from decode_unroll (None: by the work, 0: the tiled kernel instead), splits
        used per row's length; more rows the tiled kernel with flash-decoding splits."""
        c = self.config
        max_splits = min(MAX_SPLITS, (PARTIAL_TOKENS * MAX_SPLITS) // tokens)
        if tokens <= GEMV_MAX_TOKENS and decode_unroll != 0:
            u = decode_unroll or decode_unroll_for(max_ctx, c.num_kv_heads, tokens)
            splits = decode_splits(max_ctx, c.head_dim, max_splits, u)
            return decode_attention_kernel(c.head_dim, u), DEC_THREADS, splits
        splits = attention_splits(tokens, c.num_kv_heads, max_ctx, self.sm_count, max_splits)
        return self._att_name, ATT_THREADS, splits

    def attention(self, tokens: int, *, qkv: int, k_cache: int, v_cache: int,
                  block_tables: int, width: int, tok_seq: int, positions: int, out: int,
                  counters: int, choice: tuple[str, int, int]) -> None:  # fmt: skip
        """Paged attention of each token row over its sequence's cache (causal: positions <=
        its own), q from the q|k|v rows, out bf16 [tokens, heads * head_dim]; choice from
        attention_choice()."""
        c = self.config
        name, threads, splits = choice
        self._launch("attention", name, (tokens, c.num_kv_heads, splits), (threads, 1, 1), qkv,
                     self.qkv_dim, k_cache, v_cache, block_tables, width, tok_seq, positions,
                     out, self.q_dim, int(self._part_o), int(self._part_ml), counters,
                     c.num_heads, c.num_kv_heads, c.head_dim, self._block_size, self.scale)  # fmt: skip

    def prefill_attention(self, tiles: int, *, qkv: int, k_cache: int, v_cache: int,
                          block_tables: int, width: int, out: int, tile_table: int) -> None:  # fmt: skip
        """Causal attention on tensor cores over `tiles` query tiles (shapes.prefill_tiles,
        packed at tile_table), out bf16 [tokens, heads * head_dim]."""
        c = self.config
        kg = prefill_kgroups(c.head_dim, tiles * c.num_kv_heads, self.sm_count)
        self._launch("attention", prefill_attention_kernel(c.head_dim, kg),
                     (tiles, c.num_kv_heads, 1), (prefill_threads(kg), 1, 1), qkv, self.qkv_dim,
                     k_cache, v_cache, block_tables, width, out, self.q_dim, tile_table,
                     c.num_heads, c.num_kv_heads, self._block_size, self.scale,
                     shared=prefill_smem(c.head_dim, kg))  # fmt: skip
