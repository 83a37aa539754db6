"""The Python client library against a scripted in-process server: retries on UNAVAILABLE
only before the first token, deadlines, error mapping, chat/request building."""

from __future__ import annotations

import asyncio
import time
from concurrent import futures

import grpc
import pytest
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper.v1 import tokenizer_pb2 as tpb
from kuiper.v1 import tokenizer_pb2_grpc as tgrpc
from kuiper_client import AsyncKuiperClient, GenerateChunk, KuiperClient, KuiperError


class Scripted(igrpc.InferenceServiceServicer):
    def __init__(self):
        self.calls = 0
        self.fail_first = 0  # UNAVAILABLE before any token, this many times
        self.fail_after_token = False
        self.requests: list = []
        self.slow = False

    def Generate(self, request, context):
        self.calls += 1
        self.requests.append(request)
        if self.calls <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        yield ipb.GenerateResponse(token_ids=[7], text="a")
        if self.fail_after_token:
            context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")
        if self.slow:
            time.sleep(2)
        yield ipb.GenerateResponse(
            token_ids=[8], text="b", finish_reason=ipb.FINISH_REASON_LENGTH,
            usage=ipb.Usage(prompt_tokens=3, completion_tokens=2, time_to_first_token_s=0.5),
        )  # fmt: skip

    def Chat(self, request, context):
        self.requests.append(request)
        yield ipb.GenerateResponse(token_ids=[1], text="ok", finish_reason=ipb.FINISH_REASON_EOS)

    def GetModelInfo(self, request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nope")


@pytest.fixture
def server():
    servicer = Scripted()
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    igrpc.add_InferenceServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(0)


def test_retries_unavailable_before_the_first_token(server):
    servicer, address = server
    servicer.fail_first = 2
    with KuiperClient(address, retries=3, backoff=0.01) as client:
        done = client.complete("hi", max_new_tokens=2, temperature=0.0, seed=5, stop=["x"])
    assert servicer.calls == 3
    assert done.token_ids == [7, 8] and done.text == "ab" and done.finish_reason == "length"
    assert done.usage.prompt_tokens == 3 and done.usage.time_to_first_token_s == 0.5
    req = servicer.requests[-1]
    assert req.text == "hi" and req.sampling.max_new_tokens == 2
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert req.sampling.seed == 5 and list(req.sampling.stop) == ["x"]
    assert not req.sampling.HasField("top_p")  # unset: the server's default


def test_gives_up_after_the_retries(server):
    servicer, address = server
    servicer.fail_first = 10
    with KuiperClient(address, retries=2, backoff=0.01) as client, pytest.raises(KuiperError) as e:
        client.complete("hi")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "starting up" in e.value.message
    assert servicer.calls == 3


def test_no_retry_once_tokens_arrived(server):
    servicer, address = server
    servicer.fail_after_token = True
    got = []
    with KuiperClient(address, retries=3, backoff=0.01) as client, pytest.raises(KuiperError):
        for chunk in client.generate([1, 2, 3]):
            got.append(chunk)
    assert servicer.calls == 1  # a retry would repeat tokens the caller already has
    assert [c.token_ids for c in got] == [[7]]
    assert list(servicer.requests[0].token_ids.ids) == [1, 2, 3]


def test_deadline(server):
    servicer, address = server
    servicer.slow = True
    with KuiperClient(address, timeout=0.5) as client, pytest.raises(KuiperError) as e:
        client.complete("hi")
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_errors_map_to_kuiper_error(server):
    _, address = server
    with KuiperClient(address) as client, pytest.raises(KuiperError) as e:
        client.model_info()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message == "nope"


def test_async_client_retries_and_builds_chat(server):
    servicer, address = server
    servicer.fail_first = 1

    async def main():
        async with AsyncKuiperClient(address, retries=2, backoff=0.01) as client:
            text = await client.complete("hi")
            chat = [
                c async for c in client.chat([("system", "s"), {"role": "user", "content": "u"}])
            ]
            return text, chat

    done, chat = asyncio.run(main())
    assert done.text == "ab" and servicer.calls == 2
    assert chat[-1].finish_reason == "eos"
    msgs = servicer.requests[-1].messages
    assert [(m.role, m.content) for m in msgs] == [("system", "s"), ("user", "u")]


@pytest.mark.parametrize(
    "sampling, field",
    [
        (dict(max_new_tokens=-5), "max_new_tokens"),
        (dict(max_new_tokens=2**32), "max_new_tokens"),  # uint32 in the proto
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),  # uint64
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(logprobs=-1), "logprobs"),
        (dict(top_k=2**31), "top_k"),  # int32
    ],
)
def test_values_the_proto_cannot_hold_are_invalid_argument(server, sampling, field):
    servicer, address = server
    with KuiperClient(address, timeout=10) as client, pytest.raises(KuiperError) as err:
        list(client.generate("hi", **sampling))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.message
    assert servicer.calls == 0  # refused before any RPC
    # The largest values the fields hold still go through.
    with KuiperClient(address, timeout=10) as client:
        list(client.generate("hi", max_new_tokens=2**32 - 1, seed=2**64 - 1, top_k=-1))
    assert servicer.requests[-1].sampling.seed == 2**64 - 1


def test_cli_generate_reports_a_bad_value_in_one_line(server, capsys):
    from kuiper_serve.cli.main import main

    _, address = server
    assert main(["generate", "--address", address, "--max-new-tokens", "-5", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kuiper generate: INVALID_ARGUMENT: max_new_tokens"), err
    assert "\n" not in err and "Traceback" not in err


def test_cli_generate_ctrl_c_prints_what_came_and_exits_130(server, capsys, monkeypatch):
    from kuiper_client.client import GenerateChunk

    from kuiper_serve.cli.main import main

    def interrupted(self, prompt, **kwargs):
        yield GenerateChunk(token_ids=[7], text="a")
        raise KeyboardInterrupt

    monkeypatch.setattr(KuiperClient, "generate", interrupted)
    _, address = server
    assert main(["generate", "--address", address, "--json", "hi"]) == 130
    out = capsys.readouterr()
    assert '"text": "a"' in out.out and '"finish_reason": "cancelled"' in out.out
    assert out.err == ""


def test_cli_generate_says_what_to_do_when_no_inference_service_answers(capsys):
    from kuiper_serve.cli.main import main

    empty = grpc.server(futures.ThreadPoolExecutor(1))  # serves no service: UNIMPLEMENTED
    port = empty.add_insecure_port("127.0.0.1:0")
    empty.start()
    try:
        assert main(["generate", "--address", f"127.0.0.1:{port}", "hi"]) == 1
        assert "is not an inference service" in capsys.readouterr().err
    finally:
        empty.stop(0)
    # Nothing listens there any more: the port is refused.
    assert main(["generate", "--address", f"127.0.0.1:{port}", "hi"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "`kuiper up` starts it" in err


def test_cli_generate_stdin_prompt_drops_the_trailing_newline(server, capsys, monkeypatch):
    import io

    from kuiper_serve.cli.main import main

    servicer, address = server
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n"))  # echo ... | kuiper
    assert main(["generate", "--address", address, "-"]) == 0
    assert servicer.requests[-1].text == "Once upon a time"
    assert capsys.readouterr().out == "ab\n"


def test_cli_timeout_zero_means_none_and_negative_is_refused(server, capsys):
    from kuiper_serve.cli.main import main

    servicer, address = server
    assert main(["generate", "--address", address, "--timeout", "0", "hi"]) == 0
    assert capsys.readouterr().out == "ab\n"  # not DEADLINE_EXCEEDED at once
    calls = servicer.calls
    assert main(["generate", "--address", address, "--timeout", "-1", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "kuiper generate: --timeout must be >= 0 seconds (0: none), got -1.0"
    assert servicer.calls == calls


def test_cli_chat_refuses_a_flag_the_request_cannot_carry_once(server, capsys, monkeypatch):
    import io

    from kuiper_serve.cli.main import main

    servicer, address = server
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\nthree\n"))
    assert main(["chat", "--address", address, "--seed", "-1"]) == 2
    out = capsys.readouterr()
    assert out.err.strip().startswith("kuiper chat: INVALID_ARGUMENT: seed must be")
    assert len(out.err.strip().splitlines()) == 1 and out.out == ""
    assert servicer.requests == []


# ---- the tokenizer side: addresses, str vs list, DecodeStream, health -------------------------


class ScriptedTokenizer(tgrpc.TokenizerServiceServicer):
    """Ids are code points; ids >= 1000 are outside the 'vocabulary'."""

    def __init__(self):
        self.requests: list = []

    def Encode(self, request, context):
        self.requests.append(request)
        return tpb.EncodeResponse(
            results=[tpb.TokenIds(ids=[ord(c) for c in t]) for t in request.texts]
        )

    def Decode(self, request, context):
        self.requests.append(request)
        return tpb.DecodeResponse(texts=["".join(map(chr, s.ids)) for s in request.sequences])

    def DecodeStream(self, request_iterator, context):
        for req in request_iterator:
            self.requests.append(req)
            for s in req.sequences:
                if any(i >= 1000 for i in s.ids):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"id out of range in {s.sequence_id}"
                    )
            yield tpb.DecodeStreamResponse(
                deltas=[tpb.SequenceDelta(sequence_id=s.sequence_id, text="".join(map(chr, s.ids)))
                        for s in req.sequences]
            )  # fmt: skip


@pytest.fixture
def tokenizer_server():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = ScriptedTokenizer()
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    tgrpc.add_TokenizerServiceServicer_to_server(servicer, srv)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}", checker
    srv.stop(0)


@pytest.mark.parametrize(
    "address, tokenizer",
    [
        ("localhost:50051", "localhost:50052"),
        ("gpu-box.example:7000", "gpu-box.example:50052"),  # the same host, not localhost
        ("10.1.2.3:50051", "10.1.2.3:50052"),
        ("[::1]:50051", "[::1]:50052"),
        ("dns:///svc.ns:50051", "dns:///svc.ns:50052"),
        ("unix:/run/kuiper.sock", "localhost:50052"),
    ],
)
def test_the_tokenizer_address_follows_the_inference_host(address, tokenizer):
    from kuiper_client import tokenizer_address_for

    assert tokenizer_address_for(address) == tokenizer
    client = KuiperClient(address)
    try:
        assert client.tokenizer_address == tokenizer
        assert (
            KuiperClient(address, tokenizer_address="elsewhere:1").tokenizer_address
            == "elsewhere:1"
        )
    finally:
        client.close()


def test_encode_and_decode_take_one_item_or_a_batch(tokenizer_server):
    servicer, address, _ = tokenizer_server
    with KuiperClient("127.0.0.1:1", tokenizer_address=address, timeout=10) as client:
        assert client.encode("hi") == [104, 105]  # one text, not one request per character
        assert list(servicer.requests[-1].texts) == ["hi"]
        assert client.encode(["hi", "yo"]) == [[104, 105], [121, 111]]
        assert client.decode([104, 105]) == "hi"
        assert client.decode([[104], [105]]) == ["h", "i"]
        assert client.decode([]) == ""
        for bad in (lambda: client.encode(["ok", 5]), lambda: client.decode("hi"),
                    lambda: client.decode([1, -1])):  # fmt: skip
            with pytest.raises(KuiperError) as err:
                bad()
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    async def run():
        async with AsyncKuiperClient("127.0.0.1:1", tokenizer_address=address) as client:
            return await client.encode("hi"), await client.decode([[104], [105]])

    assert asyncio.run(run()) == ([104, 105], ["h", "i"])


def test_decode_stream_sends_context_once_and_fails_for_good(tokenizer_server):
    from kuiper_client import SequenceIds

    servicer, address, _ = tokenizer_server
    with KuiperClient("127.0.0.1:1", tokenizer_address=address, timeout=10) as client:
        with client.decode_stream() as stream:
            assert stream.push([104], context_ids=[1, 2]) == "h"
            assert stream.push([105], context_ids=[1, 2]) == "i"
            assert stream.finish() == ""
            deltas = stream.send([SequenceIds(7, [97]), SequenceIds(2**64 - 1, [98])])
            assert [(d.sequence_id, d.text) for d in deltas] == [(7, "a"), (2**64 - 1, "b")]
            sent = [s for r in servicer.requests for s in r.sequences]
            assert list(sent[0].context_ids) == [1, 2] and list(sent[1].context_ids) == []
            assert sent[2].finished
            with pytest.raises(KuiperError) as first:
                stream.push([5000], sequence_id=3)
            assert first.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(KuiperError) as later:
                stream.push([1])
            assert later.value is first.value
        with pytest.raises(KuiperError):  # refused before the call: uint64
            client.decode_stream().send([SequenceIds(-1)])

    async def run():
        client = AsyncKuiperClient("127.0.0.1:1", tokenizer_address=address)
        async with client, client.decode_stream() as stream:
            text = await stream.push([104]) + await stream.finish([105])
            with pytest.raises(KuiperError) as err:
                await stream.push([5000])
            return text, err.value.code

    assert asyncio.run(run()) == ("hi", grpc.StatusCode.INVALID_ARGUMENT)


def test_health_and_wait_until_serving(tokenizer_server):
    from grpc_health.v1 import health_pb2

    _, address, checker = tokenizer_server
    with KuiperClient("127.0.0.1:1", tokenizer_address=address, timeout=5) as client:
        assert client.health("tokenizer") == "NOT_SERVING"
        with pytest.raises(KuiperError) as err:
            client.wait_until_serving(timeout=0.3, servers=["tokenizer"])
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "NOT_SERVING" in str(
            err.value
        )
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        client.wait_until_serving(timeout=5, servers=["tokenizer"])
        with pytest.raises(KuiperError) as err:
            client.health("inference", timeout=1)  # nothing listens at 127.0.0.1:1
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError):
            client.health("gpu")


# ---- CLI rough edges (issue 17) -------------------------------------------------------------


def test_cli_encode_stdin_drops_the_trailing_newline_like_generate(tokenizer_server, capsys,
                                                                   monkeypatch):  # fmt: skip
    import io

    from kuiper_serve.cli.main import main

    servicer, address, _ = tokenizer_server
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))  # echo hi | kuiper encode -
    assert main(["encode", "--address", address, "-"]) == 0
    assert list(servicer.requests[-1].texts) == ["hi"]
    assert capsys.readouterr().out.strip() == "[104, 105]"


def test_cli_chat_ctrl_c_stops_the_answer_not_the_chat(server, capsys, monkeypatch):
    import io

    from kuiper_serve.cli.main import main

    servicer, address = server
    real_chat = KuiperClient.chat
    calls = []

    def chat(self, messages, **kw):
        calls.append(list(messages))
        if len(calls) == 1:  # the first answer: one chunk, then Ctrl-C
            yield from (GenerateChunk([1], "par"),)
            raise KeyboardInterrupt
        yield from real_chat(self, messages, **kw)

    monkeypatch.setattr(KuiperClient, "chat", chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert main(["chat", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "> one\npar [interrupted]\n" in out and out.endswith("> two\nok\n")
    # The chat went on with the partial answer in its history.
    assert calls[1] == [("user", "one"), ("assistant", "par"), ("user", "two")]


def test_cli_logprobs_needs_json(server, capsys):
    from kuiper_serve.cli.main import main

    servicer, address = server
    assert main(["generate", "--address", address, "--logprobs", "2", "hi"]) == 2
    assert "add --json" in capsys.readouterr().err and servicer.calls == 0


def test_cli_suggests_tls_when_localhost_refuses_on_one_address_but_another_listens():
    """grpc names only the last address it tried: for localhost that can be ::1 (refused)
    while 127.0.0.1 listens with TLS. A refused message with a listener means: TLS."""
    import socket

    from kuiper_serve.cli.remote import explain

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        refused = KuiperError(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNAVAILABLE: "
            f"ipv6:%5B::1%5D:{port}: Connection refused",
        )
        assert "speak TLS? pass --tls-ca PEM or --tls" in explain(refused, f"localhost:{port}")
    assert "`kuiper up` starts it" in explain(refused, f"localhost:{port}")  # nothing listens
