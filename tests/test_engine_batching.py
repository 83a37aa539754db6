"""Issue 12: batched outputs equal one-by-one outputs on the CPU backend (a tiny random Llama
through the numpy backend), for mixed prompt lengths with shared and unshared prefixes, with
chunked prefill beside decodes, and under preemption with a tiny KV pool; greedy and seeded
sampling (a seeded draw depends on (seed, step) alone, so batching must not change it); and
overlapped steps (EngineConfig.overlap_steps) give the synchronous loop's tokens."""

from __future__ import annotations

import threading

import pytest

from inference_service.config import EngineConfig
from inference_service.engine.engine import Engine
from inference_service.sampling.params import SamplingParams

models_util = pytest.importorskip("models_util")
pytest.importorskip("torch")

BLOCK = 4
NEW = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from inference_service.models import load_model

    folder, _ = models_util.build_llama2(tmp_path_factory.mktemp("llama"))
    return load_model(folder)


def prompts() -> list[list[int]]:
    shared = [1, 17, 45, 99, 3, 8, 21, 90, 200, 11, 54, 7]  # three full blocks
    return [
        shared + [5, 6],
        shared[:9] + [130],  # shares two blocks, then differs mid-block
        shared + [5, 6],  # identical prompt
        [1, 5],
        [1, 250, 3, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58],
        [9],
        shared[:4] + [77] * 9,
        [3, 1, 4, 1, 5, 9, 2, 6],
    ]


def params(i: int, sampled: bool) -> SamplingParams:
    if not sampled:
        return SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=100 + i,
                          repetition_penalty=1.0 if i % 2 else 1.2, ignore_eos=True)  # fmt: skip


def run(
    model, num_blocks: int, batched: bool, sampled: bool, overlap: bool = False
) -> tuple[list[list[int]], Engine]:
    from inference_service.backends import create_backend

    backend = create_backend(model, "cpu", num_blocks=num_blocks, block_size=BLOCK)
    config = EngineConfig(max_batch_size=8, max_num_batched_tokens=16, overlap_steps=overlap)
    engine = Engine(backend, config)
    assert engine.overlap is overlap
    engine.batch_sizes = []  # type: ignore[attr-defined]
    engine.add_stats_listener(lambda s: engine.batch_sizes.append(s.batch_size))
    engine.start()
    try:
        ps = prompts()
        if batched:  # all submitted at once: engine steps serve many of them together
            outs: dict[int, list[int]] = {}
            done: set[int] = set()
            finished = threading.Event()
            lock = threading.Lock()

            def listen(outputs):
                with lock:
                    for o in outputs:
                        assert o.error is None, o.error
                        outs.setdefault(o.request_id, []).extend(o.new_token_ids)
                        if o.finished:
                            done.add(o.request_id)
                    if len(done) == len(ps):
                        finished.set()

            engine.add_output_listener(listen)
            ids = [engine.submit(p, params(i, sampled)) for i, p in enumerate(ps)]
            assert finished.wait(120), "batched generation did not finish"
            return [outs[rid] for rid in ids], engine
        alone = [engine.generate([p], params(i, sampled), timeout=60)[0] for i, p in enumerate(ps)]
        return alone, engine
    finally:
        engine.stop()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_batched_equals_one_by_one_with_shared_prefixes_and_preemption(model, sampled):
    one_by_one, _ = run(model, num_blocks=256, batched=False, sampled=sampled)
    batched, roomy = run(model, num_blocks=256, batched=True, sampled=sampled)
    assert batched == one_by_one
    assert max(roomy.batch_sizes) >= 4  # really batched
    assert roomy.block_manager.prefix_cache_hit_blocks > 0  # shared prefixes were shared
    # 14 blocks of 4 tokens for 8 streams of up to 32 tokens: preemption and recompute.
    tight, tiny = run(model, num_blocks=14, batched=True, sampled=sampled)
    assert tight == one_by_one
    assert tiny.scheduler.num_preemptions > 0
    assert all(len(o) == NEW for o in one_by_one)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_overlapped_steps_give_the_synchronous_tokens(model, sampled):
    # Issue 12: the overlapped scheduler (step N+1 scheduled while N runs in the numpy
    # backend's worker thread) gives the same tokens as the synchronous loop, one by one.
    synchronous, _ = run(model, num_blocks=256, batched=False, sampled=sampled)
    overlapped, roomy = run(model, num_blocks=256, batched=True, sampled=sampled, overlap=True)
    assert overlapped == synchronous
    assert max(roomy.batch_sizes) >= 4
    tight, tiny = run(model, num_blocks=14, batched=True, sampled=sampled, overlap=True)
    assert tight == synchronous
    assert tiny.scheduler.num_preemptions > 0
    assert tiny.last_stats.kv_blocks_used == 0
