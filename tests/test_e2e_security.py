"""End to end with TLS and a bearer token: both services as subprocesses on loopback with a
self-signed certificate made here, the token from $KUIPER_AUTH_TOKEN.

Oracles: `inference_service.llm.LLM` (in-process, no gRPC, its own tokenizer) for ids and
text; gRPC's own status codes for the refusals.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper_client import AsyncKuiperClient, KuiperClient, KuiperError
from servers import free_port, health_status, kuiper_command, self_signed_cert, server_env
from serving_stack import INFERENCE_SERVICE, StackSecurity, run_stack, tiny_model  # noqa: F401

from inference_service.sampling.params import SamplingParams
from inference_service.tokenizer_client import TokenizerClient, TokenizerRequestError

TOKEN = "e2e-s3cret"
PROMPT = "hello world"


@pytest.fixture(scope="module")
def security(tmp_path_factory) -> StackSecurity:
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    return StackSecurity(cert, key, TOKEN)


@pytest.fixture(scope="module")
def stack(tiny_model, security):  # noqa: F811
    with run_stack(tiny_model, "--num-kv-blocks", "64", "--block-size", "8",
                   security=security) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def llm(tiny_model):  # noqa: F811
    from inference_service.llm import LLM

    return LLM(tiny_model, device="cpu")


def oracle(llm, prompt: str, **kw) -> tuple[list[int], str]:
    chunks = list(llm.generate(prompt, SamplingParams(**kw)))
    return [c.token_id for c in chunks], "".join(c.text for c in chunks)


def secure_client(stack, security, token: str | None = TOKEN, **kw) -> KuiperClient:
    return KuiperClient(stack.address, stack.tokenizer.address, timeout=60,
                        tls_ca=security.cert, token=token, **kw)  # fmt: skip


def test_tls_and_token_generate_equals_the_engine_alone(stack, security, llm):
    """Text prompt: the inference service had to reach the tokenizer over TLS with the token."""
    want_ids, want_text = oracle(llm, PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with secure_client(stack, security) as client:
        done = client.complete(PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        assert (done.token_ids, done.text) == (want_ids, want_text)
        assert client.encode([PROMPT]) == [llm.encode(PROMPT)]
        assert client.decode([want_ids], skip_special_tokens=True) == [want_text]
        assert client.model_info().kv_blocks_total == 64

    async def run_async() -> list[int]:
        async with AsyncKuiperClient(stack.address, timeout=60, tls_ca=str(security.cert),
                                     token=TOKEN) as client:  # fmt: skip
            done = await client.complete(PROMPT, max_new_tokens=8, temperature=0.0,
                                         ignore_eos=True)  # fmt: skip
            return done.token_ids

    assert asyncio.run(run_async()) == want_ids


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_missing_or_wrong_token_is_unauthenticated(stack, security, token):
    with secure_client(stack, security, token=token) as client:
        for call in (
            lambda: client.complete(PROMPT, max_new_tokens=2),
            lambda: list(client.chat([("user", "hi")], max_new_tokens=2)),
            client.model_info,
            lambda: client.encode([PROMPT]),
        ):
            with pytest.raises(KuiperError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.message


def test_plaintext_client_against_tls_is_unavailable(stack):
    client = KuiperClient(stack.address, timeout=10, token=TOKEN, retries=0)
    with client, pytest.raises(KuiperError) as err:
        client.complete(PROMPT, max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_cli_plaintext_against_tls_suggests_tls(stack, capsys):
    from kuiper_serve.cli.main import main

    assert main(["generate", "--address", stack.address, "--token", TOKEN, "hi"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "speak TLS? pass --tls-ca PEM or --tls" in err
    assert main(["encode", "--address", stack.tokenizer.address, "--token", TOKEN, "hi"]) == 1
    assert "Does it speak TLS? Pass --tls-ca PEM or --tls." in capsys.readouterr().err


def test_health_and_reflection_need_no_token(stack, security):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    creds = security.credentials()
    assert health_status(stack.address, INFERENCE_SERVICE, 5.0, creds) == 1  # SERVING
    assert health_status(stack.tokenizer.address, "", 5.0, creds) == 1
    with grpc.secure_channel(stack.address, creds) as channel:
        assert INFERENCE_SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()
        # The same channel without the token is refused for the service itself.
        with pytest.raises(grpc.RpcError) as err:
            igrpc.InferenceServiceStub(channel).GetModelInfo(ipb.GetModelInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokenizer_client_sends_its_token(stack, security, llm):
    """The inference service's side of the tokenizer service, right and wrong token."""

    async def encode(token: str) -> list[int]:
        client = TokenizerClient(stack.tokenizer.address, tls_ca=security.cert, token=token)
        try:
            return await client.encode(PROMPT)
        finally:
            await client.close()

    assert asyncio.run(encode(TOKEN)) == llm.encode(PROMPT)
    with pytest.raises(TokenizerRequestError) as err:
        asyncio.run(encode("wrong"))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def _kuiper(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
    return subprocess.run(kuiper_command(*args), input=stdin, capture_output=True, text=True,
                          env=env or server_env(), timeout=60)  # fmt: skip


def test_cli_commands_take_tls_ca_and_token(stack, security, llm):
    tls = ["--address", stack.address, "--tls-ca", str(security.cert)]
    gen = ["generate", *tls, "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos"]
    ok = _kuiper(*gen, "--token", TOKEN, "--json", PROMPT)
    assert ok.returncode == 0, ok.stderr
    want_ids, want_text = oracle(llm, PROMPT, max_new_tokens=5, temperature=0.0, ignore_eos=True)
    assert json.loads(ok.stdout)["token_ids"] == want_ids

    denied = _kuiper(*gen, PROMPT)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    assert "--auth-token" in denied.stderr and "Traceback" not in denied.stderr

    chat = _kuiper("chat", *tls, "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos",
                   env=server_env({"KUIPER_AUTH_TOKEN": TOKEN}), stdin="hello\n")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    answer = "".join(c.text for c in llm.chat([{"role": "user", "content": "hello"}], params))
    assert chat.stdout == f"> hello\n{answer}\n"

    tok_tls = ["--address", stack.tokenizer.address, "--tls-ca", str(security.cert)]
    enc = _kuiper("encode", *tok_tls, "--token", TOKEN, PROMPT)
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout) == llm.encode(PROMPT)
    dec = _kuiper(
        "decode", *tok_tls, "--token", TOKEN, "--skip-special-tokens", *map(str, want_ids)
    )
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == want_text + "\n"


def test_up_passes_tls_and_token_to_both_services(tiny_model, security, llm):  # noqa: F811
    """`kuiper up --tls-cert --tls-key` with $KUIPER_AUTH_TOKEN: its demo client gets through."""
    out = subprocess.run(
        kuiper_command(
            "up", "--model", str(tiny_model), "--device", "cpu", "--port", str(free_port()),
            "--tokenizer-port", str(free_port()), "--metrics-port", "0",
            "--tls-cert", str(security.cert), "--tls-key", str(security.key),
            "--demo", PROMPT, "--demo-max-new-tokens", "4", "--exit-after-demo",
        ),
        capture_output=True, text=True, env=security.env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=0)
    want = "".join(c.text for c in llm.generate(PROMPT, params))
    assert f"\n{PROMPT}{want}\n" in out.stdout
    assert f"--tls-ca {security.cert}" in out.stdout
