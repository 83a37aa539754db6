"""The CUDA backend: our kernels (cuda_kernels/*.cu) on an NVIDIA GPU, with the same interface
as the numpy backend (base.Backend), so the engine and server use either unchanged.

The parts, one concern each: device.py (context and stream), arena.py (the weight layout),
memory.py (weights, KV pool and workspace, allocated once), shapes.py (launch shapes),
kernels.py (the named kernel launches), plan.py (the forward step
as a sequence of those launches), runner.py (input packing, eager launches or CUDA-graph replay
per batch bucket), graphs.py (capture and replay), sampler.py (non-greedy sampling on the
device), blaslt.py (optional cuBLASLt prefill GEMMs). Greedy sampling is fused into the lm_head
GEMV (an atomicMax argmax), so only the ids come back; temperature / top-k / top-p / min-p /
repetition penalty / logprobs rows are sampled on the device by one sample_rows launch for all
of them, with the host sampler (inference_service/sampling/sampler.py) as the fallback
(KUIPER_HOST_SAMPLER=1).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from inference_service.backends.base import BatchItem, check_batch_for
from inference_service.backends.cuda.blaslt import gemm_choice, open_blaslt
from inference_service.backends.cuda.device import Device
from inference_service.backends.cuda.kernels import StepKernels
from inference_service.backends.cuda.memory import KvPool, WeightArena, Workspace
from inference_service.backends.cuda.plan import StepBuffers, forward
from inference_service.backends.cuda.runner import StepRunner
from inference_service.backends.cuda.sampler import DeviceSampler, supported
from inference_service.backends.cuda.shapes import (
    bucket_for,
    ceil_div,
    check_supported,
)
from inference_service.models.loader import LoadedModel
from inference_service.models.rope import rope_inv_freq
from inference_service.sampling.params import SampleOutput, SamplingParams
from inference_service.sampling.sampler import sample

DEFAULT_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PROFILE_SPIN_CYCLES = 50_000_000  # profile_step: hold the stream while the step is queued


def fast_greedy(p: SamplingParams) -> bool:
    """Rows the fused device argmax serves alone (no penalty, no logprobs)."""
    return p.greedy and p.repetition_penalty == 1.0 and p.logprobs is None


def step_rows(batch: list[BatchItem], graph_buckets: tuple[int, ...],
              max_batch: int) -> tuple[list[int], int | None]:  # fmt: skip
    """The items that sample, and the graph bucket a step replays: decode-only steps (every
    item one token and sampling) within the buckets; None: eager (or graphs are off: pass ())."""
    rows = [i for i, it in enumerate(batch) if it.sampling is not None]
    is_decode = len(rows) == len(batch) and all(len(it.token_ids) == 1 for it in batch)
    bucket = bucket_for(len(batch), graph_buckets) if is_decode else None
    return rows, bucket if bucket is not None and bucket <= max_batch else None


def argmax_ids(keys: np.ndarray) -> np.ndarray:
    """Token ids from the fused argmax's uint64 keys (low word: 0xFFFFFFFF - id, so that the
    lowest id wins a tie under atomicMax)."""
    return (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)


class CudaBackend:
    """Same interface as NumpyBackend (see base.Backend)."""

    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int | None = None,
        block_size: int = 16,
        kv_memory_bytes: int | None = None,
        *,
        device_index: int = 0,
        max_tokens: int = 2048,
        max_batch: int = 256,
        use_graphs: bool = True,
        use_pdl: bool = True,
        graph_buckets: tuple[int, ...] = DEFAULT_GRAPH_BUCKETS,
        gemm: str | None = None,
    ) -> None:
        from cuda_kernels import load_kernels

        c = model.config
        check_supported(c)
        self.config = c
        self.block_size = block_size
        self.use_graphs = use_graphs
        self.graph_buckets = tuple(sorted(graph_buckets))
        self.max_batch = max_batch
        self._device = dev = Device(device_index)
        cuda = self._cuda = dev.cuda
        self.device_name = dev.name
        self.stream = dev.stream
        self.kernels = load_kernels()
        self._k = StepKernels(cuda, self.kernels, c, dev.stream, dev.cu_stream, dev.sm_count,
                              block_size)  # fmt: skip
        # Prefill GEMMs: "ours" (gemm.cuh), "cublaslt" (nvmath-python's cuBLASLt bindings) or
        # "auto" (default: cuBLASLt where blaslt.auto_prefers says, if nvmath imports); None
        # reads $KUIPER_GEMM. Changing self.gemm later switches (the handle stays).
        self.gemm = gemm_choice(gemm)
        self._k.blaslt = open_blaslt(self.gemm, dev.stream.handle)

        self._weights = WeightArena(cuda, c, model.weights)
        self._inv_freq = cuda.to_device(rope_inv_freq(c).astype(np.float32))
        self._k.inv_freq = int(self._inv_freq)
        logits = cuda.mem_alloc(max_batch * c.vocab_size * 4)
        argmax = cuda.mem_alloc(max_batch * 8)
        self._logits_mem, self._argmax_mem = logits, argmax
        self._argmax_host = cuda.pagelocked_empty(max_batch, np.uint64)
        self._logits_host = cuda.pagelocked_empty((1, c.vocab_size), np.float32)
        self._k.alloc_attention_scratch()
        # The pool is sized from the memory left after weights and a workspace; the workspace
        # is then reallocated for the real block-table width.
        ws = Workspace.allocate(cuda, c, max_tokens, max_batch, 1)
        self._kv = KvPool(cuda, c, block_size, num_blocks, kv_memory_bytes, self.device_name)
        self.num_blocks = self._kv.num_blocks
        self.scratch_block = self._kv.scratch_block
        self.max_model_len = min(c.max_position_embeddings, self.num_blocks * block_size)
        self._buf = StepBuffers(self._weights.ptr, self._kv, ws, int(logits), int(argmax),
                                c.vocab_size)  # fmt: skip
        self._runner = StepRunner(cuda, self._k, self._buf, block_size, max_batch, use_pdl)
        self._runner.scratch_block = self.scratch_block
        self._runner.max_width = ceil_div(self.max_model_len, block_size)
        self._runner.alloc_workspace(max_tokens)
        # Non-greedy rows: the device sampler, or the host one with KUIPER_HOST_SAMPLER=1 (or
        # device_sampling = False); built at the first such row.
        self.device_sampling = os.environ.get("KUIPER_HOST_SAMPLER", "") != "1"
        # lm_head rows computed (see base.Backend.sample_vocab); the rest of a logits row is -inf.
        self.sample_vocab = c.vocab_size
        self._sampler: DeviceSampler | None = None
        # The server builds the backend in a worker thread that ends at exit: leave its
        # context stack empty. Threads that step the backend push their own (Device.enter).
        dev.leave()

    # ------------------------------------------------------------------ settings

    @property
    def decode_unroll(self) -> int | None:
        """Attention for <= 8 token rows: None = paged_decode_d*_u{U} with U picked per launch
        (shapes.decode_unroll_for), U = that kernel with a fixed U, 0 = the tiled
        paged_attention_d*. Clear the graphs (clear_graphs()) after a change."""
        return self._runner.decode_unroll

    @decode_unroll.setter
    def decode_unroll(self, u: int | None) -> None:
        self._runner.decode_unroll = u

    @property
    def use_pdl(self) -> bool:
        """Capture decode graphs with programmatic dependent launch (False after a failed
        capture with it: the backend then warns and captures plain graphs)."""
        return self._runner.use_pdl

    @property
    def gemm(self) -> str:
        return self._k.gemm_choice

    @gemm.setter
    def gemm(self, choice: str) -> None:
        self._k.gemm_choice = choice

    @property
    def blaslt(self) -> Any:
        """The cuBLASLt wrapper (blaslt.CublasLt) prefill GEMMs may use; None: ours only."""
        return self._k.blaslt

    @property
    def max_width(self) -> int:
        """Block-table columns a step can use (max_model_len / block_size)."""
        return self._runner.max_width

    def clear_graphs(self) -> None:
        """Drop the captured decode graphs (the next decode steps capture them again)."""
        self._runner.clear_graphs()

    # ------------------------------------------------------------------ public API

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        if not batch:
            return []
        self._device.enter()
        self._apply_sample_vocab()
        self._check(batch)
        rows, bucket = step_rows(batch, self.graph_buckets if self.use_graphs else (),
                                 self.max_batch)  # fmt: skip
        if bucket is not None:
            self._runner.run_graph(batch, bucket)
        else:
            self._runner.run_eager(batch, rows)
        params = [batch[i].sampling for i in rows]
        out: list[SampleOutput | None] = [None] * len(batch)
        if not rows:
            self.stream.synchronize()
            return out
        cuda = self._cuda
        dev_rows = [r for r, p in enumerate(params) if not fast_greedy(p)]
        sampler = self._device_sampler(params, dev_rows)
        if sampler is not None:  # one launch for every such row, behind the forward
            sampler.enqueue(self._buf.logits, dev_rows, [params[r] for r in dev_rows],
                            [batch[rows[r]].history for r in dev_rows],
                            [batch[rows[r]].step for r in dev_rows], self.stream)  # fmt: skip
        keys = self._argmax_host[: len(rows)]
        cuda.memcpy_dtoh_async(keys, self._buf.argmax, self.stream)
        self.stream.synchronize()
        ids = argmax_ids(keys)
        sampled = dict(zip(dev_rows, sampler.finish(), strict=True)) if sampler is not None else {}
        for r, i in enumerate(rows):
            p = params[r]
            if fast_greedy(p):
                out[i] = SampleOutput(token_id=int(ids[r]))
            elif r in sampled:
                out[i] = sampled[r]
            else:
                item = batch[i]
                out[i] = sample(self._logits_row(r), p, item.history, item.step)
        return out

    def _apply_sample_vocab(self) -> None:
        """Make the lm_head compute rows [0, sample_vocab) (argmax and samplers then never pick
        a higher id): new graphs, and the rest of every logits row -inf once."""
        n, v = self.sample_vocab, self.config.vocab_size
        if n == self._buf.lm_rows:
            return
        if not 1 <= n <= v:
            raise ValueError(f"sample_vocab must be in 1..{v}, got {n}")
        self.stream.synchronize()
        self.clear_graphs()
        self._cuda.memset_d32(self._buf.logits, 0xFF800000, self.max_batch * v)  # float -inf
        self._buf.lm_rows = n

    def _device_sampler(self, params: list[SamplingParams], dev_rows: list[int]):
        """The device sampler when it takes every non-greedy row of the step, else None."""
        v = self.config.vocab_size
        if not dev_rows or not self.device_sampling:
            return None
        if not all(supported(params[r], v) for r in dev_rows):
            return None
        if self._sampler is None:
            self._sampler = DeviceSampler(self._cuda, self.kernels, v)
        return self._sampler

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        if not batch:
            return np.zeros((0, self.config.vocab_size), np.float32)
        self._device.enter()
        self._apply_sample_vocab()
        self._check(batch)
        self._runner.run_eager(batch, list(range(len(batch))))
        v = self.config.vocab_size
        host = np.empty((len(batch), v), np.float32)
        self.stream.synchronize()
        self._cuda.memcpy_dtoh(host, self._buf.logits)
        return host

    def decode_logits_graph(self, batch: list[BatchItem]) -> np.ndarray:
        """Logits of a decode batch computed through the captured graph (tests compare it
        with the eager path)."""
        self._device.enter()
        self._apply_sample_vocab()
        self._check(batch)
        bucket = bucket_for(len(batch), self.graph_buckets)
        if bucket is None or any(len(it.token_ids) != 1 for it in batch):
            raise ValueError("decode_logits_graph needs one token per item within the buckets")
        self._runner.run_graph(batch, bucket)
        host = np.empty((len(batch), self.config.vocab_size), np.float32)
        self.stream.synchronize()
        self._cuda.memcpy_dtoh(host, self._buf.logits)
        return host

    def close(self) -> None:
        """Drop the captured graphs now (device memory goes with the object). Called from a
        thread other than the main one (the engine thread), also pop the context this backend
        pushed there: PyCUDA complains about a non-empty context stack when a thread ends."""
        self.stream.synchronize()
        self.clear_graphs()
        self._device.leave()

    # ------------------------------------------------------------------ inputs

    def _check(self, batch: list[BatchItem]) -> None:
        check_batch_for(self, batch)
        n_rows = sum(it.sampling is not None for it in batch)
        if n_rows > self.max_batch or len(batch) > self.max_batch:
            raise ValueError(f"batch of {len(batch)} exceeds the CUDA backend's {self.max_batch}")

    # ------------------------------------------------------------------ measurement

    def profile_step(self, batch: list[BatchItem]) -> list[tuple[str, float]]:
        """Run one step eagerly with every kernel between two events, queued behind a spin
        kernel so the kernels run back to back; returns (label, microseconds) in launch order.
        Like logits(), it writes the batch's KV slots."""
        self._device.enter()
        self._check(batch)
        rows = [i for i, it in enumerate(batch) if it.sampling is not None]
        layout, max_ctx = self._runner.eager_layout(batch, rows)
        self._k.spin(PROFILE_SPIN_CYCLES)
        self._k.profile = prof = []
        try:
            forward(self._k, self._buf, layout, max_ctx, self.decode_unroll)
            self.stream.synchronize()
            return [(label, 1e3 * end.time_since(start)) for label, start, end in prof]
        finally:
            self._k.profile = None

    def time_decode_graph(self, batch: list[BatchItem], reps: int = 50) -> float:
        """Microseconds per replay of the decode graph for this batch, replayed back to back
        (device time of a step without the host's per-step work)."""
        self._device.enter()
        self._check(batch)
        bucket = bucket_for(len(batch), self.graph_buckets)
        graph = self._runner.run_graph(batch, bucket)
        start, end = self._cuda.Event(), self._cuda.Event()
        start.record(self.stream)
        for _ in range(reps):
            graph.launch(self._device.cu_stream)
        end.record(self.stream)
        end.synchronize()
        return 1e3 * end.time_since(start) / reps

    def _logits_row(self, r: int) -> np.ndarray:
        v = self.config.vocab_size
        self._cuda.memcpy_dtoh_async(self._logits_host[0], self._buf.logits + 4 * r * v,
                                     self.stream)  # fmt: skip
        self.stream.synchronize()
        return np.array(self._logits_host[0, : self._buf.lm_rows])
