"""The engine thread: batching, queue bound, cancellation, failures, asyncio streams, and
greedy output equal to transformers' for a tiny random Llama through the numpy backend; each
with the synchronous loop and with overlapped steps (EngineConfig.overlap_steps)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_backend import FakeBackend, oracle_generate

from inference_service.config import EngineConfig
from inference_service.engine.admission import QueueFullError
from inference_service.engine.engine import (
    AsyncEngine,
    Engine,
    RequestOutput,
)
from inference_service.engine.sequence import FinishReason
from inference_service.sampling.params import SamplingParams

VOCAB = 64
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def make_engine(request):
    """Engines with the synchronous loop, then with overlapped steps (both backends used
    here have step_async): every test runs in both modes."""
    engines = []

    def make(backend, **cfg):
        eng = Engine(backend, EngineConfig(overlap_steps=request.param, **cfg))
        assert eng.overlap is request.param
        eng.start()
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.stop()


def test_concurrent_requests_match_the_oracle_and_free_all_blocks(make_engine):
    backend = FakeBackend(num_blocks=40, block_size=4, vocab_size=VOCAB)
    eng = make_engine(backend, max_batch_size=8, max_num_batched_tokens=24)
    prompts = [[(7 * i + j) % VOCAB for j in range(3 + i)] for i in range(16)]
    prompts[5] = prompts[4][:]  # identical prompts share prefix blocks
    outs = eng.generate(prompts, GREEDY, timeout=30)
    for p, o in zip(prompts, outs, strict=True):
        assert o == oracle_generate(p, 12, VOCAB)
    assert max(backend.batch_sizes) > 1  # really batched
    wait_for(lambda: eng.last_stats is not None and eng.last_stats.kv_blocks_used == 0)


def test_eos_and_stop_ids_and_ignore_eos(make_engine):
    prompt = [1, 2, 3]
    free_run = oracle_generate(prompt, 20, VOCAB)
    eos = free_run[4]
    backend = FakeBackend(num_blocks=16, block_size=4, vocab_size=VOCAB, eos=(eos,))
    eng = make_engine(backend)
    cut = free_run.index(eos) + 1
    assert (
        eng.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0))[0]
        == free_run[:cut]
    )
    ignoring = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    assert eng.generate([prompt], ignoring)[0] == free_run
    stop_tok = free_run[2]
    by_stop = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True,
                             stop_token_ids=(stop_tok,))  # fmt: skip
    assert eng.generate([prompt], by_stop)[0] == free_run[: free_run.index(stop_tok) + 1]


def test_context_length_ends_with_length(make_engine):
    backend = FakeBackend(num_blocks=16, block_size=4, vocab_size=VOCAB, context=10)
    eng = make_engine(backend)
    got = []
    eng.add_output_listener(lambda outs: got.extend(outs))
    out = eng.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(out) == 6  # 4 + 6 = the context of 10
    assert [o.finish_reason for o in got if o.finished] == [FinishReason.LENGTH]


def test_waiting_queue_bound(make_engine):
    backend = FakeBackend(num_blocks=64, block_size=4, vocab_size=VOCAB, step_delay_s=0.01)
    eng = make_engine(backend, max_batch_size=1, max_num_batched_tokens=16, max_waiting=1)
    long = SamplingParams(max_new_tokens=500, temperature=0, ignore_eos=True)
    a = eng.submit([1, 2], long)
    wait_for(lambda: eng.num_waiting_requests == 0)  # a is running
    b = eng.submit([3, 4], long)  # waits: the only batch slot is taken
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.submit([5, 6], long)
    eng.abort(a)
    eng.abort(b)
    wait_for(lambda: eng.last_stats is not None and eng.last_stats.kv_blocks_used == 0
             and eng.num_waiting_requests == 0)  # fmt: skip
    eng.submit([5, 6], SamplingParams(max_new_tokens=1))  # room again


def test_abort_stops_at_next_step_and_frees_blocks(make_engine):
    backend = FakeBackend(num_blocks=64, block_size=4, vocab_size=VOCAB, step_delay_s=0.005)
    eng = make_engine(backend)
    got: list[RequestOutput] = []
    eng.add_output_listener(lambda outs: got.extend(outs))
    rid = eng.submit(list(range(10)), SamplingParams(max_new_tokens=1000, ignore_eos=True))
    wait_for(lambda: sum(len(o.new_token_ids) for o in got) >= 5)
    assert eng.last_stats.kv_blocks_used > 0
    eng.abort(rid)
    wait_for(lambda: any(o.finished for o in got))
    final = [o for o in got if o.finished]
    assert len(final) == 1 and final[0].finish_reason is FinishReason.CANCELLED
    wait_for(lambda: eng.last_stats.kv_blocks_used == 0)
    n = sum(len(o.new_token_ids) for o in got)
    assert n < 1000


def test_backend_failure_fails_that_batch_only(make_engine):
    backend = FakeBackend(num_blocks=16, block_size=4, vocab_size=VOCAB)
    eng = make_engine(backend)
    backend.fail_next = True
    with pytest.raises(RuntimeError, match="injected failure"):
        eng.generate([[1, 2]], GREEDY, timeout=10)
    assert eng.generate([[1, 2]], GREEDY, timeout=10)[0] == oracle_generate([1, 2], 12, VOCAB)
    assert eng.last_stats.kv_blocks_used == 0


def test_a_request_the_backend_fails_on_fails_alone(make_engine):
    # The backend raises on every step that holds request 3: in both loops (the overlapped one
    # retries the failed step's items in halves, as the synchronous one does) request 3 ends
    # with an error and the others get exactly the oracle's tokens.
    class Poisoned(FakeBackend):
        def step(self, batch):
            if any(item.seq_id == 3 for item in batch):
                raise RuntimeError("poisoned")
            return super().step(batch)

    backend = Poisoned(num_blocks=40, block_size=4, vocab_size=VOCAB)
    eng = make_engine(backend, max_batch_size=8, max_num_batched_tokens=24)
    got: dict[int, list[int]] = {}
    ends: dict[int, RequestOutput] = {}

    def listen(outs):
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                ends[o.request_id] = o

    eng.add_output_listener(listen)
    prompts = [[i + 1, 2 * i + 1, 5] for i in range(6)]
    ids = [eng.submit(p, GREEDY) for p in prompts]
    wait_for(lambda: len(ends) == len(ids))
    for rid, p in zip(ids, prompts, strict=True):
        if rid == 3:
            assert ends[rid].finish_reason is FinishReason.ERROR and ends[rid].error
        else:
            assert ends[rid].error is None and got[rid] == oracle_generate(p, 12, VOCAB)
    wait_for(lambda: eng.last_stats is not None and eng.last_stats.kv_blocks_used == 0)


def test_async_engine_streams_per_request(make_engine):
    backend = FakeBackend(num_blocks=32, block_size=4, vocab_size=VOCAB)
    eng = make_engine(backend, max_batch_size=4)

    async def main():
        aeng = AsyncEngine(eng, asyncio.get_running_loop())

        async def one(prompt):
            ids, steps = [], 0
            async for out in aeng.add_request(prompt, GREEDY):
                ids += out.new_token_ids
                steps += 1
                last = out
            return ids, steps, last

        return await asyncio.gather(*(one([i, i + 1, i + 2]) for i in range(6)))

    for i, (ids, steps, last) in enumerate(asyncio.run(main())):
        assert ids == oracle_generate([i, i + 1, i + 2], 12, VOCAB)
        assert steps == 12  # one message per generated token: streamed, not batched up
        assert last.finish_reason is FinishReason.LENGTH and last.num_prompt_tokens == 3
        assert last.queue_time_s is not None and last.queue_time_s >= 0


def test_preempted_and_recomputed_requests_are_exact(make_engine):
    # 10 blocks x 4 tokens for 6 requests of up to 19 tokens: preemption must happen.
    backend = FakeBackend(num_blocks=10, block_size=4, vocab_size=VOCAB)
    eng = make_engine(backend, max_batch_size=6, max_num_batched_tokens=32)
    prompts = [[i + 1] * 7 for i in range(6)]
    outs = eng.generate(prompts, GREEDY, timeout=30)
    for p, o in zip(prompts, outs, strict=True):
        assert o == oracle_generate(p, 12, VOCAB)
    assert eng.scheduler.num_preemptions > 0
    assert eng.last_stats.kv_blocks_used == 0


def test_numpy_backend_batched_greedy_equals_transformers(tmp_path, make_engine):
    models_util = pytest.importorskip("models_util")
    pytest.importorskip("torch")
    from inference_service.backends import create_backend
    from inference_service.models import load_model

    folder, hf = models_util.build_llama2(tmp_path / "llama")
    backend = create_backend(load_model(folder), "cpu", num_blocks=64, block_size=4)
    # A small token budget forces chunked prefill beside running decodes.
    eng = make_engine(backend, max_batch_size=4, max_num_batched_tokens=8)
    prompts = [
        [1, 17, 45, 99, 3, 8, 21, 90, 200, 11],
        [1, 17, 45, 99, 3, 8, 21, 90, 7],
        [1, 5],
        [1, 250, 3],
    ]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    outs = eng.generate(prompts, params, timeout=120)
    for p, o in zip(prompts, outs, strict=True):
        assert o == models_util.hf_greedy(hf, p, 6)
    # The second prompt shares 8 tokens (2 full blocks) with the first: the same prompt
    # again finds them in the prefix cache.
    before = eng.block_manager.prefix_cache_hit_blocks
    again = eng.generate([prompts[0]], params, timeout=60)[0]
    assert again == outs[0]
    assert eng.block_manager.prefix_cache_hit_blocks - before == 2  # (10 - 1) // 4 blocks


def test_engine_refuses_an_incomplete_backend():
    class NoClose(FakeBackend):
        close = None  # type: ignore[assignment]

    backend = NoClose(num_blocks=4, block_size=4)
    del backend.max_model_len
    with pytest.raises(TypeError, match=r"NoClose .*lacks max_model_len, close\(\)"):
        Engine(backend)


def test_max_model_len_comes_from_the_backend_and_stop_closes_it(make_engine):
    backend = FakeBackend(num_blocks=64, block_size=4, vocab_size=VOCAB, context=4096)
    backend.max_model_len = 10  # e.g. a backend whose buffers hold fewer positions
    eng = make_engine(backend, max_model_len=100)
    assert eng.max_model_len == 10
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)
    prompt = [1, 2, 3, 4]
    assert eng.generate([prompt], params, timeout=30)[0] == oracle_generate(prompt, 6, VOCAB)
    eng.stop()
    assert backend.closed


def test_overlapped_steps_schedule_while_the_backend_runs():
    backend = FakeBackend(num_blocks=64, block_size=4, vocab_size=VOCAB, step_delay_s=0.003)
    eng = Engine(backend, EngineConfig(overlap_steps=True, max_batch_size=8))
    during: list[bool] = []
    schedule = eng.scheduler.schedule

    def spy():
        during.append(backend.in_step)
        return schedule()

    eng.scheduler.schedule = spy
    eng.start()
    try:
        prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
        outs = eng.generate(prompts, GREEDY, timeout=30)
    finally:
        eng.stop()
    assert outs == [oracle_generate(p, 12, VOCAB) for p in prompts]
    assert sum(during) >= 10  # most steps were scheduled while the one before still ran
    assert backend.closed and eng.last_stats.kv_blocks_used == 0


def test_overlap_needs_step_async():
    class NoAsync(FakeBackend):
        step_async = None  # type: ignore[assignment]

    eng = Engine(NoAsync(num_blocks=8, block_size=4), EngineConfig(overlap_steps=True))
    assert eng.overlap is False  # falls back to the synchronous loop
