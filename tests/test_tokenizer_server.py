"""The tokenizer service through the real gRPC server, run as a subprocess on a loopback port.

Oracles: the reference libraries (`tokenizers`, `sentencepiece`) for the tiny trained models,
our in-process library (itself checked against transformers in test_tokenizer.py) for SmolLM2,
transformers for chat templates, and one-shot Decode for DecodeStream.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import threading
import time
import urllib.request
from queue import Queue

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kuiper.v1 import tokenizer_pb2 as pb
from kuiper.v1 import tokenizer_pb2_grpc
from servers import free_port, health_status, kuiper_command, server_env, start_server
from tokenizer_models import (
    SAMPLE_TEXTS,
    build_hf_bpe,
    build_sentencepiece,
    corpus_lines,
    text_strategy,
    transformers_gguf_tokenizer,
)

from tokenizer_service.tokenizer import load_tokenizer

SERVICE = "kuiper.v1.TokenizerService"
KINDS = ["hf", "sp_unigram", "sp_bpe", "smollm2"]


class Served:
    """One running server plus the oracle for its model."""

    def __init__(self, kind, path, server, metrics_port):
        self.kind = kind
        self.path = path
        self.server = server
        self.metrics_port = metrics_port
        self.channel = grpc.insecure_channel(server.address)
        self.stub = tokenizer_pb2_grpc.TokenizerServiceStub(self.channel)
        self.tok = load_tokenizer(path)  # our library, for ids like eos
        # sentencepiece's decode always drops control tokens: compare with skipping on.
        self.skip = kind.startswith("sp_")
        if kind == "hf":
            from tokenizers import Tokenizer

            raw = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.encode = lambda t: raw.encode(t).ids
            self.decode = lambda ids: raw.decode(ids, skip_special_tokens=False)
        elif kind.startswith("sp_"):
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(path))
            self.encode = lambda t: [sp.bos_id(), *sp.encode(t)]
            self.decode = sp.decode
        else:  # SmolLM2: our library, checked against transformers in test_tokenizer.py
            self.encode = self.tok.encode
            self.decode = self.tok.decode


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_gguf):
    root = tmp_path_factory.mktemp("served")
    paths = {
        "hf": build_hf_bpe(root / "hf"),
        "sp_unigram": build_sentencepiece(root / "spu", "unigram"),
        "sp_bpe": build_sentencepiece(root / "spb", "bpe"),
        "smollm2": smollm2_gguf,
    }
    started = {}
    try:
        for kind, path in paths.items():  # start all, then wait: they load side by side
            port, metrics_port = free_port(), free_port()
            # SmolLM2 is the default model: that server is started with no --model at all.
            model = [] if kind == "smollm2" else ["--model", str(path)]
            args = kuiper_command(
                "serve-tokenizer", *model, "--port", str(port),
                "--metrics-port", str(metrics_port), "--grace", "5",
            )  # fmt: skip
            started[kind] = (start_server(args, port, wait=False), metrics_port)
        result = {}
        for kind, (server, metrics_port) in started.items():
            server.wait_ready(timeout=90)
            result[kind] = Served(kind, paths[kind], server, metrics_port)
        yield result
        for s in result.values():
            s.channel.close()
        for server, _ in started.values():
            assert server.stop() == 0, server.log_text()
    finally:
        for server, _ in started.values():
            server.kill()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---- health, reflection, info ---------------------------------------------------------------


def test_health_serving(served):
    for s in served.values():
        for service in ("", SERVICE):
            assert (
                health_status(s.server.address, service) == health_pb2.HealthCheckResponse.SERVING
            )
        # A service it does not serve is unknown to health.
        assert health_status(s.server.address, "no.such.Service") is None


def test_reflection_lists_and_describes_the_service(served):
    s = served["sp_bpe"]
    stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    replies = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {svc.name for svc in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[1].file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        m.name
        for f in files
        for svc in f.service
        if svc.name == "TokenizerService"
        for m in svc.method
    }
    assert methods == {"Encode", "Decode", "DecodeStream", "ApplyChatTemplate", "GetTokenizerInfo"}


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_info(served, kind):
    s = served[kind]
    info = s.stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest(), timeout=10)
    tok = s.tok
    assert info.vocab_size == tok.vocab_size
    assert (info.bos_id if info.HasField("bos_id") else None) == tok.bos_id
    assert (info.eos_id if info.HasField("eos_id") else None) == tok.eos_id
    assert (info.pad_id if info.HasField("pad_id") else None) == tok.pad_id
    assert {t.id: t.content for t in info.special_tokens} == tok.special_tokens
    assert list(info.stop_ids) == tok.stop_ids
    assert info.has_chat_template == (tok.chat_template is not None)
    assert info.backend == {"hf": "hf-tokenizers", "smollm2": "gguf"}.get(kind, "sentencepiece")
    # With no --model the server loads the default model, from the cache the fixture filled.
    assert info.source == str(s.path)
    if kind.startswith("sp_"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(s.path))
        assert info.vocab_size == sp.get_piece_size()
        assert (info.bos_id, info.eos_id) == (sp.bos_id(), sp.eos_id())


# ---- Encode / Decode against the libraries --------------------------------------------------


def check_encode_decode(s, texts: list[str], timeout: float) -> None:
    """Encode then Decode `texts` through the server; both must match the library's own."""
    reply = s.stub.Encode(pb.EncodeRequest(texts=texts), timeout=timeout)
    got = [list(r.ids) for r in reply.results]
    assert got == [s.encode(t) for t in texts]
    decoded = s.stub.Decode(
        pb.DecodeRequest(sequences=reply.results, skip_special_tokens=s.skip), timeout=timeout
    )
    assert list(decoded.texts) == [s.decode(ids) for ids in got]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_library(served, kind):
    check_encode_decode(served[kind], SAMPLE_TEXTS + corpus_lines(150, seed=11), timeout=30)


def test_encode_without_special_tokens(served):
    s = served["sp_unigram"]
    with_bos = s.stub.Encode(pb.EncodeRequest(texts=["hello world"]), timeout=10)
    without = s.stub.Encode(
        pb.EncodeRequest(texts=["hello world"], add_special_tokens=False), timeout=10
    )
    assert list(with_bos.results[0].ids) == s.encode("hello world")
    assert list(without.results[0].ids) == s.encode("hello world")[1:]  # no BOS


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_random_text(served, kind):
    s = served[kind]

    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(texts=st.lists(text_strategy, min_size=1, max_size=12))
    def check(texts):
        check_encode_decode(s, texts, timeout=10)

    check()


# ---- DecodeStream ---------------------------------------------------------------------------


def _prefix_stream_requests(seqs, skip=False, per_message=256):
    """Messages that feed, for every id list in `seqs`, every prefix as its own sequence, one
    id per message, all multiplexed on one stream. Returns (requests, {sequence_id: ids})."""
    wanted, steps = {}, []
    for n, ids in enumerate(seqs):
        for k in range(len(ids) + 1):
            wanted[(n << 16) | k] = ids[:k]
    longest = max(len(ids) for ids in wanted.values())
    for t in range(longest + 1):
        step = []
        for sid, ids in wanted.items():
            if t > len(ids):
                continue
            step.append(
                pb.SequenceIds(
                    sequence_id=sid,
                    ids=ids[t - 1 : t] if t else [],
                    skip_special_tokens=skip,
                    finished=t == len(ids),
                )
            )
        steps.extend(step[i : i + per_message] for i in range(0, len(step), per_message))
    return [pb.DecodeStreamRequest(sequences=m) for m in steps], wanted


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [False, True])
def test_decode_stream_equals_decode_for_every_prefix(served, kind, skip):
    s = served[kind]
    texts = SAMPLE_TEXTS + ["🇫🇷👍🏽中文\u00e9 end", "\u00a0x\u0301 😀😀"]
    encoded = s.stub.Encode(pb.EncodeRequest(texts=texts), timeout=10).results
    seqs = [[*r.ids, s.tok.eos_id] for r in encoded]
    requests, wanted = _prefix_stream_requests(seqs, skip=skip)
    text = {sid: "" for sid in wanted}
    for reply, request in zip(
        s.stub.DecodeStream(iter(requests), timeout=60), requests, strict=True
    ):
        # One delta per sequence of the request, in order.
        assert [d.sequence_id for d in reply.deltas] == [q.sequence_id for q in request.sequences]
        for d in reply.deltas:
            text[d.sequence_id] += d.text
    order = list(wanted)
    oneshot = s.stub.Decode(
        pb.DecodeRequest(
            sequences=[pb.TokenIds(ids=wanted[sid]) for sid in order], skip_special_tokens=skip
        ),
        timeout=30,
    )
    for sid, expected in zip(order, oneshot.texts, strict=True):
        assert text[sid] == expected, (sid, wanted[sid])


def test_decode_stream_context_ids(served):
    s = served["smollm2"]
    prompt = s.tok.encode("The capital of France is", add_special_tokens=False)
    full = s.tok.encode("The capital of France is Paris.", add_special_tokens=False)
    generated = full[len(prompt) :]
    requests = [
        pb.DecodeStreamRequest(
            sequences=[pb.SequenceIds(sequence_id=7, ids=[generated[0]], context_ids=prompt)]
        ),
        *[
            pb.DecodeStreamRequest(sequences=[pb.SequenceIds(sequence_id=7, ids=[i])])
            for i in generated[1:]
        ],
        pb.DecodeStreamRequest(sequences=[pb.SequenceIds(sequence_id=7, finished=True)]),
    ]
    deltas = [r.deltas[0].text for r in s.stub.DecodeStream(iter(requests), timeout=10)]
    assert "".join(deltas) == s.tok.decode(full)[len(s.tok.decode(prompt)) :] == " Paris."


def test_decode_stream_bad_ids_end_only_that_stream(served):
    """A stream that sends an out-of-range id gets INVALID_ARGUMENT; another stream open at
    the same time keeps its state and goes on producing correct text."""
    s = served["sp_bpe"]
    ids = s.encode("hello world 中文 done")
    good_in: Queue = Queue()
    good_out = s.stub.DecodeStream(iter(good_in.get, None), timeout=30)
    text = ""
    half = len(ids) // 2
    first = pb.SequenceIds(sequence_id=1, ids=ids[:half], skip_special_tokens=True)
    good_in.put(pb.DecodeStreamRequest(sequences=[first]))
    text += next(good_out).deltas[0].text

    bad = [pb.DecodeStreamRequest(sequences=[pb.SequenceIds(sequence_id=1, ids=[10**6])])]
    err = _code(lambda: list(s.stub.DecodeStream(iter(bad), timeout=10)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence_id 1" in err.details() and "1000000" in err.details()

    good_in.put(
        pb.DecodeStreamRequest(
            sequences=[pb.SequenceIds(sequence_id=1, ids=ids[half:], finished=True)]
        )
    )
    text += next(good_out).deltas[0].text
    good_in.put(None)
    assert list(good_out) == []
    assert text == s.decode(ids)


# ---- chat template ------------------------------------------------------------------------


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi! 中文 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


@pytest.mark.parametrize("kind", ["hf", "smollm2"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_apply_chat_template_matches_transformers(served, kind, add_generation_prompt):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    s = served[kind]
    if kind == "hf":
        hf = transformers.AutoTokenizer.from_pretrained(str(s.path))
    else:
        hf = transformers_gguf_tokenizer(s.path)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        reply = s.stub.ApplyChatTemplate(
            pb.ChatTemplateRequest(
                messages=[pb.ChatMessage(**m) for m in messages],
                add_generation_prompt=add_generation_prompt,
            ),
            timeout=10,
        )
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert reply.text == expected
        assert list(reply.ids) == hf.encode(expected, add_special_tokens=False)


# ---- bad input ----------------------------------------------------------------------------


def _raw_call(channel, method, payload: bytes, timeout=10):
    call = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
    )
    return call(payload, timeout=timeout)


def test_bad_input_is_invalid_argument_and_server_keeps_serving(served):
    s = served["sp_unigram"]
    vocab = s.tok.vocab_size
    cases = [
        (lambda: s.stub.Decode(pb.DecodeRequest(sequences=[pb.TokenIds(ids=[1, vocab])])), f"{vocab}"),
        (lambda: s.stub.Decode(pb.DecodeRequest()), "sequences is empty"),
        (lambda: s.stub.Encode(pb.EncodeRequest()), "texts is empty"),
        (lambda: s.stub.Encode(pb.EncodeRequest(texts=["x"] * 1025)), "limit is 1024"),
        (lambda: s.stub.Encode(pb.EncodeRequest(texts=["x" * (1 << 20 | 1)])), "characters"),
        (lambda: s.stub.ApplyChatTemplate(pb.ChatTemplateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")])), "no chat template"),
        # Field 1 (texts) holding bytes that are not UTF-8.
        (lambda: _raw_call(s.channel, "Encode", b"\x0a\x02\xff\xfe"), "UTF-8"),
        # 17 MiB: over the 16 MiB request limit, under gRPC's own transport limit.
        (lambda: _raw_call(s.channel, "Encode", b"\x0a\x80\x80\x80\x08" + b"a" * (17 << 20)),
         "exceeds the limit"),
    ]  # fmt: skip

    def stream(*sequences):
        request = pb.DecodeStreamRequest(sequences=list(sequences))
        return lambda: list(s.stub.DecodeStream(iter([request]), timeout=10))

    cases += [
        (stream(*[pb.SequenceIds(sequence_id=i) for i in range(1025)]), "limit is 1024"),
        (stream(pb.SequenceIds(sequence_id=5, ids=[1], context_ids=[vocab + 3])), "context_ids"),
    ]
    for call, needle in cases:
        err = _code(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert needle in err.details()
        # ... and the server still answers correctly.
        reply = s.stub.Encode(pb.EncodeRequest(texts=["still fine"]), timeout=10)
        assert list(reply.results[0].ids) == s.encode("still fine")


def test_metrics_count_requests_by_code(served):
    s = served["hf"]
    s.stub.Encode(pb.EncodeRequest(texts=["a"]), timeout=10)
    _code(lambda: s.stub.Decode(pb.DecodeRequest(), timeout=10))

    def counts():
        url = f"http://127.0.0.1:{s.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        found = {}
        for line in body.splitlines():
            if line.startswith("kuiper_tokenizer_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                found[labels] = float(value)
        return found, body

    def settled(ready) -> tuple[dict, str]:
        # A refused call is counted after context.abort() has sent its status, so a scrape
        # right after the client sees the error can miss it: scrape until it shows (bounded).
        deadline = time.monotonic() + 10
        found, body = counts()
        while not ready(found) and time.monotonic() < deadline:
            time.sleep(0.05)
            found, body = counts()
        return found, body

    ok = 'kuiper_tokenizer_requests_total{code="OK",method="Encode"}'
    bad = 'kuiper_tokenizer_requests_total{code="INVALID_ARGUMENT",method="Decode"}'
    before, body = settled(lambda f: f.get(ok, 0) >= 1 and f.get(bad, 0) >= 1)
    assert before[ok] >= 1 and before[bad] >= 1
    assert "kuiper_tokenizer_request_seconds_bucket" in body
    s.stub.Encode(pb.EncodeRequest(texts=["b"]), timeout=10)
    after, _ = settled(lambda f: f.get(ok, 0) >= before[ok] + 1)
    assert after[ok] == before[ok] + 1


# ---- lifecycle ----------------------------------------------------------------------------


def test_sigterm_drains_an_open_stream_then_exits_zero(served):
    """SIGTERM: new calls are refused, an in-flight DecodeStream finishes, exit code 0."""
    model = served["sp_bpe"].path
    port = free_port()
    args = kuiper_command(
        "serve-tokenizer", "--model", str(model), "--port", str(port), "--metrics-port", "-1",
        "--grace", "20",
    )  # fmt: skip
    with start_server(args, port) as server, grpc.insecure_channel(server.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        ids = served["sp_bpe"].encode("draining works")
        requests: Queue = Queue()
        replies = stub.DecodeStream(iter(requests.get, None), timeout=30)
        first = pb.SequenceIds(sequence_id=3, ids=ids[:2], skip_special_tokens=True)
        requests.put(pb.DecodeStreamRequest(sequences=[first]))
        text = next(replies).deltas[0].text

        server.proc.send_signal(signal.SIGTERM)
        # New calls are refused while draining ...
        refused = threading.Event()

        def probe():
            while server.proc.poll() is None:
                try:
                    with grpc.insecure_channel(server.address) as ch:
                        tokenizer_pb2_grpc.TokenizerServiceStub(ch).GetTokenizerInfo(
                            pb.GetTokenizerInfoRequest(), timeout=5
                        )
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        refused.set()
                        return

        prober = threading.Thread(target=probe)
        prober.start()
        prober.join(15)
        assert refused.is_set()
        # ... while the open stream still works.
        requests.put(
            pb.DecodeStreamRequest(
                sequences=[pb.SequenceIds(sequence_id=3, ids=ids[2:], finished=True)]
            )
        )
        text += next(replies).deltas[0].text
        requests.put(None)
        assert list(replies) == []
        assert text == served["sp_bpe"].decode(ids)
        # The one SIGTERM above ends it: a second one (server.stop) could land in the instant
        # asyncio hands the signal back to its default action, and kill a clean exit.
        assert server.proc.wait(30) == 0, server.log_text()
    assert "draining" in server.log_text()


def test_sigint_also_exits_zero(served):
    port = free_port()
    args = kuiper_command(
        "serve-tokenizer", "--model", str(served["sp_unigram"].path), "--port", str(port),
        "--metrics-port", "-1",
    )  # fmt: skip
    with start_server(args, port) as server:
        assert server.stop(signal.SIGINT) == 0, server.log_text()


def test_port_in_use_is_a_clear_error(served):
    taken = served["sp_unigram"].server.port
    args = kuiper_command(
        "serve-tokenizer", "--model", str(served["sp_unigram"].path), "--port", str(taken),
        "--metrics-port", "-1",
    )  # fmt: skip
    result = subprocess.run(args, env=server_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_bad_model_is_a_clear_error(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF-not-really")
    args = kuiper_command(
        "serve-tokenizer", "--model", str(junk), "--port", str(free_port()), "--metrics-port", "-1"
    )
    result = subprocess.run(args, env=server_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot load the tokenizer" in result.stderr and "Traceback" not in result.stderr


# ---- CLI ------------------------------------------------------------------------------------


def _kuiper(*args, timeout=60):
    return subprocess.run(
        kuiper_command(*args), env=server_env(), capture_output=True, text=True, timeout=timeout
    )


def test_cli_encode_decode(served):
    s = served["smollm2"]
    text = "Hello, world! 中文 😀"
    result = _kuiper("encode", "--address", s.server.address, text)
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)
    assert ids == s.tok.encode(text)
    result = _kuiper("decode", "--address", s.server.address, *map(str, ids))
    assert result.returncode == 0, result.stderr
    assert result.stdout == s.tok.decode(ids) + "\n"
    no_special = _kuiper(
        "encode", "--no-special-tokens", "--address", s.server.address, "<|im_end|>x"
    )
    assert json.loads(no_special.stdout) == s.tok.encode("<|im_end|>x", add_special_tokens=False)
    skipped = _kuiper("decode", "--skip-special-tokens", "--address", s.server.address, "2", "104")
    assert skipped.stdout == s.tok.decode([2, 104], skip_special_tokens=True) + "\n"


def test_cli_errors_are_one_readable_line():
    dead = f"127.0.0.1:{free_port()}"
    result = _kuiper("encode", "--address", dead, "hi")
    assert result.returncode == 1
    assert "cannot reach the tokenizer service" in result.stderr
    assert "Traceback" not in result.stderr
    result = _kuiper("decode", "--address", dead, "12", "abc")
    assert result.returncode == 2 and "not a token id" in result.stderr


def test_cli_help_explains_every_command():
    result = _kuiper("--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    from kuiper_serve.cli.main import build_parser

    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for command, option in (("serve-tokenizer", "--model"), ("encode", "--address"),
                            ("decode", "--skip-special-tokens")):  # fmt: skip
        # Listed with a one-line explanation (on its line or the next).
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(command))
        assert len(" ".join(lines[at : at + 2]).split()) > 4
        sub_help = subparsers.choices[command].format_help()
        assert option in sub_help
        # Every option of the command has its own explanation.
        for action in subparsers.choices[command]._actions:
            assert action.help, (command, action.dest)


# ---- TLS and bearer token -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from servers import self_signed_cert

    return self_signed_cert(tmp_path_factory.mktemp("tls"))


def test_tls_and_bearer_token(served, tls_files):
    cert, key = tls_files
    s = served["sp_bpe"]
    port = free_port()
    token = "s3cret-token"
    args = kuiper_command(
        "serve-tokenizer", "--model", str(s.path), "--port", str(port), "--metrics-port", "-1",
        "--tls-cert", str(cert), "--tls-key", str(key),
    )  # fmt: skip
    env = server_env({"KUIPER_AUTH_TOKEN": token})
    tls = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    # Health answers without the token (probes), over TLS.
    with start_server(args, port, env=env, credentials=tls) as server:
        with grpc.secure_channel(server.address, tls) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            request = pb.EncodeRequest(texts=["secure hello"])
            err = _code(lambda: stub.Encode(request, timeout=10))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            wrong = (("authorization", "Bearer nope"),)
            err = _code(lambda: stub.Encode(request, timeout=10, metadata=wrong))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            stream = [pb.DecodeStreamRequest(sequences=[pb.SequenceIds(sequence_id=1, ids=[5])])]
            err = _code(lambda: list(stub.DecodeStream(iter(stream), timeout=10)))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {token}"),)
            reply = stub.Encode(request, timeout=10, metadata=good)
            assert list(reply.results[0].ids) == s.encode("secure hello")
        # A plaintext client cannot talk to the TLS port.
        with grpc.insecure_channel(server.address) as plain:
            err = _code(
                lambda: tokenizer_pb2_grpc.TokenizerServiceStub(plain).Encode(
                    pb.EncodeRequest(texts=["x"]), timeout=5, metadata=good
                )
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        # The CLI: TLS with our CA, token from the environment or the flag.
        base = ["encode", "--address", f"localhost:{port}", "--tls-ca", str(cert)]
        ok = subprocess.run(
            kuiper_command(*base, "secure hello"), env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == s.encode("secure hello")
        denied = _kuiper(*base, "--auth-token", "wrong", "x")
        assert denied.returncode == 1 and "bearer token" in denied.stderr
        assert "Traceback" not in denied.stderr
        assert server.stop() == 0, server.log_text()


def test_bearer_token_on_plaintext(served):
    s = served["sp_unigram"]
    port = free_port()
    args = kuiper_command(
        "serve-tokenizer", "--model", str(s.path), "--port", str(port), "--metrics-port", "-1",
        "--auth-token", "tok",
    )  # fmt: skip
    with start_server(args, port) as server:
        address = server.address
        assert _kuiper("encode", "--address", address, "hi").returncode == 1
        ok = _kuiper("encode", "--address", address, "--auth-token", "tok", "hi")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == s.encode("hi")
        assert server.stop() == 0
