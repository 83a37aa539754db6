"""The CPU reference backend: the reference forward (models/forward.py) over a paged KV pool.

Weights are held in the fused layout (models/layout.py). Float weights as float32, because
numpy's float16 matmul has no BLAS path and runs ~50x slower than float32 sgemm. Quantized
weights (int8 exports, GGUF Q8_0/Q4_0/Q4_1 loaded with keep_quantized=True) stay quantized,
wrapped so that the reference forward's `x @ w.T` and `embed[ids]` run the compiled kernels of
backends/cpu_kernels.py: decode reads every weight once per step, so 4-8 bits per weight
instead of 32 is most of a step's time. All arithmetic is float32, as transformers' fp32 run.

One step runs every item's tokens through each weight in a single matmul (the tokens of all
sequences are concatenated); only attention loops over items, each reading its own blocks.
"""

from __future__ import annotations

import os
from concurrent.futures import Future

import numpy as np

from inference_service.backends.base import BatchItem, StepWorker, check_batch_for
from inference_service.backends.cpu_kernels import QuantMatrix, set_threads, warm_up
from inference_service.models.attention import SeqSpan
from inference_service.models.config import ModelConfig
from inference_service.models.forward import KVCache, StepInputs, forward
from inference_service.models.layout import fused_weights
from inference_service.models.loader import LoadedModel
from inference_service.models.quantized import concat_rows, is_quantized
from inference_service.models.rope import rope_inv_freq
from inference_service.sampling.params import SampleOutput
from inference_service.sampling.sampler import sample
from kuiper_serve.common.defaults import CPU_THREADS_ENV

KV_DTYPE = np.float32
THREADS_ENV = CPU_THREADS_ENV


def set_blas_threads(n: int) -> bool:
    """Set the thread count of the OpenBLAS numpy uses (best effort; False if not found).

    OpenBLAS threads spin while they wait: on a machine whose cores are busy with other
    work (a server's gRPC threads, other processes) fewer BLAS threads can be much faster."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libs = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return False
    for lib_path in libs:
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def kv_bytes_per_block(config: ModelConfig, block_size: int) -> int:
    """Bytes one KV block takes across all layers (K and V), as this backend stores it."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * np.dtype(KV_DTYPE).itemsize


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.dequantize() if is_quantized(a) else a, dtype=np.float32)


def _quantized_or_none(t, weights) -> QuantMatrix | None:
    """A fused matrix whose sources are all quantized (of one kind) stays quantized; None
    lets the layout build it in float32."""
    parts = [weights[s] for s in t.sources]
    if not t.is_matrix or not all(is_quantized(p) for p in parts):
        return None
    fused = concat_rows(parts)
    return QuantMatrix(fused) if is_quantized(fused) else None


class NumpyBackend:
    """See base.Backend."""

    device_name = "cpu"

    def __init__(self, model: LoadedModel, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        threads = os.environ.get(THREADS_ENV)
        if threads:
            set_blas_threads(int(threads))
            set_threads(int(threads))
        c = model.config
        self.config = c
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = c.max_position_embeddings
        self.sample_vocab = c.vocab_size  # see base.Backend
        self.weights = fused_weights(c, model.weights, _f32, build=_quantized_or_none)
        if any(is_quantized(w) for w in model.weights.values()):
            warm_up()  # compile the kernels now, not during the first request
        self.inv_freq = rope_inv_freq(c)
        self.kv = KVCache.allocate(c, num_blocks, block_size, KV_DTYPE)
        self._worker: StepWorker | None = None  # step_async's thread, made on first use

    # ------------------------------------------------------------------ public API

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        rows = [i for i, item in enumerate(batch) if item.sampling is not None]
        if not batch:
            return []
        logits = self._forward(batch, rows)
        n = self.sample_vocab
        out: list[SampleOutput | None] = [None] * len(batch)
        for r, i in enumerate(rows):
            item = batch[i]
            out[i] = sample(logits[r, :n], item.sampling, item.history, item.step)
        return out

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        logits = self._forward(batch, list(range(len(batch))))
        logits[:, self.sample_vocab :] = -np.inf  # never sampled (as the CUDA backend's)
        return logits

    def step_async(self, batch: list[BatchItem]) -> Future[list[SampleOutput | None]]:
        """step() in this backend's worker thread (see base.AsyncStepBackend): numpy's matrix
        products release the GIL, so the engine thread schedules the next step meanwhile."""
        if self._worker is None:
            self._worker = StepWorker("kuiper-numpy-step")
        return self._worker.submit(self.step, batch)

    def close(self) -> None:
        """End the step worker, if any (host memory goes with the object)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # ------------------------------------------------------------------ batching

    def _forward(self, batch: list[BatchItem], rows: list[int]) -> np.ndarray:
        """Run the batch; return float32 logits [len(rows), vocab] of the last token of each
        item listed in rows."""
        check_batch_for(self, batch)
        step = self._inputs(batch)
        ends = np.array([s.row + s.n for s in step.seqs], dtype=np.int64)
        last = ends[rows] - 1 if rows else np.zeros(0, dtype=np.int64)
        return forward(self.config, self.weights, self.kv, self.inv_freq, step, last)

    def _inputs(self, batch: list[BatchItem]) -> StepInputs:
        """The step's tokens concatenated, their positions and KV slots."""
        bs = self.block_size
        positions = [np.arange(it.start_pos, it.start_pos + len(it.token_ids)) for it in batch]
        # Flat KV slot of every new token: block_table[pos // bs] * bs + pos % bs.
        slots = [
            np.asarray(it.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs
            for it, pos in zip(batch, positions, strict=True)
        ]
        seqs, row = [], 0
        for it in batch:
            seqs.append(SeqSpan(row, len(it.token_ids), it.start_pos, it.block_table))
            row += len(it.token_ids)
        return StepInputs(
            token_ids=np.concatenate([np.asarray(it.token_ids, dtype=np.int64) for it in batch]),
            positions=np.concatenate(positions),
            slots=np.concatenate(slots),
            seqs=seqs,
        )
