"""The interface every compute backend (numpy, cuda) offers the engine.

The engine owns scheduling and the KV block tables; a backend owns the weights,
the paged KV pool and the arithmetic. One call runs one engine step for a batch
of sequences, each contributing a chunk of new tokens (a prefill chunk or one
decode token), and returns, for every item that asked for it, the sampled token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inference_service.models.config import ModelConfig
from inference_service.sampling.params import SampleOutput, SamplingParams


@dataclass
class BatchItem:
    """One sequence's share of an engine step."""

    seq_id: int
    token_ids: np.ndarray  # int32 [n]: tokens to run now (prefill chunk, or 1 decode token)
    start_pos: int  # position of token_ids[0] = tokens of this sequence already in the KV cache
    block_table: list[int]  # KV block ids covering positions [0, start_pos + n)
    # None: mid-prefill chunk, nothing to sample. Otherwise sample the next token
    # after the last of token_ids with these parameters.
    sampling: SamplingParams | None = None
    # Prompt + generated ids so far (for repetition penalty); only read when sampling.
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    # Index of the token being sampled among this sequence's generated tokens;
    # with a seed, (seed, step) alone decides the random draw, so batching
    # never changes a seeded result.
    step: int = 0


class Backend(Protocol):
    """What the engine needs of a backend; `check_backend` verifies it at Engine construction."""

    config: ModelConfig
    device_name: str  # "cpu" or "cuda:0 (NVIDIA H100 ...)"
    # KV capacity: the pool holds num_blocks blocks of block_size tokens (a sequence's block
    # table names blocks 0..num_blocks - 1).
    block_size: int
    num_blocks: int
    # The most positions one sequence may reach: at most config.max_position_embeddings, less
    # where the backend's buffers bound it. Steps beyond it are refused (check_batch).
    max_model_len: int
    # Ids >= sample_vocab are never sampled (default config.vocab_size). The server lowers it
    # to the tokenizer's vocabulary when the embedding table is padded past it (e.g. Qwen2.5:
    # 151936 rows, 151665 tokens): such ids have no text. Read by the engine thread each step.
    sample_vocab: int

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        """Run one step; one entry per item, None where item.sampling is None."""
        ...

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        """Run one step and return float32 logits [len(batch), vocab] of each item's
        last token (tests and tools; the serving path uses step())."""
        ...

    def close(self) -> None:
        """Release what the calling thread holds (the engine thread calls it once, when it
        stops, before it ends: e.g. the CUDA context it pushed). Memory goes with the object."""
        ...


class AsyncStepBackend(Backend, Protocol):
    """Optional: a backend that runs a step in the background, so the engine can schedule the
    next step meanwhile (EngineConfig.overlap_steps). Steps run in submission order, each after
    the previous one has finished with the KV cache."""

    def step_async(self, batch: list[BatchItem]) -> Future[list[SampleOutput | None]]:
        """Start step(batch); the future holds its result (or its exception)."""
        ...


def can_step_async(backend: object) -> bool:
    return callable(getattr(backend, "step_async", None))


class StepWorker:
    """A thread that runs a backend's steps one after another (step_async for backends whose
    step computes on the host, e.g. numpy, whose matrix products release the GIL)."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def submit(
        self, step: Callable[[list[BatchItem]], list[SampleOutput | None]], batch: list[BatchItem]
    ) -> Future[list[SampleOutput | None]]:
        started = threading.Event()

        def run() -> list[SampleOutput | None]:
            started.set()
            return step(batch)

        future = self._pool.submit(run)
        # Hand the GIL to the worker until the step has begun: otherwise the caller's own host
        # work (scheduling the next step) runs first and the step only starts when it waits.
        started.wait()
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def check_backend(backend: object) -> None:
    """Raise TypeError naming every member of the Backend protocol that backend lacks."""
    attributes = list(Backend.__annotations__)
    methods = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    missing = [n for n in attributes if not hasattr(backend, n)]
    missing += [f"{n}()" for n in methods if not callable(getattr(backend, n, None))]
    if missing:
        raise TypeError(
            f"{type(backend).__name__} is not a complete backend: it lacks "
            f"{', '.join(missing)} (see inference_service/backends/base.py: Backend)"
        )


def check_batch(
    batch: list[BatchItem],
    *,
    block_size: int,
    num_blocks: int,
    vocab_size: int,
    max_model_len: int | None = None,
) -> None:
    """Refuse a batch a backend cannot run, naming the sequence: every backend checks the same
    things, so a bad batch fails alike on the CPU and the GPU (never wraps or reads garbage)."""
    for item in batch:
        n = len(item.token_ids)
        if n == 0:
            raise ValueError(f"sequence {item.seq_id}: no tokens to run")
        end = item.start_pos + n
        if len(item.block_table) * block_size < end:
            raise ValueError(
                f"sequence {item.seq_id}: block table of {len(item.block_table)} blocks "
                f"cannot hold {end} positions (block size {block_size})"
            )
        if max_model_len is not None and end > max_model_len:
            raise ValueError(
                f"sequence {item.seq_id}: {end} positions exceed the backend's "
                f"maximum of {max_model_len}"
            )
        used = item.block_table[: -(-end // block_size)]
        if min(used) < 0 or max(used) >= num_blocks:
            raise ValueError(f"sequence {item.seq_id}: block id out of range 0..{num_blocks - 1}")
        if n == 1:  # decode: plain ints are cheaper than numpy reductions
            tok = int(item.token_ids[0])
            bad_id = tok < 0 or tok >= vocab_size
        else:
            ids = np.asarray(item.token_ids)
            bad_id = ids.min() < 0 or ids.max() >= vocab_size
        if bad_id:
            raise ValueError(f"sequence {item.seq_id}: token id out of range 0..{vocab_size - 1}")


def check_batch_for(backend: Backend, batch: list[BatchItem]) -> None:
    """check_batch against backend's own limits: its KV pool, vocabulary and max_model_len."""
    check_batch(
        batch,
        block_size=backend.block_size,
        num_blocks=backend.num_blocks,
        vocab_size=backend.config.vocab_size,
        max_model_len=backend.max_model_len,
    )
