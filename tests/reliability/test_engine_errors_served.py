"""One request's engine error through the served stack, with the engine in its own process
(the default), with `--single-process` and with two frontend processes: the client of the failing request gets INTERNAL
with a message that says what happened; streams running beside it finish OK with the same
ids they get when run again without it; the server logs one line and no traceback; no KV
block stays in use.

The faults: tests/reliability/poisoned_kuiper.py, the kuiper CLI whose numpy backend raises on
a prompt that starts with POISON, and whose stop-string matcher and logprobs encoding raise for
marked requests (test only; the product has no hooks for them).
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import grpc
import pytest
import reliability_util
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper.v1 import tokenizer_pb2 as tpb
from reliability_util import wait_until
from serving_stack import run_stack

tiny_model = reliability_util.tiny_model  # fixture

POISON = 50  # a token id of the tiny model's vocabulary (600)
POISON_STOP = "<poison-stop>"
POISON_LOGPROBS = 17
LAUNCHER = [sys.executable, str(Path(__file__).with_name("poisoned_kuiper.py"))]
CLEAN_PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27]]
CLEAN_TOKENS = 300
INTERNAL_KEY = 'kuiper_inference_requests_total{code="INTERNAL",method="Generate"}'


LAYOUTS = {
    "engine-process": [],
    "single-process": ["--single-process"],
    "two-frontends": ["--frontends", "2"],  # a client lands on either
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def poisoned_stack(request, tiny_model):  # noqa: F811
    layout = LAYOUTS[request.param]
    with run_stack(tiny_model, "--num-kv-blocks", "512", "--block-size", "8",
                   "--max-batch-size", "8", *layout, launcher=LAUNCHER,
                   env={"KUIPER_TEST_POISON_ID": str(POISON), "KUIPER_TEST_POISON_STOP": POISON_STOP,
                        "KUIPER_TEST_POISON_LOGPROBS": str(POISON_LOGPROBS)}) as stack:  # fmt: skip
        yield stack


class Stream(threading.Thread):
    def __init__(self, stub, prompt: list[int], n: int, stop=(), logprobs=None) -> None:
        super().__init__(daemon=True)
        sampling = ipb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True,
                                      stop=stop, logprobs=logprobs)  # fmt: skip
        request = ipb.GenerateRequest(token_ids=tpb.TokenIds(ids=prompt), sampling=sampling)
        self.call = stub.Generate(request, timeout=120)
        self.ids: list[int] = []
        self.finish = None
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        try:
            for msg in self.call:
                self.ids += msg.token_ids
                self.finish = msg.finish_reason or self.finish
        except grpc.RpcError as exc:
            self.error = exc


def rerun_clean(stub) -> list[Stream]:
    """The oracle: the clean requests again, finished, without a failing one beside them."""
    again = [Stream(stub, p, CLEAN_TOKENS) for p in CLEAN_PROMPTS]
    for s in again:
        s.join(120)
    return again


def test_a_failing_request_gets_internal_and_the_others_finish(poisoned_stack):
    stack = poisoned_stack
    log_before = len(stack.inference.log_text())
    internal_before = stack.metrics().get(INTERNAL_KEY, 0.0)
    with grpc.insecure_channel(stack.address) as channel:
        stub = igrpc.InferenceServiceStub(channel)
        streams = [Stream(stub, p, CLEAN_TOKENS) for p in CLEAN_PROMPTS]
        wait_until(lambda: all(s.ids or s.error for s in streams), 30, "the streams' first tokens")
        running_then = sum(s.finish is None and s.error is None for s in streams)
        bad = Stream(stub, [POISON, 7, 8, 9], 8)
        bad.join(60)
        for s in streams:
            s.join(120)
        again = rerun_clean(stub)

    assert running_then > 0, "the other streams had finished before the poisoned request came"
    for s, w in zip(streams, again, strict=True):
        assert s.error is None and w.error is None, (s.error, w.error)
        assert s.finish == ipb.FINISH_REASON_LENGTH and len(s.ids) == CLEAN_TOKENS
        assert s.ids == w.ids
    assert bad.error is not None and bad.error.code() == grpc.StatusCode.INTERNAL, bad.error
    details = bad.error.details()
    assert "model backend failed on this request" in details, details
    assert "poisoned prompt" in details and len(details) < 400

    new_log = stack.inference.log_text()[log_before:]
    lines = [line for line in new_log.splitlines() if "backend step failed" in line]
    assert len(lines) == 1, new_log
    others = int(re.search(r"(\d+) other sequence", lines[0]).group(1))
    assert others >= 1, lines[0]  # it failed in a step shared with running streams
    assert "Traceback" not in new_log
    wait_until(lambda: stack.metrics().get("kuiper_inference_kv_blocks_used") == 0, 20,
               "KV blocks back to 0")  # fmt: skip
    assert stack.metrics().get(INTERNAL_KEY, 0.0) == internal_before + 1


def test_a_post_processing_error_ends_that_stream_only(poisoned_stack):
    """A stop-string matcher or logprobs encoding that raises for one request (server side,
    after the engine): INTERNAL for it, the streams beside it finish with their own ids."""
    stack = poisoned_stack
    log_before = len(stack.inference.log_text())
    with grpc.insecure_channel(stack.address) as channel:
        stub = igrpc.InferenceServiceStub(channel)
        streams = [Stream(stub, p, CLEAN_TOKENS) for p in CLEAN_PROMPTS]
        wait_until(lambda: all(s.ids or s.error for s in streams), 30, "the streams' first tokens")
        running_then = sum(s.finish is None and s.error is None for s in streams)
        bad_stop = Stream(stub, [7, 8, 9], 8, stop=[POISON_STOP])
        bad_logprobs = Stream(stub, [7, 8, 9], 8, logprobs=POISON_LOGPROBS)
        for s in [bad_stop, bad_logprobs, *streams]:
            s.join(120)
        again = rerun_clean(stub)

    assert running_then > 0, "the other streams had finished before the marked requests came"
    for s, w in zip(streams, again, strict=True):
        assert s.error is None and w.error is None, (s.error, w.error)
        assert len(s.ids) == CLEAN_TOKENS and s.ids == w.ids
    for bad, what in [(bad_stop, "poisoned stop string"), (bad_logprobs, "poisoned logprobs")]:
        assert bad.error is not None and bad.error.code() == grpc.StatusCode.INTERNAL, bad.error
        assert "internal error while" in bad.error.details() and what in bad.error.details()
    new_log = stack.inference.log_text()[log_before:]
    assert "Traceback" not in new_log
    assert new_log.count("ended it with INTERNAL") == 2, new_log
    wait_until(lambda: stack.metrics().get("kuiper_inference_kv_blocks_used") == 0, 20,
               "KV blocks back to 0")  # fmt: skip
