"""The CUDA backend: our kernels (cuda_kernels/*.cu) driven from PyCUDA.

Device memory is allocated once: one weight arena (bf16 matrices, fp32 norms/biases), one paged
KV pool ([layer][k|v][block][slot][kv head][head dim], bf16, plus one scratch block that padded
graph rows write to), and one activation workspace sized for `max_tokens`. A step's inputs
(ids, positions, KV slots, block tables) travel in one packed int32 copy from pinned memory.

Decode steps (every item one token, all sampled) replay a CUDA graph captured per batch-size
bucket and block-table width; other steps (prefill chunks, mixed batches) launch the same
kernels eagerly. Up to 8 token rows run as GEMVs (weights read once), more as tensor-core
GEMMs. Greedy sampling is fused into the lm_head GEMV (an atomicMax argmax), so only the ids
come back; temperature / top-k / top-p / min-p / repetition penalty / logprobs rows are sampled
on the device by one sample_rows launch for all of them (backends/cuda_sampler.py), with the
host sampler (inference_service/sampling/sampler.py) as the fallback (KUIPER_HOST_SAMPLER=1).
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference_service.backends.base import BatchItem, check_batch
from inference_service.backends.cuda_blaslt import (
    gemm_choice,
    open_blaslt,
    stream_capturing,
    use_blaslt,
)
from inference_service.backends.cuda_plan import (
    ATT_THREADS,
    DEC_THREADS,
    DEC_UNROLLS,
    GEMM_LOCKS,
    GEMM_SWIGLU,
    GEMM_TILES,
    GEMV_MAX_TOKENS,
    GEMV_THREADS,
    InputLayout,
    attention_kernel,
    attention_splits,
    blocks_for_memory,
    bucket_for,
    ceil_div,
    check_supported,
    decode_attention_kernel,
    decode_splits,
    decode_unroll_for,
    gemm_plan,
    gemv_grid,
    gemv_smem,
    kv_block_bytes,
    prefill_attention_kernel,
    prefill_kgroups,
    prefill_smem,
    prefill_threads,
    prefill_tiles,
    resident_blocks,
    width_bucket,
)
from inference_service.backends.cuda_sampler import DeviceSampler, supported
from inference_service.backends.cuda_weights import plan_arena
from inference_service.models.loader import LoadedModel
from inference_service.models.rope import rope_inv_freq
from inference_service.sampling.params import SampleOutput, SamplingParams
from inference_service.sampling.sampler import sample

DEFAULT_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PARTIAL_TOKENS = 64  # token rows the flash-decoding partials buffer holds at max splits
MAX_SPLITS = 32
KV_FREE_FRACTION = 0.90  # of the memory left after weights + workspace, when no size is given

_SIGNATURES = {
    "embedding_gather": "PPPiiPi",
    "add_rmsnorm": "PPiPPif",
    "swiglu": "PPi",
    "rope_kv_write": "PiPPPPPiiii",
    "argmax_rows": "PiiP",
    "argmax_finish": "PiP",
    "spin_wait": "q",
}
_GEMV_SIG = "PiiPiiPPfPiiPP"
_GEMV_ROPE_SIG = _GEMV_SIG + "PPPPPiii"
_GEMM_SIG = "PiPiiiiPiiPP"
_ATT_SIG = "PiPPPiPPPiPPPiiiif"
_PF_SIG = "PiPPPiPiPiiif"  # prefill_attention_d*_k*: q, caches, tables, out, tiles, shape


# Threads in which a backend pushed the primary context (one push per thread). PyCUDA insists
# that the main thread's context stack is empty at exit, so that push is popped at exit.
_PUSHED: dict[int, Any] = {}


def _pop_main_thread_context() -> None:
    if _PUSHED.pop(threading.get_ident(), None) is not None:
        import pycuda.driver as cuda

        try:
            cuda.Context.synchronize()
            cuda.Context.pop()
        except cuda.Error:
            pass


def fast_greedy(p: SamplingParams) -> bool:
    """Rows the fused device argmax serves alone (no penalty, no logprobs)."""
    return p.greedy and p.repetition_penalty == 1.0 and p.logprobs is None


@dataclass
class _Workspace:
    tokens: int  # token rows of every activation buffer
    resid: Any
    xnorm: Any
    qkv: Any
    attn: Any
    gate_up: Any
    act: Any
    inputs: Any  # packed int32 step inputs (device)
    inputs_host: np.ndarray  # pinned mirror


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
        import pycuda.driver as cuda

        from cuda_kernels import load_kernels

        c = model.config
        check_supported(c)
        self.config = c
        self.block_size = block_size
        self.use_graphs = use_graphs
        # Attention for <= 8 token rows: None = paged_decode_d*_u{U} with U picked per launch
        # (cuda_plan.decode_unroll_for), U = that kernel with a fixed U, 0 = the tiled
        # paged_attention_d*. Clear the graphs after a change.
        self.decode_unroll: int | None = None
        self.graph_buckets = tuple(sorted(graph_buckets))
        self._cuda = cuda
        cuda.init()
        dev = cuda.Device(device_index)
        self._ctx = dev.retain_primary_context()
        self._ensure_context()
        self.device_name = f"cuda:{device_index} ({dev.name()})"
        self.sm_count = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.kernels = load_kernels()
        self._prepare_functions()
        self.stream = cuda.Stream()
        # Prefill GEMMs: "ours" (gemm.cuh), "cublaslt" (nvmath-python's cuBLASLt bindings) or
        # "auto" (default: cuBLASLt where cuda_blaslt.auto_prefers says, if nvmath imports);
        # None reads $KUIPER_GEMM. Changing self.gemm later switches (the handle stays).
        self.gemm = gemm_choice(gemm)
        self._blaslt = open_blaslt(self.gemm, self.stream.handle)

        # Weights: one arena.
        entries, total = plan_arena(c, model.weights)
        self._arena = cuda.mem_alloc(total)
        base = int(self._arena)
        self.w: dict[str, int] = {}
        for e in entries:
            host = e.build()
            assert host.nbytes == e.nbytes, (e.name, host.nbytes, e.nbytes)
            cuda.memcpy_htod(base + e.offset, host)
            self.w[e.name] = base + e.offset
        if c.tie_word_embeddings:
            self.w["lm_head"] = self.w["embed"]
        self._inv_freq = cuda.to_device(rope_inv_freq(c).astype(np.float32))

        # Activations, logits and attention scratch.
        self.max_batch = max_batch
        self._qkv_dim = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self._q_dim = c.num_heads * c.head_dim
        self._logits = cuda.mem_alloc(max_batch * c.vocab_size * 4)
        self._argmax = cuda.mem_alloc(max_batch * 8)
        self._argmax_host = cuda.pagelocked_empty(max_batch, np.uint64)
        self._logits_host = cuda.pagelocked_empty((1, c.vocab_size), np.float32)
        self._part_o = cuda.mem_alloc(PARTIAL_TOKENS * c.num_heads * MAX_SPLITS * c.head_dim * 4)
        self._part_ml = cuda.mem_alloc(PARTIAL_TOKENS * c.num_heads * MAX_SPLITS * 2 * 4)
        self._counters = None
        self._graphs: dict[tuple[int, int], Any] = {}
        self._prof: list | None = None
        self.use_pdl = use_pdl
        self._pdl = None
        self._pdl_capture = False
        self._ws: _Workspace | None = None
        self._max_width = 1  # provisional; fixed after the pool is sized
        self._alloc_workspace(max_tokens)

        # KV pool: sized from the flag, or from the memory left.
        per_block = kv_block_bytes(c, block_size)
        if not num_blocks:
            if kv_memory_bytes:
                num_blocks = blocks_for_memory(kv_memory_bytes, c, block_size)
            else:
                free, _ = cuda.mem_get_info()
                num_blocks = blocks_for_memory(int(free * KV_FREE_FRACTION), c, block_size)
        if num_blocks < 1:
            raise ValueError(
                f"no room for a KV cache on {self.device_name}: one block needs {per_block} bytes"
            )
        self.num_blocks = int(num_blocks)
        self._kv = cuda.mem_alloc((self.num_blocks + 1) * per_block)
        self._layer_kv_bytes = (self.num_blocks + 1) * block_size * c.num_kv_heads * c.head_dim * 2
        self.scratch_block = self.num_blocks  # padded graph rows read/write only this block
        self.max_model_len = min(c.max_position_embeddings, self.num_blocks * block_size)
        self._max_width = ceil_div(self.max_model_len, block_size)
        self._alloc_workspace(max_tokens)  # input buffer sized for the real table width
        # Non-greedy rows: the device sampler, or the host one with KUIPER_HOST_SAMPLER=1 (or
        # device_sampling = False); built at the first such row.
        self.device_sampling = os.environ.get("KUIPER_HOST_SAMPLER", "") != "1"
        # lm_head rows computed (see base.Backend.sample_vocab); the rest of a logits row is -inf.
        self.sample_vocab = self._lm_rows = c.vocab_size
        self._sampler: DeviceSampler | None = None
        self._att_name = attention_kernel(c.head_dim)
        self._scale = float(1.0 / np.sqrt(c.head_dim))
        # The server builds the backend in a worker thread that ends at exit: leave its
        # context stack empty. Threads that step the backend push their own (_ensure_context).
        self._pop_thread_context()

    # ------------------------------------------------------------------ setup

    def _prepare_functions(self) -> None:
        self._f: dict[str, Any] = {}
        for name, sig in _SIGNATURES.items():
            self._f[name] = self.kernels.fn(name).prepare(sig)
        for t in range(1, GEMV_MAX_TOKENS + 1):
            for kind in ("gemv", "gemv_pair"):
                name = f"{kind}_t{t}"
                self._f[name] = self.kernels.fn(name).prepare(_GEMV_SIG)
            name = f"gemv_qkv_rope_t{t}"
            self._f[name] = self.kernels.fn(name).prepare(_GEMV_ROPE_SIG)
        attr = self._cuda.function_attribute
        self._regs = {
            name: (f.get_attribute(attr.NUM_REGS), f.get_attribute(attr.SHARED_SIZE_BYTES))
            for name, f in self._f.items()
            if name.startswith("gemv")
        }
        for tile in GEMM_TILES:
            self._f[tile.name] = self.kernels.fn(tile.name).prepare(_GEMM_SIG)
        self._gemm_locks = self._cuda.mem_alloc(4 * GEMM_LOCKS)  # split-K turnstiles, kept 0
        self._cuda.memset_d32(self._gemm_locks, 0, GEMM_LOCKS)
        d = self.config.head_dim
        for name in [attention_kernel(d)] + [decode_attention_kernel(d, u) for u in DEC_UNROLLS]:
            self._f[name] = self.kernels.fn(name).prepare(_ATT_SIG)
        self._pf_name = prefill_attention_kernel(d)  # None: no tensor-core prefill kernel
        for kg in (2, 4):
            name = prefill_attention_kernel(d, kg)
            if name is not None:
                self._f[name] = self.kernels.fn(name).prepare(_PF_SIG)
        self._sig = {name: f.arg_format for name, f in self._f.items()}

    def _alloc_workspace(self, tokens: int) -> None:
        cuda, c = self._cuda, self.config
        self._graphs_clear()
        self._ws = None  # free the old buffers first
        hid = c.hidden_size
        layout = InputLayout(tokens, tokens, self.max_batch, self._max_width, tokens)
        self._ws = _Workspace(
            tokens=tokens,
            resid=cuda.mem_alloc(tokens * hid * 4),
            xnorm=cuda.mem_alloc(tokens * hid * 2),
            qkv=cuda.mem_alloc(tokens * self._qkv_dim * 2),
            attn=cuda.mem_alloc(tokens * self._q_dim * 2),
            gate_up=cuda.mem_alloc(tokens * 2 * c.intermediate_size * 2),
            act=cuda.mem_alloc(tokens * c.intermediate_size * 2),
            inputs=cuda.mem_alloc(layout.total * 4),
            inputs_host=cuda.pagelocked_empty(layout.total, np.int32),
        )
        self._counters = cuda.mem_alloc(tokens * c.num_kv_heads * 4)
        cuda.memset_d32(self._counters, 0, tokens * c.num_kv_heads)

    def _graphs_clear(self) -> None:
        for g in getattr(self, "_graphs", {}).values():
            g.close()
        self._graphs = {}

    def _ensure_context(self) -> None:
        """Make the device's primary context current in the calling thread (the engine thread
        may differ from the one that built the backend); push it once per thread."""
        tid = threading.get_ident()
        if tid in _PUSHED:
            return
        self._ctx.push()
        _PUSHED[tid] = self._ctx
        if threading.current_thread() is threading.main_thread():
            atexit.register(_pop_main_thread_context)

    # ------------------------------------------------------------------ public API

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        if not batch:
            return []
        self._ensure_context()
        self._apply_sample_vocab()
        self._check(batch)
        rows = [i for i, it in enumerate(batch) if it.sampling is not None]
        is_decode = len(rows) == len(batch) and all(len(it.token_ids) == 1 for it in batch)
        bucket = bucket_for(len(batch), self.graph_buckets) if is_decode else None
        if self.use_graphs and bucket is not None and bucket <= self.max_batch:
            self._run_graph(batch, bucket)
        else:
            self._run_eager(batch, rows)
        params = [batch[i].sampling for i in rows]
        out: list[SampleOutput | None] = [None] * len(batch)
        if not rows:
            self.stream.synchronize()
            return out
        cuda = self._cuda
        dev_rows = [r for r, p in enumerate(params) if not fast_greedy(p)]
        sampler = self._device_sampler(params, dev_rows)
        if sampler is not None:  # one launch for every such row, behind the forward
            sampler.enqueue(int(self._logits), dev_rows, [params[r] for r in dev_rows],
                            [batch[rows[r]].history for r in dev_rows],
                            [batch[rows[r]].step for r in dev_rows], self.stream)  # fmt: skip
        keys = self._argmax_host[: len(rows)]
        cuda.memcpy_dtoh_async(keys, self._argmax, self.stream)
        self.stream.synchronize()
        ids = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
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
        if n == self._lm_rows:
            return
        if not 1 <= n <= v:
            raise ValueError(f"sample_vocab must be in 1..{v}, got {n}")
        self.stream.synchronize()
        self._graphs_clear()
        self._cuda.memset_d32(self._logits, 0xFF800000, self.max_batch * v)  # float -inf
        self._lm_rows = n

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
        self._ensure_context()
        self._apply_sample_vocab()
        self._check(batch)
        self._run_eager(batch, list(range(len(batch))))
        v = self.config.vocab_size
        host = np.empty((len(batch), v), np.float32)
        self.stream.synchronize()
        self._cuda.memcpy_dtoh(host, self._logits)
        return host

    def decode_logits_graph(self, batch: list[BatchItem]) -> np.ndarray:
        """Logits of a decode batch computed through the captured graph (tests compare it
        with the eager path)."""
        self._ensure_context()
        self._apply_sample_vocab()
        self._check(batch)
        bucket = bucket_for(len(batch), self.graph_buckets)
        if bucket is None or any(len(it.token_ids) != 1 for it in batch):
            raise ValueError("decode_logits_graph needs one token per item within the buckets")
        self._run_graph(batch, bucket)
        host = np.empty((len(batch), self.config.vocab_size), np.float32)
        self.stream.synchronize()
        self._cuda.memcpy_dtoh(host, self._logits)
        return host

    def close(self) -> None:
        """Drop the captured graphs now (device memory goes with the object). Called from a
        thread other than the main one (the engine thread), also pop the context this backend
        pushed there: PyCUDA complains about a non-empty context stack when a thread ends."""
        self.stream.synchronize()
        self._graphs_clear()
        self._pop_thread_context()

    def _pop_thread_context(self) -> None:
        """Pop the context this backend pushed in the calling thread, unless that is the main
        thread (popped at exit). PyCUDA aborts the process when any thread ends with a
        non-empty context stack."""
        tid = threading.get_ident()
        if threading.current_thread() is not threading.main_thread() and tid in _PUSHED:
            self._cuda.Context.synchronize()
            del _PUSHED[tid]
            self._cuda.Context.pop()

    # ------------------------------------------------------------------ inputs

    def _check(self, batch: list[BatchItem]) -> None:
        check_batch(
            batch,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            vocab_size=self.config.vocab_size,
            max_model_len=self.max_model_len,
        )
        n_rows = sum(it.sampling is not None for it in batch)
        if n_rows > self.max_batch or len(batch) > self.max_batch:
            raise ValueError(f"batch of {len(batch)} exceeds the CUDA backend's {self.max_batch}")

    def _prefill_tiles(self, batch: list[BatchItem], T: int) -> list[tuple[int, int, int, int]]:
        """Query tiles for prefill_attention_d* when this step runs it (a GEMM-path step with
        some item of more than one token, in a supported head dim), else none: decode-only
        steps keep paged_attention_d*, whose splits spread long contexts over the SMs."""
        if self._pf_name is None or T <= GEMV_MAX_TOKENS:
            return []
        if all(len(it.token_ids) == 1 for it in batch):
            return []
        lengths = [len(it.token_ids) for it in batch]
        group = self.config.num_heads // self.config.num_kv_heads
        return prefill_tiles(lengths, [it.start_pos for it in batch], group)

    def _fill_inputs(
        self,
        batch: list[BatchItem],
        rows: list[int],
        layout: InputLayout,
        pad_to: int,
        tiles: list[tuple[int, int, int, int]] | None = None,
    ) -> None:
        """Pack the step's int32 inputs into the pinned buffer and copy them to the device.
        Rows past len(batch) (graph padding) run token 0 at position 0 in the scratch block."""
        bs = self.block_size
        h = self._ws.inputs_host
        h[: layout.total] = 0
        T = layout.tokens
        ids = h[layout.ids : layout.ids + T]
        pos = h[layout.positions : layout.positions + T]
        slots = h[layout.slots : layout.slots + T]
        tok_seq = h[layout.tok_seq : layout.tok_seq + T]
        out_rows = h[layout.out_rows : layout.out_rows + layout.rows]
        bt = h[layout.block_tables : layout.block_tables + layout.seqs * layout.width]
        bt = bt.reshape(layout.seqs, layout.width)
        bt[:] = self.scratch_block
        t = 0
        last = []
        for s, item in enumerate(batch):
            n = len(item.token_ids)
            table = item.block_table
            w = min(len(table), layout.width)
            bt[s, :w] = table[:w]
            if n == 1:  # decode: scalar writes, no temporaries
                p = item.start_pos
                ids[t] = item.token_ids[0]
                pos[t] = p
                slots[t] = table[p // bs] * bs + p % bs
                tok_seq[t] = s
            else:
                p = np.arange(item.start_pos, item.start_pos + n)
                table = np.asarray(table, dtype=np.int32)
                ids[t : t + n] = item.token_ids
                pos[t : t + n] = p
                slots[t : t + n] = table[p // bs] * bs + p % bs
                tok_seq[t : t + n] = s
            t += n
            last.append(t - 1)
        for s in range(len(batch), pad_to):
            ids[t] = 0
            pos[t] = 0
            slots[t] = self.scratch_block * bs
            tok_seq[t] = s
            last.append(t)
            t += 1
        row_tokens = [last[i] for i in rows] + last[len(batch) :]
        out_rows[: len(row_tokens)] = row_tokens
        if tiles:
            h[layout.prefill_tiles : layout.total] = np.asarray(tiles, np.int32).ravel()
        self._cuda.memcpy_htod_async(self._ws.inputs, h[: layout.total], self.stream)

    # ------------------------------------------------------------------ execution

    def _run_eager(self, batch: list[BatchItem], rows: list[int]) -> None:
        T = sum(len(it.token_ids) for it in batch)
        if self._ws.tokens < T:
            self._alloc_workspace(max(T, 2 * self._ws.tokens))
        width = max(1, max(len(it.block_table) for it in batch))
        width = min(width, self._max_width)
        tiles = self._prefill_tiles(batch, T)
        layout = InputLayout(T, len(batch), len(rows), width, len(tiles))
        self._fill_inputs(batch, rows, layout, pad_to=len(batch), tiles=tiles)
        max_ctx = max(it.start_pos + len(it.token_ids) for it in batch)
        self._launch_forward(layout, max_ctx)

    def _run_graph(self, batch: list[BatchItem], bucket: int) -> None:
        need = max(ceil_div(it.start_pos + 1, self.block_size) for it in batch)
        width = width_bucket(need, self._max_width)
        if bucket > self._ws.tokens:
            self._alloc_workspace(bucket)
        layout = InputLayout(bucket, bucket, bucket, width)
        self._fill_inputs(batch, list(range(len(batch))), layout, pad_to=bucket)
        key = (bucket, width)
        graph = self._graphs.get(key)
        if graph is None:
            self.stream.synchronize()
            graph = self._capture(lambda: self._launch_forward(layout, width * self.block_size))
            self._graphs[key] = graph
        graph.launch(self.stream.handle)

    def _launch(self, label: str, name: str, grid, block, *args, shared: int = 0) -> None:
        """Enqueue one kernel on self.stream; under profile_step(), between two events."""
        if self._pdl_capture:
            self._pdl.launch(name, self._sig[name], grid, block, self.stream.handle, args, shared)
            return
        prof = self._prof
        if prof is not None:
            start, end = self._cuda.Event(), self._cuda.Event()
            start.record(self.stream)
        self._f[name].prepared_async_call(grid, block, self.stream, *args, shared_size=shared)
        if prof is not None:
            end.record(self.stream)
            prof.append((label, start, end))

    def _capture(self, record):
        """A graph of record()'s launches: with programmatic dependent launch when available
        (kernels overlap their prologue with the previous kernel's tail), else plain."""
        from inference_service.backends.cuda_graphs import capture

        if self.use_pdl:
            try:
                if self._pdl is None:
                    from cuda_kernels.loader import BIG_SMEM_PREFIXES, MAX_DYNAMIC_SMEM
                    from inference_service.backends.cuda_launch import PdlLauncher

                    self._pdl = PdlLauncher(self.kernels.built.cubins, BIG_SMEM_PREFIXES,
                                            MAX_DYNAMIC_SMEM)  # fmt: skip
                self._pdl_capture = True
                return capture(self.stream.handle, record)
            except Exception as e:  # noqa: BLE001 - any failure: fall back to plain graphs
                warnings.warn(f"CUDA graph capture with PDL failed ({e}); using plain graphs",
                              stacklevel=2)  # fmt: skip
                self.use_pdl = False
            finally:
                self._pdl_capture = False
        return capture(self.stream.handle, record)

    def _gemv(self, label, tokens, W, n, k, x, xmode, x_stride, x_rows, norm, y, ymode,
              y_stride, bias=0, argmax=0, pair=False, rope=None) -> None:  # fmt: skip
        args = (W, n, k, x, xmode, x_stride, x_rows, norm, self.config.rms_norm_eps,
                y, ymode, y_stride, bias, argmax)  # fmt: skip
        if rope is not None:
            name, args = f"gemv_qkv_rope_t{tokens}", args + rope
        else:
            name = f"{'gemv_pair' if pair else 'gemv'}_t{tokens}"
        regs, static_smem = self._regs[name]
        smem = gemv_smem(tokens, k)
        per_sm = resident_blocks(regs, GEMV_THREADS, smem + static_smem)
        self._launch(label, name, (gemv_grid(n, self.sm_count, per_sm), 1, 1), (GEMV_THREADS, 1, 1),
                     *args, shared=smem)  # fmt: skip

    def _gemm(self, label, a, lda, W, ldw, m, n, k, c, ldc, mode, bias=0) -> None:
        swiglu = mode == GEMM_SWIGLU  # n = output columns; W holds 2n rows (gate | up)
        lt = self._blaslt
        # cuBLASLt only in eager steps: captured decode graphs (9..64 rows) keep our kernels.
        if (lt is not None and use_blaslt(self.gemm, m, n, k, mode) and not self._pdl_capture
                and not stream_capturing(self.stream.handle)):  # fmt: skip
            prof = self._prof
            if prof is not None:
                start, end = self._cuda.Event(), self._cuda.Event()
                start.record(self.stream)
            # SwiGLU: the plain gate|up GEMM into the gate_up buffer, then the swiglu kernel.
            out, ldo = (int(self._ws.gate_up), 2 * n) if swiglu else (c, ldc)
            if lt.gemm(a, lda, W, ldw, m, 2 * n if swiglu else n, k, out, ldo,
                       0 if swiglu else mode, bias):  # fmt: skip
                if prof is not None:
                    end.record(self.stream)
                    prof.append((label, start, end))
                if swiglu:
                    assert ldc == n, "swiglu kernel: act rows of n"
                    self._launch("swiglu", "swiglu", (ceil_div(n // 8, 256), m, 1), (256, 1, 1),
                                 out, c, n)  # fmt: skip
                return
        tile, splits = gemm_plan(m, n, k, self.sm_count, mode)
        self._launch(label, tile.name, tile.grid(m, n, swiglu, splits), (tile.threads, 1, 1),
                     a, lda, W, ldw, m, n, k, c, ldc, mode, bias, int(self._gemm_locks),
                     shared=tile.smem)  # fmt: skip

    def _launch_forward(self, layout: InputLayout, max_ctx: int) -> None:
        """Enqueue one whole step on self.stream (also what a graph captures)."""
        c, ws = self.config, self._ws
        T, R = layout.tokens, layout.rows
        hid, inter, qkv, qd = c.hidden_size, c.intermediate_size, self._qkv_dim, self._q_dim
        eps = c.rms_norm_eps
        inp = int(ws.inputs)
        ids = inp + 4 * layout.ids
        pos = inp + 4 * layout.positions
        slots = inp + 4 * layout.slots
        tok_seq = inp + 4 * layout.tok_seq
        out_rows = inp + 4 * layout.out_rows
        bt = inp + 4 * layout.block_tables
        resid, xnorm, qkvb, attn = int(ws.resid), int(ws.xnorm), int(ws.qkv), int(ws.attn)
        act = int(ws.act)
        small = T <= GEMV_MAX_TOKENS
        max_splits = min(MAX_SPLITS, (PARTIAL_TOKENS * MAX_SPLITS) // T)
        if small and self.decode_unroll != 0:  # splits used per row's length, see decode_splits
            u = self.decode_unroll or decode_unroll_for(max_ctx, c.num_kv_heads, T)
            att_name, att_threads = decode_attention_kernel(c.head_dim, u), DEC_THREADS
            nsplit = decode_splits(max_ctx, c.head_dim, max_splits, u)
        else:
            att_name, att_threads = self._att_name, ATT_THREADS
            nsplit = attention_splits(T, c.num_kv_heads, max_ctx, self.sm_count, max_splits)
        if ws.tokens < T:
            raise AssertionError("workspace too small")

        self._launch("embedding", "embedding_gather", (T, 1, 1), (128, 1, 1), self.w["embed"],
                     ids, resid, hid, c.vocab_size, int(self._argmax), R)  # fmt: skip
        kv_base = int(self._kv)
        w = self.w
        for li in range(c.num_layers):
            kc = kv_base + (2 * li) * self._layer_kv_bytes
            vc = kc + self._layer_kv_bytes
            bias = w.get(f"L{li}.bqkv", 0)
            if small:  # q|k|v GEMV with fused RMSNorm, RoPE and the KV-cache write
                rope = (pos, slots, int(self._inv_freq), kc, vc, c.num_heads, c.num_kv_heads,
                        c.head_dim)  # fmt: skip
                self._gemv("qkv+norm+rope", T, w[f"L{li}.wqkv"], qkv // 2, hid, resid, 1, hid, 0,
                           w[f"L{li}.attn_norm"], qkvb, 0, qkv, bias, rope=rope)  # fmt: skip
            else:
                self._launch("rmsnorm", "add_rmsnorm", (T, 1, 1), (256, 1, 1), resid, 0, 0,
                             w[f"L{li}.attn_norm"], xnorm, hid, eps)  # fmt: skip
                self._gemm("gemm qkv", xnorm, hid, w[f"L{li}.wqkv"], hid, T, qkv, hid, qkvb, qkv,
                           0, bias)  # fmt: skip
                self._launch("rope+kv", "rope_kv_write", (T, 1, 1), (128, 1, 1), qkvb, qkv, pos,
                             slots, int(self._inv_freq), kc, vc, c.num_heads, c.num_kv_heads,
                             c.head_dim, 0)  # fmt: skip
            if layout.tiles:  # tensor-core prefill attention over the step's query tiles
                kg = prefill_kgroups(c.head_dim, layout.tiles * c.num_kv_heads, self.sm_count)
                self._launch("attention", prefill_attention_kernel(c.head_dim, kg),
                             (layout.tiles, c.num_kv_heads, 1), (prefill_threads(kg), 1, 1),
                             qkvb, qkv, kc, vc, bt, layout.width, attn, qd,
                             inp + 4 * layout.prefill_tiles, c.num_heads, c.num_kv_heads,
                             self.block_size, self._scale,
                             shared=prefill_smem(c.head_dim, kg))  # fmt: skip
            else:
                self._launch("attention", att_name, (T, c.num_kv_heads, nsplit),
                             (att_threads, 1, 1), qkvb, qkv, kc, vc, bt, layout.width, tok_seq,
                             pos, attn, qd, int(self._part_o), int(self._part_ml),
                             int(self._counters), c.num_heads, c.num_kv_heads, c.head_dim,
                             self.block_size, self._scale)  # fmt: skip
            if small:
                self._gemv("o_proj+resid", T, w[f"L{li}.wo"], hid, qd, attn, 0, qd, 0, 0, resid,
                           1, hid)  # fmt: skip
                self._gemv("gate_up+norm+swiglu", T, w[f"L{li}.wgu"], inter, hid, resid, 1, hid,
                           0, w[f"L{li}.mlp_norm"], act, 0, inter, pair=True)  # fmt: skip
                self._gemv("down+resid", T, w[f"L{li}.wd"], hid, inter, act, 0, inter, 0, 0,
                           resid, 1, hid)  # fmt: skip
            else:
                self._gemm("gemm o_proj", attn, qd, w[f"L{li}.wo"], qd, T, hid, qd, resid, hid, 1)
                self._launch("rmsnorm", "add_rmsnorm", (T, 1, 1), (256, 1, 1), resid, 0, 0,
                             w[f"L{li}.mlp_norm"], xnorm, hid, eps)  # fmt: skip
                # SwiGLU fused into the gate|up GEMM: act = silu(gate) * up, no gate_up buffer.
                self._gemm("gemm gate_up", xnorm, hid, w[f"L{li}.wgu"], hid, T, inter, hid,
                           act, inter, GEMM_SWIGLU)  # fmt: skip
                self._gemm("gemm down", act, inter, w[f"L{li}.wd"], inter, T, hid, inter, resid,
                           hid, 1)  # fmt: skip
        # Final norm + lm_head (+ fused argmax) over the rows to sample, 8 rows per launch.
        logits, argmax, v = int(self._logits), int(self._argmax), c.vocab_size
        for r0 in range(0, R, GEMV_MAX_TOKENS):
            n = min(GEMV_MAX_TOKENS, R - r0)
            self._gemv("lm_head+norm+argmax", n, w["lm_head"], self._lm_rows, hid, resid, 1, hid,
                       out_rows + 4 * r0, w["final_norm"], logits + 4 * r0 * v, 2, v, 0,
                       argmax + 8 * r0)  # fmt: skip

    # ------------------------------------------------------------------ measurement

    def profile_step(self, batch: list[BatchItem]) -> list[tuple[str, float]]:
        """Run one step eagerly with every kernel between two events, queued behind a spin
        kernel so the kernels run back to back; returns (label, microseconds) in launch order.
        Like logits(), it writes the batch's KV slots."""
        self._ensure_context()
        self._check(batch)
        rows = [i for i, it in enumerate(batch) if it.sampling is not None]
        T = sum(len(it.token_ids) for it in batch)
        width = min(max(len(it.block_table) for it in batch), self._max_width)
        tiles = self._prefill_tiles(batch, T)
        layout = InputLayout(T, len(batch), len(rows), width, len(tiles))
        self._fill_inputs(batch, rows, layout, pad_to=len(batch), tiles=tiles)
        self._f["spin_wait"].prepared_async_call((1, 1, 1), (1, 1, 1), self.stream, 50_000_000)
        self._prof = []
        try:
            self._launch_forward(layout, max(it.start_pos + len(it.token_ids) for it in batch))
            self.stream.synchronize()
            return [(label, 1e3 * end.time_since(start)) for label, start, end in self._prof]
        finally:
            self._prof = None

    def time_decode_graph(self, batch: list[BatchItem], reps: int = 50) -> float:
        """Microseconds per replay of the decode graph for this batch, replayed back to back
        (device time of a step without the host's per-step work)."""
        self._ensure_context()
        self._check(batch)
        bucket = bucket_for(len(batch), self.graph_buckets)
        self._run_graph(batch, bucket)
        graph = next(iter(g for k, g in self._graphs.items() if k[0] == bucket))
        start, end = self._cuda.Event(), self._cuda.Event()
        start.record(self.stream)
        for _ in range(reps):
            graph.launch(self.stream.handle)
        end.record(self.stream)
        end.synchronize()
        return 1e3 * end.time_since(start) / reps

    def _logits_row(self, r: int) -> np.ndarray:
        v = self.config.vocab_size
        self._cuda.memcpy_dtoh_async(
            self._logits_host[0], int(self._logits) + 4 * r * v, self.stream
        )
        self.stream.synchronize()
        return np.array(self._logits_host[0, : self._lm_rows])
