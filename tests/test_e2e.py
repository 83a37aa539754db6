"""End to end: tokenizer + inference services as subprocesses on loopback, real gRPC clients.

Oracles: `inference_service.llm.LLM` (the same engine in-process: no gRPC, no tokenizer service,
its own in-process tokenizer and stop-string matching) for ids and text, and the `tokenizers`
library for text. The engine itself is checked against HF transformers in test_engine.py and
test_llm.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time

import grpc
import pytest
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper_client import AsyncKuiperClient, KuiperClient, KuiperError
from servers import server_env
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

from inference_service.sampling.params import SamplingParams

PROMPTS = ["hello world", "the quick brown fox", "привет мир", "x=1 f(x) print('hi')"]


@pytest.fixture(scope="module")
def stack(tiny_model):  # noqa: F811
    with run_stack(tiny_model, "--num-kv-blocks", "256", "--block-size", "8") as s:
        yield s


@pytest.fixture(scope="module")
def llm(tiny_model):  # noqa: F811
    from inference_service.llm import LLM

    return LLM(tiny_model, device="cpu")


def oracle(llm, prompt, **kw) -> tuple[list[int], str]:
    params = SamplingParams(**kw)
    chunks = list(llm.generate(prompt, params))
    return [c.token_id for c in chunks], "".join(c.text for c in chunks)


def test_greedy_generate_equals_the_engine_alone(stack, llm):
    from tokenizers import Tokenizer

    ref_tok = Tokenizer.from_file(str(stack.model / "tokenizer.json"))
    with KuiperClient(stack.address, timeout=60) as client:
        for prompt in PROMPTS:
            chunks = list(client.generate(prompt, max_new_tokens=16, temperature=0.0,
                                          ignore_eos=True))  # fmt: skip
            ids = [t for c in chunks for t in c.token_ids]
            text = "".join(c.text for c in chunks)
            want_ids, want_text = oracle(llm, prompt, max_new_tokens=16, temperature=0.0,
                                         ignore_eos=True)  # fmt: skip
            assert ids == want_ids
            assert text == want_text == ref_tok.decode(ids, skip_special_tokens=True)
            # At most one message per engine step (a client or frontend that falls behind
            # gets the tokens ready for it merged into one message).
            assert 1 <= sum(1 for c in chunks if c.token_ids) <= 16
            last = chunks[-1]
            assert last.finish_reason == "length"
            assert last.usage.prompt_tokens == len(llm.encode(prompt))
            assert last.usage.completion_tokens == 16
            assert 0 < last.usage.time_to_first_token_s < 30


def test_token_id_prompt_and_logprobs(stack, llm):
    ids = llm.encode("the lazy dog")
    with KuiperClient(stack.address, timeout=60) as client:
        done = client.complete(ids, max_new_tokens=5, temperature=0.0, ignore_eos=True)
        assert done.token_ids == oracle(llm, ids, max_new_tokens=5, temperature=0.0,
                                        ignore_eos=True)[0]  # fmt: skip
        chunks = list(client.generate(ids, max_new_tokens=3, temperature=0.0, ignore_eos=True,
                                      logprobs=2))  # fmt: skip
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == done.token_ids[:3]
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert math.isclose(lp.top[0][1], lp.logprob, rel_tol=1e-5, abs_tol=1e-6)


def test_16_concurrent_streams_match_each_alone(stack):
    requests = [
        dict(prompt=f"{PROMPTS[i % 4]} {i}", max_new_tokens=10 + i % 5, ignore_eos=True,
             **({"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "seed": 100 + i}))
        for i in range(16)
    ]  # fmt: skip

    async def one(client, req):
        req = dict(req)
        chunks = [c async for c in client.generate(req.pop("prompt"), **req)]
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)

    async def together():
        async with AsyncKuiperClient(stack.address, timeout=120) as client:
            return await asyncio.gather(*(one(client, r) for r in requests))

    async def alone():
        async with AsyncKuiperClient(stack.address, timeout=60) as client:
            return [await one(client, r) for r in requests]

    batched = asyncio.run(together())
    single = asyncio.run(alone())
    assert batched == single
    assert [len(ids) for ids, _ in batched] == [r["max_new_tokens"] for r in requests]
    hist = stack.metrics()
    assert hist.get("kuiper_inference_batch_size_count", 0) > 0
    # Some steps really ran several sequences together.
    assert hist["kuiper_inference_batch_size_sum"] > hist["kuiper_inference_batch_size_count"]


def wait_metric(stack, name, pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = stack.metrics().get(name)
        if value is not None and pred(value):
            return value
        assert time.monotonic() < deadline, f"{name} = {value}"
        time.sleep(0.05)


def test_cancelled_stream_frees_its_kv_blocks(stack):
    wait_metric(stack, "kuiper_inference_kv_blocks_used", lambda v: v == 0)
    channel = grpc.insecure_channel(stack.address)
    stub = igrpc.InferenceServiceStub(channel)
    call = stub.Generate(
        ipb.GenerateRequest(
            text="hello " * 40,
            sampling=ipb.SamplingParams(max_new_tokens=1500, ignore_eos=True, temperature=0.0),
        ),
        timeout=60,
    )
    got = 0
    for resp in call:
        got += len(resp.token_ids)
        if got >= 5:
            break
    assert wait_metric(stack, "kuiper_inference_kv_blocks_used", lambda v: v > 0) > 0
    call.cancel()
    wait_metric(stack, "kuiper_inference_kv_blocks_used", lambda v: v == 0)
    wait_metric(stack, "kuiper_inference_num_requests_running", lambda v: v == 0)
    wait_metric(stack, 'kuiper_inference_requests_total{code="CANCELLED",method="Generate"}',
                lambda v: v >= 1)  # fmt: skip
    channel.close()


def test_deadline_stops_the_sequence(stack):
    with KuiperClient(stack.address, retries=0) as client, pytest.raises(KuiperError) as err:
        for _ in client.generate("hello", max_new_tokens=1800, ignore_eos=True, timeout=0.5):
            pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_metric(stack, "kuiper_inference_kv_blocks_used", lambda v: v == 0)


INVALID = [
    ("empty text", dict(text="")),
    ("no prompt", dict()),
    ("empty ids", dict(token_ids=[])),
    ("ids out of vocabulary", dict(token_ids=[1, 10**6])),
    ("too long", dict(text="hello", max_new_tokens=5000)),
    ("temperature < 0", dict(text="hello", temperature=-0.5)),
    ("temperature NaN", dict(text="hello", temperature=float("nan"))),
    ("top_p 0", dict(text="hello", top_p=0.0)),
    ("top_p > 1", dict(text="hello", top_p=1.5)),
    ("top_p NaN", dict(text="hello", top_p=float("nan"))),
    ("top_k < 0", dict(text="hello", top_k=-1)),
    ("min_p NaN", dict(text="hello", min_p=float("nan"))),
    ("stop id out of vocabulary", dict(text="hello", stop_token_ids=[10**6])),
]


def _request(case: dict) -> ipb.GenerateRequest:
    case = dict(case)
    req = ipb.GenerateRequest()
    if "text" in case:
        req.text = case.pop("text")
    if "token_ids" in case:
        req.token_ids.ids.extend(case.pop("token_ids"))
        req.token_ids.SetInParent()
    for k, v in case.items():
        if isinstance(v, list):
            getattr(req.sampling, k).extend(v)
        else:
            setattr(req.sampling, k, v)
    return req


@pytest.mark.parametrize("case", [c for _, c in INVALID], ids=[n for n, _ in INVALID])
def test_invalid_requests_answer_invalid_argument(stack, case):
    with grpc.insecure_channel(stack.address) as channel:
        stub = igrpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_request(case), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details()  # a message a person can act on
        # ... and the server keeps serving.
        ok = list(stub.Generate(_request(dict(text="hi", max_new_tokens=2)), timeout=30))
        assert ok[-1].finish_reason != ipb.FINISH_REASON_UNSPECIFIED


@pytest.mark.parametrize(
    "messages",
    [[], [("wizard", "hi")], [("user", "hi"), ("", "x")]],
    ids=["no messages", "unknown role", "empty role"],
)
def test_invalid_chat_answers_invalid_argument(stack, messages):
    with KuiperClient(stack.address, timeout=30) as client, pytest.raises(KuiperError) as err:
        list(client.chat(messages, max_new_tokens=2))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_context_length_message_names_the_numbers(stack):
    with KuiperClient(stack.address, timeout=30) as client, pytest.raises(KuiperError) as err:
        list(client.generate("hello", max_new_tokens=5000))
    assert "context length (2048" in err.value.message


def test_chat_equals_the_engine_alone(stack, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with KuiperClient(stack.address, timeout=60) as client:
        done = list(client.chat(messages, max_new_tokens=8, temperature=0.0, ignore_eos=True))
    ids = [t for c in done for t in c.token_ids]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    want = list(llm.chat(messages, params))
    assert ids == [c.token_id for c in want]
    assert "".join(c.text for c in done) == "".join(c.text for c in want)


def test_stop_string_cuts_text_across_deltas(stack, llm):
    prompt = "the quick brown fox"
    ids, text = oracle(llm, prompt, max_new_tokens=30, temperature=0.0, ignore_eos=True)
    # A stop string from the middle of the text, spanning several tokens when possible.
    start = len(text) // 2
    stop = text[start : start + 4]
    assert stop
    with KuiperClient(stack.address, timeout=60) as client:
        chunks = list(client.generate(prompt, max_new_tokens=30, temperature=0.0,
                                      ignore_eos=True, stop=[stop]))  # fmt: skip
    got = "".join(c.text for c in chunks)
    assert got == text[: text.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)


def test_model_info_and_tokenizer_calls(stack, llm):
    with KuiperClient(stack.address, tokenizer_address=stack.tokenizer.address) as client:
        info = client.model_info()
        assert info.architecture == "llama"
        assert info.vocab_size == llm.model.config.vocab_size
        assert info.context_length == 2048
        assert info.kv_blocks_total == 256 and info.kv_block_size == 8
        assert info.device == "cpu"
        ids = client.encode(["hello world"])[0]
        assert ids == llm.encode("hello world")
        assert client.decode([ids], skip_special_tokens=True) == ["hello world"]


def test_generate_and_chat_commands(stack, llm):
    env = server_env()
    kuiper = ["python", "-m", "kuiper_serve.cli"]
    import sys

    kuiper[0] = sys.executable
    out = subprocess.run(
        kuiper + ["generate", "--address", stack.address, "--max-new-tokens", "6",
                  "--temperature", "0", "--ignore-eos", "--json", "hello world"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    want_ids, want_text = oracle(llm, "hello world", max_new_tokens=6, temperature=0.0,
                                 ignore_eos=True)  # fmt: skip
    assert result["token_ids"] == want_ids and result["text"] == want_text

    chat = subprocess.run(
        kuiper + ["chat", "--address", stack.address, "--max-new-tokens", "5", "--temperature",
                  "0", "--ignore-eos"],
        input="hello\nwhat next\n", capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    history = [{"role": "user", "content": "hello"}]
    first = "".join(c.text for c in llm.chat(history, params))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "what next"}]
    second = "".join(c.text for c in llm.chat(history, params))
    assert chat.stdout == f"> hello\n{first}\n> what next\n{second}\n"


def test_reflection_and_health(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    from servers import health_status

    with grpc.insecure_channel(stack.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "kuiper.v1.InferenceService" in services
    assert "grpc.health.v1.Health" in services
    assert health_status(stack.address, "kuiper.v1.InferenceService") == 1  # SERVING


def test_repeated_prompt_reuses_cached_prefix_blocks(stack, llm):
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    n = len(llm.encode(prompt))
    block = 8  # --block-size of this stack
    before = stack.metrics()["kuiper_inference_prefix_cache_hits_total"]
    with KuiperClient(stack.address, timeout=60) as client:
        first = client.complete(prompt, max_new_tokens=4, temperature=0.0, ignore_eos=True)
        second = client.complete(prompt, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert first.token_ids == second.token_ids
    assert first.usage.cached_prompt_tokens == 0
    # Every full block but the one holding the last prompt token comes from the cache.
    assert second.usage.cached_prompt_tokens == (n - 1) // block * block > 0
    hits = stack.metrics()["kuiper_inference_prefix_cache_hits_total"] - before
    assert hits == (n - 1) // block * block  # tokens, as vLLM counts them


def test_stop_token_id_ends_with_stop_and_is_returned(stack, llm):
    ids, _ = oracle(llm, "hello world", max_new_tokens=12, temperature=0.0, ignore_eos=True)
    stop_id = ids[3]
    cut = ids.index(stop_id) + 1
    with KuiperClient(stack.address, timeout=60) as client:
        done = client.complete("hello world", max_new_tokens=12, temperature=0.0,
                               ignore_eos=True, stop_token_ids=[stop_id])  # fmt: skip
    assert done.token_ids == ids[:cut]
    assert done.finish_reason == "stop"
    assert done.usage.completion_tokens == cut
