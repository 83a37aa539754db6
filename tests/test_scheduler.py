"""Scheduler: continuous batching, chunked prefill, preemption, cancellation, no leaks.

Every step runs through FakeBackend, whose output depends on the tokens it reads back through
the block tables, so every finished sequence is also checked against `oracle_generate`, which
knows nothing about paging, batching, preemption or prefix sharing.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from fake_backend import FakeBackend, oracle_generate
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from inference_service.config import EngineConfig
from inference_service.engine.block_manager import BlockManager
from inference_service.engine.scheduler import Scheduler
from inference_service.engine.sequence import FinishReason, Sequence, SequenceStatus
from inference_service.sampling.params import SamplingParams

VOCAB = 40
EOS = 3


def run_step(sched: Scheduler, backend: FakeBackend):
    import numpy as np

    from inference_service.backends.base import BatchItem

    out = sched.schedule()
    batch = [
        BatchItem(
            seq_id=c.seq.seq_id,
            token_ids=np.asarray(c.seq.tokens_slice(c.start_pos, c.start_pos + c.num_tokens)),
            start_pos=c.start_pos,
            block_table=c.seq.block_table,
            sampling=c.seq.sampling if c.samples else None,
            step=len(c.seq.output_ids),
        )
        for c in out.chunks
    ]
    samples = backend.step(batch) if batch else []
    finished = sched.update(out, samples)
    return out, finished


def make_seq(seq_id, prompt, max_new, eos=(EOS,), max_total=10_000):
    return Sequence(
        seq_id,
        list(prompt),
        SamplingParams(max_new_tokens=max_new, temperature=0.0),
        max_total_tokens=max_total,
        stop_ids=frozenset(eos),
    )


def make_stack(num_blocks, max_batch, max_tokens, bs=4, prefix_caching=True):
    """FakeBackend and BlockManager over the same pool of `num_blocks`, and a Scheduler."""
    backend = FakeBackend(num_blocks=num_blocks, block_size=bs, vocab_size=VOCAB)
    bm = BlockManager(num_blocks, bs, enable_prefix_caching=prefix_caching)
    config = EngineConfig(max_batch_size=max_batch, max_num_batched_tokens=max_tokens)
    return backend, bm, Scheduler(config, bm)


def test_long_prompt_is_chunked_and_decodes_keep_running():
    backend, _, sched = make_stack(64, max_batch=4, max_tokens=8)
    short = make_seq(1, [5, 6], max_new=30, eos=())
    sched.add(short)
    run_step(sched, backend)  # prefill the short one
    assert len(short.output_ids) == 1
    long = make_seq(2, list(range(10, 10 + 40)), max_new=2, eos=())
    sched.add(long)
    chunk_sizes = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        before = len(short.output_ids)
        out, _ = run_step(sched, backend)
        sizes = {c.seq.seq_id: c.num_tokens for c in out.chunks}
        assert sizes[1] == 1  # the running stream decodes every step
        chunk_sizes.append(sizes[2])
        assert len(short.output_ids) == before + 1
    assert max(chunk_sizes) == 7  # budget 8 minus the decode
    assert sum(chunk_sizes) == 40
    while sched.has_unfinished():
        run_step(sched, backend)
    assert long.output_ids == oracle_generate(long.prompt_ids, 2, VOCAB)
    assert short.output_ids == oracle_generate(short.prompt_ids, 30, VOCAB)


def test_preemption_takes_the_newest_and_recomputes_exactly():
    backend, bm, sched = make_stack(6, max_batch=4, max_tokens=64, prefix_caching=False)
    seqs = [make_seq(i, [i + 10] * 6, max_new=10, eos=()) for i in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = []
    while sched.has_unfinished():
        out, _ = run_step(sched, backend)
        preempted += [p.seq_id for p in out.preempted]
        assert bm.num_used_blocks <= 6
    assert preempted, "6 blocks cannot hold three 16-token sequences: something must be preempted"
    assert preempted[0] == 2  # the newest goes first
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert s.output_ids == oracle_generate(s.prompt_ids, 10, VOCAB)
    assert bm.num_used_blocks == 0


def test_sequence_too_long_for_the_whole_pool_ends_with_length():
    backend, bm, sched = make_stack(2, max_batch=2, max_tokens=16)
    s = make_seq(1, [1, 2, 4], max_new=20, eos=())
    sched.add(s)
    for _ in range(50):
        if not sched.has_unfinished():
            break
        run_step(sched, backend)
    assert s.finish_reason is FinishReason.LENGTH
    # 8 tokens fill both blocks; the 9th is sampled from them, then there is nowhere to go
    assert s.num_tokens == 9
    assert bm.num_used_blocks == 0


def test_cancel_frees_blocks_at_next_step():
    backend, bm, sched = make_stack(16, max_batch=4, max_tokens=32)
    s = make_seq(1, list(range(10)), max_new=100, eos=())
    sched.add(s)
    run_step(sched, backend)
    assert bm.num_used_blocks == 3
    sched.cancel(s)
    out, _ = run_step(sched, backend)
    assert out.finished == [s] and s.finish_reason is FinishReason.CANCELLED
    assert bm.num_used_blocks == 0 and not sched.has_unfinished()


def test_batch_size_limit():
    backend, _, sched = make_stack(64, max_batch=2, max_tokens=64)
    for i in range(5):
        sched.add(make_seq(i, [i + 1, 7], max_new=3, eos=()))
    while sched.has_unfinished():
        run_step(sched, backend)
        assert len(sched.running) <= 2
    assert max(backend.batch_sizes) == 2


class SchedulerMachine(RuleBasedStateMachine):
    """Random admit / grow (steps) / preempt (tiny pool) / finish / cancel sequences."""

    def __init__(self):
        super().__init__()
        self.bs = 4
        self.num_blocks = 12
        self.backend, self.bm, self.sched = make_stack(
            self.num_blocks, max_batch=3, max_tokens=10, bs=self.bs
        )
        self.live: dict[int, Sequence] = {}
        self.cancelled: set[int] = set()
        self.next_id = 0

    @rule(
        base=st.sampled_from([[1, 2, 4, 5, 6, 7, 8, 9], [1, 2, 4, 5, 11, 12], [20, 21, 22]]),
        extra=st.lists(st.integers(4, VOCAB - 1), max_size=10),
        max_new=st.integers(1, 12),
    )
    def admit(self, base, extra, max_new):
        # Shared bases make prefix sharing happen; EOS (3) ends some sequences early.
        seq = make_seq(self.next_id, base + extra, max_new, max_total=40)
        self.next_id += 1
        self.live[seq.seq_id] = seq
        self.sched.add(seq)

    @rule(n=st.integers(1, 4))
    def steps(self, n):
        for _ in range(n):
            self.sched.schedule  # noqa: B018
            _, _ = run_step(self.sched, self.backend)
        self._collect()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.live)))
        self.sched.cancel(self.live[seq_id])
        self.cancelled.add(seq_id)

    def _collect(self):
        for seq_id, seq in list(self.live.items()):
            if seq.is_finished:
                del self.live[seq_id]
                if seq.finish_reason is FinishReason.CANCELLED:
                    assert seq_id in self.cancelled
                    continue
                expect = oracle_generate(
                    seq.prompt_ids, seq.sampling.max_new_tokens, VOCAB, (EOS,), max_len=40
                )
                if seq.finish_reason is FinishReason.LENGTH and len(seq.output_ids) < len(expect):
                    # only legal when the sequence alone overflowed the pool
                    assert seq.num_tokens >= self.num_blocks * self.bs
                    expect = expect[: len(seq.output_ids)]
                assert seq.output_ids == expect

    @invariant()
    def refcounts_match_block_tables(self):
        held = Counter()
        for seq in self.live.values():
            if seq.status is not SequenceStatus.RUNNING:
                assert seq.block_table == [], "only running sequences hold blocks"
            held.update(seq.block_table)
        for block in range(self.num_blocks):
            assert self.bm.ref_counts[block] == held[block]
        assert self.bm.num_used_blocks == len(held)
        assert self.bm.num_free_blocks + len(held) == self.num_blocks

    def teardown(self):
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            run_step(self.sched, self.backend)
        self._collect()
        assert not self.live
        assert self.bm.num_used_blocks == 0, "blocks leaked"
        assert all(r == 0 for r in self.bm.ref_counts)


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase


def test_decodes_go_before_an_older_sequence_still_prefilling():
    backend, _, sched = make_stack(64, max_batch=4, max_tokens=8)
    long = make_seq(1, list(range(10, 50)), max_new=2, eos=())
    short = make_seq(2, [5, 6], max_new=30, eos=())
    # The long prompt was preempted and comes back first (front of the queue, older), with
    # the short one decoding: the short one must still decode every step.
    sched.add(short)
    run_step(sched, backend)
    sched.running.insert(0, long)  # as if admitted earlier and mid-prefill
    long.status = SequenceStatus.RUNNING
    assert sched.bm.grow(long, 0)
    while long.num_computed_tokens < long.num_prompt_tokens:
        before = len(short.output_ids)
        out, _ = run_step(sched, backend)
        assert {c.seq.seq_id: c.num_tokens for c in out.chunks}[2] == 1
        assert len(short.output_ids) == before + 1
    while sched.has_unfinished():
        run_step(sched, backend)
    assert long.output_ids == oracle_generate(long.prompt_ids, 2, VOCAB)
    assert short.output_ids == oracle_generate(short.prompt_ids, 30, VOCAB)
