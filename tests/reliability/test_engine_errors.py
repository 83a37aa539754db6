"""One request's engine error: that request ends with an error (INTERNAL over gRPC), every
other request of the same steps goes on with exactly the tokens it would have had, and no KV
block leaks.

The fault: a test-only wrapper around the real numpy backend whose step raises whenever its
batch holds a poisoned token id (before or after the inner backend ran the step, so the KV
writes of the failed attempt happened too). Oracle: the same other requests run again on the
same engine without the poisoned one (greedy and seeded sampling), and the block manager's
used-block count. The served variant (both process layouts) is in
test_engine_errors_served.py.
"""

from __future__ import annotations

import threading

import pytest

from inference_service.backends.base import BatchItem
from inference_service.config import EngineConfig
from inference_service.engine.engine import Engine, RequestOutput
from inference_service.engine.sequence import FinishReason
from inference_service.sampling.params import SampleOutput, SamplingParams

POISON = 255  # the tiny model's last id (vocabulary 256): in prompts only, never sampled


class PoisonedBackend:
    """Delegates to `inner`; a step whose batch holds POISON raises (after running it when
    `after`). Counts the failed steps and their sizes."""

    def __init__(self, inner, after: bool) -> None:
        self.inner = inner
        self.after = after
        self.failed_batch_sizes: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        poisoned = any(POISON in item.token_ids for item in batch)
        if poisoned and not self.after:
            self.failed_batch_sizes.append(len(batch))
            raise RuntimeError(f"poisoned token {POISON} in the batch")
        out = self.inner.step(batch)
        if poisoned:
            self.failed_batch_sizes.append(len(batch))
            raise RuntimeError(f"poisoned token {POISON} in the batch")
        return out

    def logits(self, batch):
        return self.inner.logits(batch)

    def close(self) -> None:
        self.inner.close()


def run_requests(
    engine: Engine, requests: list[tuple[list[int], SamplingParams]], timeout: float = 120
) -> list[RequestOutput]:
    """Submit all at once; per request: its ids, and its last output (reason, error)."""
    ids: list[int] = []
    tokens: dict[int, list[int]] = {}
    last: dict[int, RequestOutput] = {}
    lock, done = threading.Lock(), threading.Event()

    def listen(outputs: list[RequestOutput]) -> None:
        with lock:
            for out in outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    last[out.request_id] = out
            if len(ids) == len(requests) and all(i in last for i in ids):
                done.set()

    engine.add_output_listener(listen)
    try:
        with lock:
            for prompt, params in requests:
                ids.append(engine.submit(prompt, params))
        assert done.wait(timeout), "the requests did not finish"
    finally:
        engine.remove_output_listener(listen)
    results = []
    for rid in ids:
        out = last[rid]
        out.new_token_ids = tokens.get(rid, [])  # all of them, for the caller
        results.append(out)
    return results


@pytest.fixture(scope="module")
def numpy_backend(tmp_path_factory):
    models_util = pytest.importorskip("models_util")
    pytest.importorskip("torch")
    from inference_service.backends import create_backend
    from inference_service.models import load_model

    folder, _ = models_util.build_llama2(tmp_path_factory.mktemp("llama"))
    backend = create_backend(load_model(folder), "cpu", num_blocks=96, block_size=4)
    assert models_util.VOCAB == POISON + 1
    backend.sample_vocab = POISON  # so no generated token trips the poison
    return backend


GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
CLEAN = [
    ([1, 17, 45, 99, 3, 8, 21, 90, 200, 11], GREEDY),
    ([1, 5], SEEDED),
    ([1, 250, 3, 4, 9], GREEDY),
    ([1, 17, 45, 99, 3, 8, 21, 90, 7], SEEDED),
    ([1, 33], GREEDY),
]
# Poisoned prompts: the poison in the first prefill chunk, and past it (a chunk while the
# others decode).
POISONED = [
    ([1, 9, POISON, 4], GREEDY),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, POISON, 15], SEEDED),
]


@pytest.mark.parametrize("after", [False, True], ids=["raises-before", "raises-after-running"])
def test_one_poisoned_request_fails_alone_and_the_others_are_exact(numpy_backend, after):
    backend = PoisonedBackend(numpy_backend, after=after)
    # A small token budget: prefill chunks run beside decodes, the poison arrives mid-run.
    engine = Engine(backend, EngineConfig(max_batch_size=8, max_num_batched_tokens=12))
    engine.start()
    try:
        requests = CLEAN[:2] + POISONED[:1] + CLEAN[2:] + POISONED[1:]
        results = run_requests(engine, requests)
        assert engine.block_manager.num_used_blocks == 0
        assert max(backend.failed_batch_sizes) > 1, "no failing step held other requests"
        failed_steps = len(backend.failed_batch_sizes)
        want = run_requests(engine, CLEAN)  # the oracle: the others alone, no poison
        assert len(backend.failed_batch_sizes) == failed_steps
    finally:
        engine.stop()
    got = [r for r, (p, _) in zip(results, requests, strict=True) if POISON not in p]
    bad = [r for r, (p, _) in zip(results, requests, strict=True) if POISON in p]
    for g, w in zip(got, want, strict=True):
        assert g.error is None and g.finish_reason is FinishReason.LENGTH
        assert g.new_token_ids == w.new_token_ids
    for b in bad:
        assert b.finish_reason is FinishReason.ERROR
        assert "model backend failed on this request" in b.error
        assert f"poisoned token {POISON}" in b.error


def test_a_backend_that_fails_every_step_fails_each_request_once(numpy_backend):
    """Nothing to isolate (every sequence fails alone too): all end with the error, the
    engine keeps serving, no block leaks."""

    class Broken(PoisonedBackend):
        def step(self, batch):
            self.failed_batch_sizes.append(len(batch))
            raise RuntimeError("device lost")

    backend = Broken(numpy_backend, after=False)
    engine = Engine(backend, EngineConfig(max_batch_size=8, max_num_batched_tokens=64))
    engine.start()
    try:
        results = run_requests(engine, CLEAN)
        assert all(r.finish_reason is FinishReason.ERROR and "device lost" in r.error
                   for r in results)  # fmt: skip
        # 5 chunks in one step, bisected down to each: 2 * 5 - 1 attempts.
        assert len(backend.failed_batch_sizes) == 2 * len(CLEAN) - 1
        assert engine.block_manager.num_used_blocks == 0
        assert engine.alive
    finally:
        engine.stop()
