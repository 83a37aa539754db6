"""Sampling on the device: the host side of cuda_kernels/sampling.cu::sample_rows.

The CUDA backend's lm_head GEMV writes one fp32 logits row per sampled item. Rows that are not
plain greedy (temperature, top-k, top-p, min-p, repetition penalty, logprobs) go through one
sample_rows launch for all of them: one block per row runs what
inference_service/sampling/sampler.py::sample does on the host, with the same semantics. The
one random number per row, u = sampler.uniform_for(seed, step), is still drawn here, so a
seeded request gives the same tokens on every backend and in every batching.

A step's rows travel as one packed int32 buffer (PARAM_WORDS per row, then the history ids of
rows with a repetition penalty) in one host-to-device copy; the results (token, its logprob,
the top-n) come back in one device-to-host copy. enqueue() only queues work on the stream;
finish() reads the results after the caller has synchronized it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference_service.sampling.params import SampleOutput, SamplingParams

# Must match the SP_* / SAMPLE_* defines in cuda_kernels/sampling.cu.
PARAM_WORDS = 12
SP_ROW, SP_NLOGPROBS, SP_TOPK, SP_HIST_OFF, SP_HIST_LEN = 0, 1, 2, 3, 4
SP_TEMP, SP_TOPP, SP_MINP, SP_PENALTY, SP_U = 6, 7, 8, 9, 10
OUT_WORDS = 44
MAX_TOP = 20
THREADS = 1024
MAX_VOCAB = 1 << 20  # fixed-point masses (w * 2^44) of a row must sum within 64 bits
SIGNATURE = "PiPPPP"
_F32_MAX = float(np.finfo(np.float32).max)


def supported(params: SamplingParams, vocab: int) -> bool:
    """Whether sample_rows reproduces sampler.sample for this row."""
    floats = (params.temperature, params.top_p, params.min_p, params.repetition_penalty)
    return (
        vocab < MAX_VOCAB
        and (params.logprobs is None or 0 <= params.logprobs <= MAX_TOP)
        and all(abs(v) < _F32_MAX for v in floats)  # sent as float32
    )


class _Uniforms(threading.local):
    """uniform_for(seed, step) of one row, without building a Philox generator per call
    (about 30 us each): one generator per thread whose key and counter are reset per draw."""

    def __init__(self) -> None:
        self._bg = np.random.Philox(key=np.zeros(2, np.uint64))
        self._gen = np.random.Generator(self._bg)

    def __call__(self, seed: int, step: int) -> float:
        key = np.array([seed & _U64, step & _U64], dtype=np.uint64)
        self._bg.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.zeros(4, np.uint64), "key": key},
            "buffer": np.zeros(4, np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return float(self._gen.random())


_U64 = (1 << 64) - 1
_one_uniform = _Uniforms()
# From this many seeded rows on, one vectorized Philox for all (≈ 300 numpy calls, a fixed
# 0.2-0.3 ms on a 2-core VM) beats resetting a generator per row (≈ 3 us each).
VECTOR_UNIFORMS_FROM = 96

# Philox4x64-10 (Salmon et al., as numpy's Philox bit generator runs it).
_PHILOX_M = (np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157))
_PHILOX_W = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B))
_LO32, _32 = np.uint64(0xFFFFFFFF), np.uint64(32)


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit words of the 128-bit products a * b, from 32-bit halves."""
    a_lo, a_hi, b_lo, b_hi = a & _LO32, a >> _32, b & _LO32, b >> _32
    lo_lo, lo_hi, hi_lo = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
    mid = (lo_lo >> _32) + (lo_hi & _LO32) + (hi_lo & _LO32)
    return a_hi * b_hi + (lo_hi >> _32) + (hi_lo >> _32) + (mid >> _32), a * b


def uniforms_for(seeds: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """uniform_for(seed, step) of many seeded rows (equal to it: tests/test_cuda_sampler.py)."""
    if len(seeds) < VECTOR_UNIFORMS_FROM:
        return np.array([_one_uniform(s, t) for s, t in zip(seeds, steps, strict=True)])
    return philox_uniforms(seeds, steps)


def philox_uniforms(seeds: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """uniforms_for in one pass over all rows: numpy's Philox keyed by (seed, step) with a zero
    counter makes its first four words from counter 1; random() is the first word's top 53
    bits."""
    with np.errstate(over="ignore"):
        k0 = np.array([s & _U64 for s in seeds], np.uint64)
        k1 = np.array([s & _U64 for s in steps], np.uint64)
        zero = np.zeros_like(k0)
        c0, c1, c2, c3 = zero + np.uint64(1), zero, zero, zero
        for i in range(10):
            if i:
                k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
            hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
            hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return (c0 >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)


def pack_rows(
    logits_rows: Sequence[int],
    params: Sequence[SamplingParams],
    histories: Sequence[np.ndarray],
    steps: Sequence[int],
    vocab: int,
    uniforms: Sequence[float] | None = None,
) -> np.ndarray:
    """int32 [rows * PARAM_WORDS + history ids]: what sample_rows reads for these rows.

    A row: SP_ROW .. SP_HIST_LEN as int32, a pad word, SP_TEMP .. SP_PENALTY as float32, SP_U
    as float64 (byte 40: 8-byte aligned); each field is written for all rows at once. History
    ids are only sent for rows whose penalty is on, with ids outside the vocabulary dropped
    here (the kernel skips duplicates). u is uniform_for(seed, step) (uniforms_for, all seeded
    rows at once), fresh entropy without a seed, or given (tests);
    greedy rows draw nothing, as in sampler.sample."""
    n = len(params)
    if not len(logits_rows) == len(histories) == len(steps) == n:
        raise ValueError("pack_rows needs one logits row, history and step per row")
    hists = [
        _history(h, vocab) if p.repetition_penalty != 1.0 and h is not None and len(h) else None
        for p, h in zip(params, histories, strict=True)
    ]
    hist_lens = np.fromiter((0 if h is None else len(h) for h in hists), np.int64, n)
    buf = np.zeros(n * PARAM_WORDS + int(hist_lens.sum()), np.int32)
    head = buf[: n * PARAM_WORDS].reshape(n, PARAM_WORDS)
    head[:, SP_ROW] = logits_rows
    head[:, SP_NLOGPROBS] = [-1 if p.logprobs is None else min(p.logprobs, vocab) for p in params]
    head[:, SP_TOPK] = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    head[:, SP_HIST_OFF] = np.cumsum(hist_lens) - hist_lens
    head[:, SP_HIST_LEN] = hist_lens
    # top_p / min_p as float32: numpy compares a float32 array with a Python float in float32
    # (NEP 50), so these are the values the host sampler effectively uses.
    f32 = head.view(np.float32)
    f32[:, SP_TEMP] = [p.temperature for p in params]
    f32[:, SP_TOPP] = [p.top_p for p in params]
    f32[:, SP_MINP] = [p.min_p for p in params]
    f32[:, SP_PENALTY] = [p.repetition_penalty for p in params]
    u = head.view(np.float64)[:, SP_U // 2]  # greedy rows keep 0: they draw nothing
    if uniforms is not None:
        u[:] = [0.0 if p.greedy else x for p, x in zip(params, uniforms, strict=True)]
    else:
        seeded = [r for r, p in enumerate(params) if not p.greedy and p.seed is not None]
        fresh = [r for r, p in enumerate(params) if not p.greedy and p.seed is None]
        if seeded:
            u[seeded] = uniforms_for([params[r].seed for r in seeded], [steps[r] for r in seeded])
        if fresh:
            u[fresh] = np.random.default_rng().random(len(fresh))
    present = [h for h in hists if h is not None]
    if present:
        buf[n * PARAM_WORDS :] = np.concatenate(present)
    return buf


def _history(h: np.ndarray, vocab: int) -> np.ndarray:
    h = np.asarray(h)
    return h[(h >= 0) & (h < vocab)]


def unpack_rows(out: np.ndarray, params: Sequence[SamplingParams]) -> list[SampleOutput]:
    """SampleOutputs from sample_rows' int32 [rows, OUT_WORDS] results."""
    res: list[SampleOutput] = []
    lps = out.view(np.float32)
    for r, p in enumerate(params):
        token = int(out[r, 0])
        if p.logprobs is None:
            res.append(SampleOutput(token_id=token))
            continue
        n = int(out[r, 2])
        top = [(int(out[r, 4 + j]), float(lps[r, 4 + MAX_TOP + j])) for j in range(n)]
        res.append(SampleOutput(token_id=token, logprob=float(lps[r, 1]), top_logprobs=top))
    return res


def _cu_stream(stream: Any) -> Any:
    """The cuda.bindings handle of a PyCUDA stream (None: the legacy default stream)."""
    if stream is None:
        return None
    from cuda.bindings import driver

    return driver.CUstream(stream.handle)


class DeviceSampler:
    """Buffers and the launch of sample_rows for one backend (one context, one stream)."""

    def __init__(self, cuda: Any, kernels: Any, vocab: int) -> None:
        self._cuda = cuda
        self.vocab = vocab
        self.kernel = kernels.kernel("sample_rows", SIGNATURE)
        self._in_cap = 0
        self._rows_cap = 0
        self._in_dev = self._in_host = None
        self._scratch = self._out_dev = self._out_host = None
        self._pending: tuple[int, list[SamplingParams]] | None = None

    def _reserve(self, words: int, rows: int) -> None:
        cuda = self._cuda
        if words > self._in_cap:
            self._in_cap = max(words, 2 * self._in_cap, 4096)
            self._in_dev = cuda.mem_alloc(self._in_cap * 4)
            self._in_host = cuda.pagelocked_empty(self._in_cap, np.int32)
        if rows > self._rows_cap:
            self._rows_cap = max(rows, 2 * self._rows_cap)
            self._scratch = None  # free first: the scratch is rows x vocab floats
            self._scratch = cuda.mem_alloc(self._rows_cap * self.vocab * 4)
            self._out_dev = cuda.mem_alloc(self._rows_cap * OUT_WORDS * 4)
            self._out_host = cuda.pagelocked_empty((self._rows_cap, OUT_WORDS), np.int32)

    def enqueue(
        self,
        logits: int,
        logits_rows: Sequence[int],
        params: Sequence[SamplingParams],
        histories: Sequence[np.ndarray],
        steps: Sequence[int],
        stream: Any,
        uniforms: Sequence[float] | None = None,
    ) -> None:
        """Queue sampling of the given rows of the fp32 logits buffer (row r at r * vocab; the
        kernel writes the penalized logits back into it). Call finish() after syncing."""
        n = len(params)
        if n == 0:
            self._pending = None
            return
        packed = pack_rows(logits_rows, params, histories, steps, self.vocab, uniforms)
        self._reserve(len(packed), n)
        cuda = self._cuda
        self._in_host[: len(packed)] = packed
        cuda.memcpy_htod_async(self._in_dev, self._in_host[: len(packed)], stream)
        self.launch(n, logits, stream)
        cuda.memcpy_dtoh_async(self._out_host[:n], self._out_dev, stream)
        self._pending = (n, list(params))

    def launch(self, n: int, logits: int, stream: Any) -> None:
        """sample_rows over the n rows packed by the last enqueue() (also what a benchmark
        times alone)."""
        hist = int(self._in_dev) + 4 * n * PARAM_WORDS
        self.kernel.launch((n, 1, 1), (THREADS, 1, 1), logits, self.vocab, self._in_dev, hist,
                           self._scratch, self._out_dev, stream=_cu_stream(stream))  # fmt: skip

    def finish(self) -> list[SampleOutput]:
        """The outputs of the last enqueue(), once its stream has been synchronized."""
        if self._pending is None:
            return []
        n, params = self._pending
        self._pending = None
        return unpack_rows(np.array(self._out_host[:n]), params)

    def sample(self, logits: int, logits_rows, params, histories, steps, stream, uniforms=None):
        """enqueue + synchronize + finish (tests and benchmarks)."""
        self.enqueue(logits, logits_rows, params, histories, steps, stream, uniforms)
        stream.synchronize()
        return self.finish()
