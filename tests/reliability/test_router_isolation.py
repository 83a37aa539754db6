"""Detokenization errors stay with their request: one request's id that the tokenizer service
cannot decode ends that request with INTERNAL; the other requests of the same step get their
text and go on.

The tokenizer service checks a whole DecodeStream message before decoding any of it and
refuses it all for one bad id (tokenizer_service/server.py, _stream_step), so before the
router checked ids per request, every stream of that step failed. In process: the router
(inference_service/router.py) over a stand-in DecodeStream that answers as the service does
(text per sequence; the whole message refused for an id beyond its vocabulary)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc

from inference_service.engine.engine import RequestOutput
from inference_service.engine.sequence import FinishReason
from inference_service.router import OutputRouter
from inference_service.tokenizer_client import TokenizerRequestError

VOCAB = 100


class FakeDecodeStream:
    epoch = 0

    def __init__(self) -> None:
        self.client = SimpleNamespace(timeout_s=5.0)

    async def send(self, items) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        bad = [s.sequence_id for s in items if any(t >= VOCAB for t in s.ids)]
        if bad:
            fut.set_exception(TokenizerRequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"sequence_id {bad[0]}: id out of range"))  # fmt: skip
        else:  # the text of id t: chr(ord("a") + t % 26)
            fut.set_result(["".join(chr(97 + t % 26) for t in s.ids) for s in items])
        return fut


class FakeEngine:
    def __init__(self) -> None:
        self.aborted: list[int] = []

    def abort(self, request_id: int) -> None:
        self.aborted.append(request_id)


def test_an_undecodable_id_ends_its_own_stream_only():
    engine = FakeEngine()

    async def scenario():
        router = OutputRouter(engine, FakeDecodeStream())
        router.vocab_size = VOCAB  # what the server sets from the tokenizer's info
        router.start()
        try:
            good = router.register(1, [1, 2], ())
            other = router.register(2, [3], ())
            bad = router.register(3, [4], ())
            router.on_step([RequestOutput(1, [5]), RequestOutput(2, [6]),
                            RequestOutput(3, [VOCAB + 7])])  # fmt: skip
            got = [await asyncio.wait_for(r.next_delta(), 5) for r in (good, other, bad)]
            router.on_step([RequestOutput(1, [7], finish_reason=FinishReason.LENGTH),
                            RequestOutput(2, [8], finish_reason=FinishReason.LENGTH)])  # fmt: skip
            last = [await asyncio.wait_for(r.next_delta(), 5) for r in (good, other)]
            return got, last
        finally:
            await router.stop()

    (g, o, b), (g2, o2) = asyncio.run(scenario())
    assert (g.error, g.text, o.error, o.text) == (None, "f", None, "g")
    assert b.error is not None and b.error.code == grpc.StatusCode.INTERNAL
    assert f"[{VOCAB + 7}] have no text" in b.error.message
    assert (g2.text, g2.finish_reason, o2.text, o2.finish_reason) == (
        "h", FinishReason.LENGTH, "i", FinishReason.LENGTH)  # fmt: skip
    assert engine.aborted == [3]  # the failed one's sequence is stopped in the engine
