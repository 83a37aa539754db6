"""One engine-core process, several frontends (engine_core/process.py: Multiplexer): each
frontend's request ids are its own, its outputs reach it alone, a frontend that goes away has
only its own requests aborted (KV blocks back), and the waiting-queue bound holds across
frontends. A core that stops sending heartbeats (SIGSTOP) and one that dies, with several
frontends: tests/test_multi_frontend.py.

In process: the owner is an EngineClient that starts the core; the other frontends are
EngineClients attached to its socket. The oracle for the tokens is the same request served
alone by the owner (greedy, so identical ids)."""

from __future__ import annotations

import secrets
import threading
import time

from serving_stack import tiny_model  # noqa: F401  (fixture)

from inference_service.config import EngineConfig
from inference_service.engine.engine import RequestOutput
from inference_service.engine.sequence import FinishReason
from inference_service.engine_core.build import EngineSpec
from inference_service.engine_core.client import EngineClient
from inference_service.engine_core.process import CoreAddress
from inference_service.sampling.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)


class Recorder:
    """Every output a frontend receives, by its request id."""

    def __init__(self, client: EngineClient):
        self.lock = threading.Lock()
        self.outputs: dict[int, list[RequestOutput]] = {}
        client.add_output_listener(self.on_outputs)

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        with self.lock:
            for out in outputs:
                self.outputs.setdefault(out.request_id, []).append(out)

    def tokens(self, rid: int) -> list[int]:
        with self.lock:
            return [t for o in self.outputs.get(rid, []) for t in o.new_token_ids]

    def last(self, rid: int) -> RequestOutput | None:
        with self.lock:
            outs = self.outputs.get(rid)
            return outs[-1] if outs else None


def wait_for(pred, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _core(tmp_path, model, **engine) -> tuple[EngineClient, CoreAddress]:
    address = CoreAddress(str(tmp_path / "core.sock"), secrets.token_bytes(16))
    config = EngineConfig(model=str(model), device="cpu", block_size=8, **engine)
    owner = EngineClient(EngineSpec(config), address=address)
    owner.start()
    return owner, address


def _attach(owner: EngineClient, address: CoreAddress) -> EngineClient:
    client = EngineClient(owner.spec, address=address, attach=True)
    client.start()
    return client


def test_frontends_get_their_own_outputs_and_a_gone_one_frees_its_blocks(tmp_path, tiny_model):  # noqa: F811
    owner, address = _core(tmp_path, tiny_model, num_kv_blocks=256)
    a = b = None
    try:
        a, b = _attach(owner, address), _attach(owner, address)
        assert a.pid == b.pid == owner.pid  # one core
        prompts = [[5, 6, 7], [9, 10, 11, 12], [3, 4]]
        alone = [owner.generate([p], GREEDY, 60)[0] for p in prompts]
        rec = {c: Recorder(c) for c in (owner, a, b)}
        # Same request ids on every frontend (each starts its own count), different prompts.
        rids = {c: c.submit(p, GREEDY) for c, p in zip((owner, a, b), prompts, strict=True)}
        for c, rid in rids.items():
            wait_for(lambda c=c, rid=rid: (o := rec[c].last(rid)) is not None and o.finished,
                     what="each request to finish")  # fmt: skip
        for (c, rid), want in zip(rids.items(), alone, strict=True):
            assert rec[c].tokens(rid) == want
            assert rec[c].last(rid).finish_reason is FinishReason.LENGTH
            # nothing of another frontend's requests reached this one
            assert sum(len(o.new_token_ids) for outs in rec[c].outputs.values() for o in outs) \
                == len(want)  # fmt: skip

        # A long request on each of a and the owner; then a goes away.
        ra, ro = a.submit([1, 2, 3], LONG), owner.submit([4, 5, 6], LONG)
        wait_for(lambda: rec[a].tokens(ra) and rec[owner].tokens(ro), what="both to run")
        a.stop()
        a = None
        wait_for(lambda: owner.last_stats.num_running == 1, what="a's request to be aborted")
        got = len(rec[owner].tokens(ro))
        wait_for(lambda: len(rec[owner].tokens(ro)) > got + 20, what="the owner's to go on")
        owner.abort(ro)
        wait_for(lambda: owner.last_stats.kv_blocks_used == 0 and owner.last_stats.num_running
                 == 0, what="every KV block back")  # fmt: skip
        # b still serves
        assert b.generate([prompts[1]], GREEDY, 60)[0] == alone[1]
    finally:
        for c in (a, b):
            if c is not None:
                c.stop()
        owner.stop()


def test_the_waiting_queue_bound_holds_across_frontends(tmp_path, tiny_model):  # noqa: F811
    owner, address = _core(tmp_path, tiny_model, num_kv_blocks=256, max_batch_size=1,
                           max_num_batched_tokens=64, max_waiting=1)  # fmt: skip
    other = None
    try:
        other = _attach(owner, address)
        rec_o, rec_x = Recorder(owner), Recorder(other)
        running = owner.submit([1, 2, 3], LONG)
        wait_for(lambda: rec_o.tokens(running), what="the first request to run")
        waiting = other.submit([4, 5, 6], LONG)  # the only waiting slot, taken via `other`
        wait_for(lambda: owner.last_stats.num_waiting == 1, what="the second to wait")
        refused = owner.submit([7, 8, 9], LONG)  # the owner's own count is 0: the core refuses
        wait_for(lambda: rec_o.last(refused) is not None, what="the refusal")
        out = rec_o.last(refused)
        assert out.finish_reason is FinishReason.ERROR and out.queue_full and not out.engine_lost
        assert "queue is full" in out.error
        assert rec_x.last(waiting) is None  # still waiting, untouched
        owner.abort(running)
        other.abort(waiting)
        wait_for(lambda: rec_x.last(waiting) is not None and rec_x.last(waiting).finished,
                 what="the waiting one to end")  # fmt: skip
    finally:
        if other is not None:
            other.stop()
        owner.stop()
