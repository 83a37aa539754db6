"""Faults under load: the tokenizer service killed and restarted mid-stream (finding 7: the
streams continue, with exactly the tokens and text of an undisturbed run), random client
cancellations and deadlines (each ends with its own status, nothing leaks).

Oracle: `inference_service.llm.LLM` in process (no gRPC, its own tokenizer), greedy.
The engine-process crash (SIGKILL mid-stream: UNAVAILABLE, NOT_SERVING, restart, same ids after)
is tested in tests/test_engine_process.py::test_engine_process_death_mid_stream.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time

import grpc
import pytest
import reliability_util
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from reliability_util import long_mode, wait_until
from servers import free_port, health_status, kuiper_command, server_env
from serving_stack import run_stack, start_tokenizer

from inference_service.sampling.params import SamplingParams

tiny_model = reliability_util.tiny_model  # fixture

PROMPTS = ["once upon a time", "hello world", "the quick brown fox", "numbers 1 2 3"]


@pytest.fixture(scope="module")
def stack(tiny_model):  # noqa: F811
    with run_stack(tiny_model, "--num-kv-blocks", "1024", "--block-size", "8",
                   "--max-batch-size", "16", "--max-waiting", "64") as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def llm(tiny_model):  # noqa: F811
    from inference_service.llm import LLM

    return LLM(tiny_model, device="cpu")


def oracle(llm, prompt: str, n: int) -> tuple[list[int], str]:
    chunks = list(llm.generate(prompt, SamplingParams(max_new_tokens=n, temperature=0.0,
                                                      ignore_eos=True)))  # fmt: skip
    return [c.token_id for c in chunks], "".join(c.text for c in chunks)


class Stream(threading.Thread):
    def __init__(self, stub, prompt: str, n: int, timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        sampling = ipb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        self.call = stub.Generate(ipb.GenerateRequest(text=prompt, sampling=sampling),
                                  timeout=timeout)  # fmt: skip
        self.ids: list[int] = []
        self.text = ""
        self.finish = None
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        try:
            for msg in self.call:
                self.ids += msg.token_ids
                self.text += msg.text
                if msg.finish_reason:
                    self.finish = msg.finish_reason
        except grpc.RpcError as exc:
            self.error = exc


def test_tokenizer_restart_mid_stream_streams_continue(stack, llm):
    n = 1000
    with grpc.insecure_channel(stack.address) as channel:
        stub = igrpc.InferenceServiceStub(channel)
        streams = [Stream(stub, p, n) for p in PROMPTS]
        for s in streams:
            s.start()
        wait_until(lambda: all(s.ids or s.error for s in streams), 30, "every stream to start")
        port = stack.tokenizer.port
        stack.tokenizer.kill()  # SIGKILL: no drain, the DecodeStream breaks
        killed_at = [len(s.ids) for s in streams]
        time.sleep(0.5)
        stack.tokenizer = start_tokenizer(stack.model, port)
        stack.tokenizer.wait_ready(60)
        for s in streams:
            s.join(120)
    assert any(k < n for k in killed_at), "every stream had finished before the kill"
    for prompt, s in zip(PROMPTS, streams, strict=True):
        assert s.error is None, (s.error.code(), s.error.details())
        want_ids, want_text = oracle(llm, prompt, n)
        assert s.ids == want_ids, (killed_at, len(s.ids), str(s.ids[:80]), str(want_ids[:80]))
        assert s.text == want_text
        assert s.finish == ipb.FINISH_REASON_LENGTH
    wait_until(lambda: stack.metrics().get("kuiper_inference_kv_blocks_used") == 0, 20,
               "KV blocks back to 0")  # fmt: skip


def test_random_cancellations_and_deadlines(stack, request):
    """Streams that are cancelled or run out of deadline at random end with CANCELLED /
    DEADLINE_EXCEEDED; the rest finish; afterwards no KV block is used."""
    rng = random.Random(7)
    count = 64 if long_mode(request.config) else 24
    key = 'kuiper_inference_requests_total{code="%s",method="Generate"}'
    before = stack.metrics()
    plans = [rng.choice(["finish", "cancel", "deadline"]) for _ in range(count)]
    results: list[str] = [""] * count
    answered = [False] * count  # a message came: the server had started the call
    with grpc.insecure_channel(stack.address) as channel:
        stub = igrpc.InferenceServiceStub(channel)

        def run(i: int) -> None:
            plan = plans[i]
            n = 16 if plan == "finish" else 2000
            timeout = rng.uniform(0.2, 1.0) if plan == "deadline" else 60.0
            sampling = ipb.SamplingParams(max_new_tokens=n, temperature=0.8, seed=i,
                                          ignore_eos=True)  # fmt: skip
            call = stub.Generate(ipb.GenerateRequest(text=PROMPTS[i % 4], sampling=sampling),
                                 timeout=timeout)  # fmt: skip
            try:
                for j, _ in enumerate(call):
                    answered[i] = True
                    if plan == "cancel" and j == 3:
                        call.cancel()
                results[i] = "OK"
            except grpc.RpcError as exc:
                results[i] = exc.code().name

        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    want = {"finish": "OK", "cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}
    assert results == [want[p] for p in plans]

    # A call whose deadline passes before the server's event loop starts its handler (a very
    # busy machine) is answered by gRPC alone and never reaches the servicer, so it is not
    # counted: the deadlines are counted at least for every stream that got a message, at most
    # for all. Cancelled streams all got messages: exactly.
    started_deadlines = sum(a for a, p in zip(answered, plans, strict=True) if p == "deadline")
    wanted = {"CANCELLED": (plans.count("cancel"), plans.count("cancel")),
              "DEADLINE_EXCEEDED": (started_deadlines, plans.count("deadline"))}  # fmt: skip

    def counts() -> dict[str, int]:
        now = stack.metrics()
        return {code: int(now.get(key % code, 0) - before.get(key % code, 0)) for code in wanted}

    def counted() -> bool:
        return all(lo <= counts()[code] <= hi for code, (lo, hi) in wanted.items())

    try:
        wait_until(counted, 20)
    except AssertionError:
        raise AssertionError(f"the server counted {counts()}, wanted {wanted}") from None
    wait_until(lambda: stack.metrics().get("kuiper_inference_kv_blocks_used") == 0, 20,
               "KV blocks back to 0")  # fmt: skip


def test_sigterm_drain_under_load(tiny_model):  # noqa: F811
    """SIGTERM while 8 streams run: each finishes its tokens, new calls get UNAVAILABLE, exit 0."""
    with run_stack(tiny_model, "--num-kv-blocks", "512", "--block-size", "8") as s, \
            grpc.insecure_channel(s.address) as channel:  # fmt: skip
        stub = igrpc.InferenceServiceStub(channel)
        streams = [Stream(stub, PROMPTS[i % 4], 300) for i in range(8)]
        for st in streams:
            st.start()
        wait_until(lambda: all(st.ids for st in streams), 30, "every stream to start")
        s.inference.proc.send_signal(signal.SIGTERM)
        for st in streams:
            st.join(60)
        assert s.inference.proc.wait(60) == 0
        for st in streams:
            assert st.error is None and len(st.ids) == 300


def test_up_restarts_a_crashed_tokenizer_and_streams_continue(tiny_model, llm):  # noqa: F811
    """`kuiper up`: SIGKILL its tokenizer service mid-stream; up says so and restarts it,
    the stream ends with the undisturbed run's tokens and text, Ctrl-C still exits 0."""
    inf_port, tok_port = free_port(), free_port()
    cmd = kuiper_command("up", "--model", str(tiny_model), "--device", "cpu",
                         "--port", str(inf_port), "--tokenizer-port", str(tok_port),
                         "--metrics-port", "0", "--num-kv-blocks", "512", "--block-size", "8")  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=server_env())  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)  # fmt: skip
    reader.start()
    try:
        wait_until(lambda: any(x.startswith("serving;") for x in lines), 120, "kuiper up")
        pid = int(re.search(r"starting tokenizer service \(pid (\d+)", "".join(lines))[1])
        n = 1000
        with grpc.insecure_channel(f"127.0.0.1:{inf_port}") as channel:
            stream = Stream(igrpc.InferenceServiceStub(channel), PROMPTS[0], n)
            stream.start()
            wait_until(lambda: stream.ids or stream.error, 30, "the stream to start")
            os.kill(pid, signal.SIGKILL)
            killed_at = len(stream.ids)
            stream.join(120)
        out = "".join(lines)
        assert "tokenizer service exited (-9); restarting it in 1s" in out, out
        wait_until(lambda: "tokenizer service restarted" in "".join(lines), 60, "the restart")
        assert health_status(f"127.0.0.1:{tok_port}") == 1  # SERVING again
        assert stream.error is None, (stream.error.code(), stream.error.details())
        assert killed_at < n
        want_ids, want_text = oracle(llm, PROMPTS[0], n)
        assert (stream.ids, stream.text) == (want_ids, want_text)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
