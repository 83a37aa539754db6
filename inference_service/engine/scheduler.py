"""Continuous batching: which sequences run in the next engine step, and how many tokens each.

Every step:
1. Drop cancelled sequences (their blocks go back to the pool at once).
2. Running sequences first, decodes before prefill chunks: each gets its next chunk (one
   token when decoding, up to the remaining token budget when still prefilling). When the KV
   pool runs dry, the newest running sequence is preempted: its blocks are freed and it goes
   back to the front of the waiting queue, to be recomputed later (cheaply, when its blocks
   are still cached).
3. If nothing was preempted, waiting sequences are admitted in arrival order while batch
   slots, free blocks and the token budget allow; a long prompt is split into chunks so the
   running streams keep decoding beside it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from inference_service.config import EngineConfig
from inference_service.engine.block_manager import BlockManager, PrefixMatch
from inference_service.engine.sequence import (
    PLACEHOLDER,
    FinishReason,
    Sequence,
    SequenceStatus,
)
from inference_service.sampling.params import SampleOutput


@dataclass
class ScheduledChunk:
    seq: Sequence
    start_pos: int  # = seq.num_computed_tokens when scheduled
    num_tokens: int
    # The chunk reaches the sequence's last token, so the step samples a new one (decided when
    # scheduled: with overlapped steps the sequence grows before the step's results are in).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start_pos + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences that ended while scheduling (cancelled, or too long for the whole KV pool).
    finished: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        """Reads config.max_batch_size and config.max_num_batched_tokens."""
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0  # cumulative
        # Keep a few blocks spare when admitting beside running sequences, so that their
        # decodes do not immediately preempt what was just admitted.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    # ---- queue ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Ask to stop seq; it is dropped and its blocks freed by the next schedule()."""
        seq.cancel_requested = True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _drop_cancelled(self, out: SchedulerOutput) -> None:
        for queue in (self.waiting, self.running):
            if any(s.cancel_requested for s in queue):
                kept = [s for s in queue if not s.cancel_requested]
                for s in queue:
                    if s.cancel_requested:
                        self._finish(s, FinishReason.CANCELLED)
                        out.finished.append(s)
                queue.clear()
                queue.extend(kept)

    def _fit_tokens(self, seq: Sequence, want: int, free_blocks: int) -> int:
        """How many of `want` next tokens of seq fit in its blocks plus free_blocks more."""
        room = (len(seq.block_table) + free_blocks) * self.bm.block_size - seq.num_computed_tokens
        return max(0, min(want, room))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._drop_cancelled(out)
        budget = self.config.max_num_batched_tokens

        # Running sequences: decodes first (one token each, so a long prefill never starves
        # them), then prefill chunks, oldest first. When blocks run out, preempt the newest
        # sequence not yet scheduled in this step (possibly the one asking).
        order = [s for s in self.running if s.num_uncomputed_tokens == 1]
        order += [s for s in self.running if s.num_uncomputed_tokens > 1]
        scheduled: set[int] = set()
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            want = min(seq.num_uncomputed_tokens, budget)
            n = self._fit_tokens(seq, want, self.bm.num_free_blocks)
            while n == 0:
                victim = next(
                    (
                        v
                        for v in reversed(self.running)
                        if v is not seq and v.seq_id not in scheduled
                    ),
                    None,
                )
                if victim is None:
                    break
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                n = self._fit_tokens(seq, want, self.bm.num_free_blocks)
            if n == 0:
                self.running.remove(seq)
                if not self.running:
                    # Alone with the whole pool and still no room: it can never go on.
                    self._finish(seq, FinishReason.LENGTH)
                    out.finished.append(seq)
                else:
                    self._preempt(seq)
                    out.preempted.append(seq)
                continue
            ok = self.bm.grow(seq, seq.num_computed_tokens + n)
            assert ok
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            scheduled.add(seq.seq_id)
            budget -= n

        if out.preempted:
            return out  # the pool is under pressure: admit nobody this step

        # Waiting sequences, in order, while slots, blocks and budget allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            match = self.bm.match_prefix(seq) if not seq.block_table else PrefixMatch([], [])
            cached = match.num_blocks * self.bm.block_size
            reserve = self.watermark_blocks if self.running else 0
            free_after_prefix = self.bm.num_free_blocks - self.bm.prefix_cost(match) - reserve
            if free_after_prefix < 0:
                break
            want = min(seq.num_tokens - cached, budget)
            # Blocks the match brings are already computed; room counts from `cached`.
            room = (match.num_blocks + free_after_prefix) * self.bm.block_size - cached
            n = min(want, room)
            if n <= 0:
                break
            self.waiting.popleft()
            first_admission = seq.num_preemptions == 0
            self.bm.admit(seq, match)
            if first_admission:
                seq.num_cached_prompt_tokens = min(cached, seq.num_prompt_tokens)
            ok = self.bm.grow(seq, cached + n)
            assert ok
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, cached, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, samples: list[SampleOutput | None]) -> list[Sequence]:
        """Record a step's results; return the sequences that finished because of them."""
        finished: list[Sequence] = []
        now = time.monotonic()
        for chunk, sample in zip(out.chunks, samples, strict=True):
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start_pos + chunk.num_tokens
            self.bm.register_computed_blocks(seq)
            if not chunk.samples:
                continue
            assert sample is not None, f"backend returned no sample for sequence {seq.seq_id}"
            seq.output_ids.append(int(sample.token_id))
            if seq.sampling.logprobs is not None:
                seq.logprobs.append(sample)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = seq.check_finished(int(sample.token_id))
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished

    # ---- overlapped steps (Engine with overlap_steps) ---------------------------------------
    def advance(self, out: SchedulerOutput) -> None:
        """Take the step `out` as computed while it still runs, so that the next step can be
        scheduled meanwhile: its chunks' tokens count as in the KV cache (the backend runs steps
        in order, so they are before the next one reads them), and each sampling sequence gets
        a placeholder for the token being sampled, which resolve() replaces."""
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start_pos + chunk.num_tokens
            self.bm.register_computed_blocks(seq)
            if chunk.samples:
                seq.output_ids.append(PLACEHOLDER)

    def resolve(self, out: SchedulerOutput, samples: list[SampleOutput | None]) -> list[Sequence]:
        """Put the sampled tokens of an advanced step in place of its placeholders; sequences
        that ended while it ran (cancelled, or failed by the backend: fail()) get none. Return
        the sequences that got a token; those that finished because of it are finished here,
        as update() does."""
        got: list[Sequence] = []
        finished = ended = False
        now = time.monotonic()
        for chunk, sample in zip(out.chunks, samples, strict=True):
            seq = chunk.seq
            if not chunk.samples:
                continue
            if seq.is_finished:  # cancelled or failed while the step ran: no token
                assert seq.output_ids[-1] == PLACEHOLDER
                seq.output_ids.pop()
                ended = True
                continue
            assert sample is not None, f"backend returned no sample for sequence {seq.seq_id}"
            token = int(sample.token_id)
            seq.set_last_output(token)
            got.append(seq)
            if seq.sampling.logprobs is not None:
                seq.logprobs.append(sample)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = seq.check_finished(token)
            if reason is not None:
                if seq.status is SequenceStatus.WAITING:  # preempted while the step ran
                    self.waiting.remove(seq)
                self._finish(seq, reason)
                finished = True
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        if ended:  # failed ones may have been preempted meanwhile: out of the queue too
            self.waiting = deque(s for s in self.waiting if not s.is_finished)
        return got

    def fail(self, seqs: list[Sequence]) -> list[Sequence]:
        """The backend raised on these sequences' chunks: end them with ERROR (their blocks
        go back to the pool); return those that were not finished already."""
        failed = []
        for seq in seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ERROR)
                failed.append(seq)
        self.running = [s for s in self.running if not s.is_finished]
        return failed

    def abort_all(self) -> list[Sequence]:
        """End every sequence (shutdown)."""
        seqs = list(self.waiting) + self.running
        for s in seqs:
            self._finish(s, FinishReason.CANCELLED)
        self.waiting.clear()
        self.running.clear()
        return seqs
