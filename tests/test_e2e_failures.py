"""End to end, failure paths: full queue, tokenizer down and back, SIGTERM drain.

One stack with one batch slot and one waiting slot, so a single long stream fills the engine.
"""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper_client import KuiperClient, KuiperError
from servers import health_status, wait_until
from serving_stack import run_stack, start_tokenizer, tiny_model  # noqa: F401  (fixture)

N_SIGTERM = 1500  # long enough to still run when SIGTERM comes
LONG = ipb.SamplingParams(max_new_tokens=1800, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def stack(tiny_model):  # noqa: F811
    with run_stack(tiny_model, "--max-batch-size", "1", "--max-waiting", "1") as s:
        yield s


def test_full_queue_answers_resource_exhausted(stack):
    channel = grpc.insecure_channel(stack.address)
    stub = igrpc.InferenceServiceStub(channel)
    running = stub.Generate(ipb.GenerateRequest(text="hello", sampling=LONG), timeout=60)
    next(iter(running))  # it runs, holding the only batch slot
    waiting = stub.Generate(ipb.GenerateRequest(text="world", sampling=LONG), timeout=60)
    wait_until(lambda: stack.metrics().get("kuiper_inference_num_requests_waiting") == 1,
               what="the second request to wait")  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(ipb.GenerateRequest(text="again", sampling=LONG), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.value.details()
    running.cancel()
    waiting.cancel()
    wait_until(lambda: stack.metrics().get("kuiper_inference_kv_blocks_used") == 0
               and stack.metrics().get("kuiper_inference_num_requests_waiting") == 0,
               what="KV blocks to come back")  # fmt: skip
    with KuiperClient(stack.address, timeout=30) as client:
        assert client.complete("hi", max_new_tokens=3, ignore_eos=True).finish_reason == "length"
    channel.close()


def test_tokenizer_down_then_back(stack):
    tok_port = stack.tokenizer.port
    stack.tokenizer.kill()
    with KuiperClient(stack.address, timeout=30, retries=0) as client:
        for prompt in ("hello", [1, 2, 3]):  # text needs Encode; ids need DecodeStream
            with pytest.raises(KuiperError) as err:
                list(client.generate(prompt, max_new_tokens=3))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "tokenizer service" in err.value.message
        # The inference service itself stays up.
        assert health_status(stack.address) == 1  # SERVING

        stack.tokenizer = start_tokenizer(stack.model, tok_port)
        stack.tokenizer.wait_ready(60)

        def succeeds():
            try:
                return client.complete("hello", max_new_tokens=3, ignore_eos=True).token_ids
            except KuiperError as exc:
                assert exc.code == grpc.StatusCode.UNAVAILABLE
                return None

        wait_until(succeeds, timeout=20, what="requests to succeed after the restart")
        assert len(succeeds()) == 3


def test_sigterm_lets_running_streams_finish_then_exits_0(stack):
    results: dict[int, list] = {0: [], 1: []}

    def stream(i):
        with KuiperClient(stack.address, timeout=60, retries=0) as client:
            try:
                for chunk in client.generate("hello there", max_new_tokens=N_SIGTERM,
                                             ignore_eos=True, temperature=0.0):  # fmt: skip
                    results[i].append(chunk)
            except KuiperError as exc:
                results[i].append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    threads[0].start()
    wait_until(lambda: results[0], what="the first stream to run")
    threads[1].start()  # one batch slot: this one waits in the queue
    wait_until(lambda: stack.metrics().get("kuiper_inference_num_requests_waiting") == 1,
               what="the second stream to wait")  # fmt: skip
    assert not isinstance(results[0][-1], Exception) and not results[1]
    stack.inference.proc.send_signal(signal.SIGTERM)
    # Draining: new requests are turned away.
    wait_until(lambda: health_status(stack.address, "kuiper.v1.InferenceService") != 1,
               what="health to leave SERVING")  # fmt: skip
    with KuiperClient(stack.address, timeout=10, retries=0) as client:
        with pytest.raises(KuiperError) as err:
            list(client.generate("late", max_new_tokens=2))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(60)
    assert stack.inference.proc.wait(60) == 0
    for i in range(2):
        chunks = results[i]
        assert not isinstance(chunks[-1], Exception), chunks[-1]
        assert chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == N_SIGTERM
    assert "draining" in stack.inference.log_text()
