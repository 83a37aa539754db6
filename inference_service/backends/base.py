"""The interface every compute backend (numpy, cuda) offers the engine.

The engine owns scheduling and the KV block tables; a backend owns the weights,
the paged KV pool and the arithmetic. One call runs one engine step for a batch
of sequences, each contributing a chunk of new tokens (a prefill chunk or one
decode token), and returns, for every item that asked for it, the sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inference_service.engine.sampling_params import SampleOutput, SamplingParams
from inference_service.models.config import ModelConfig


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
    config: ModelConfig
    block_size: int  # tokens per KV block
    num_blocks: int  # blocks in the KV pool
    device_name: str  # "cpu" or "cuda:0 (NVIDIA H100 ...)"

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        """Run one step; one entry per item, None where item.sampling is None."""
        ...

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        """Run one step and return float32 logits [len(batch), vocab] of each item's
        last token (tests and tools; the serving path uses step())."""
        ...
