"""One request's state inside the engine: its tokens, KV blocks and timing."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from inference_service.sampling.params import SampleOutput, SamplingParams

# The id of a token being sampled by a step still running (overlapped steps: the scheduler
# plans the next step before the result is in; Scheduler.resolve puts the real id in).
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context length
    STOP = "stop"  # a stop token id (or, in the server, a stop string)
    EOS = "eos"  # the model's end-of-sequence token
    CANCELLED = "cancelled"  # client cancel, disconnect, deadline, or shutdown
    ERROR = "error"  # the backend failed on this sequence's tokens (alone, not its batch)


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens of one request.

    The KV cache holds the first `num_computed_tokens` tokens; every step computes the next
    chunk of `token_ids[num_computed_tokens:]`. A decode step is just a chunk of one token,
    so prefill, chunked prefill, decode and recompute after preemption are one mechanism.
    """

    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_total_tokens: int  # context limit: prompt + generated never exceed it
    stop_ids: frozenset[int] = frozenset()  # EOS ids of the model (ignored with ignore_eos)
    arrival_time: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleOutput] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of this sequence's full blocks registered for prefix sharing so far.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache (first admission)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    cancel_requested: bool = False
    # token_ids as int32, grown as tokens come (ids_array): a step copies only the new ones.
    _ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), repr=False)
    _ids_len: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def ids_array(self) -> np.ndarray:
        """Prompt + generated ids as int32 [num_tokens]: a view of a buffer that later tokens
        extend in place (the ids it shows never change), grown by doubling."""
        n = self.num_tokens
        if n > len(self._ids):
            grown = np.zeros(max(n, 2 * len(self._ids), 64), np.int32)
            grown[: self._ids_len] = self._ids[: self._ids_len]
            self._ids = grown
        if self._ids_len < n:
            self._ids[self._ids_len : n] = self.tokens_slice(self._ids_len, n)
            self._ids_len = n
        return self._ids[:n]

    def set_last_output(self, token_id: int) -> None:
        """Replace the last generated id (a PLACEHOLDER), in ids_array's buffer too."""
        self.output_ids[-1] = token_id
        if self.num_tokens <= self._ids_len:
            self._ids[self.num_tokens - 1] = token_id

    def tokens_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    def check_finished(self, token_id: int) -> FinishReason | None:
        """Why generation ends after appending token_id, or None to go on."""
        params = self.sampling
        if not params.ignore_eos and token_id in self.stop_ids:
            return FinishReason.EOS
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if (
            len(self.output_ids) >= params.max_new_tokens
            or self.num_tokens >= self.max_total_tokens
        ):
            return FinishReason.LENGTH
        return None
