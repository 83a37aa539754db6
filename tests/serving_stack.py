"""A tiny model folder (random Llama + trained BPE tokenizer.json) and helpers to run the
tokenizer + inference services on loopback as subprocesses, for the end-to-end tests."""

from __future__ import annotations

import re
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from servers import ServerProcess, free_port, kuiper_command, server_env, start_server

INFERENCE_SERVICE = "kuiper.v1.InferenceService"


SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)  # fmt: skip


def build_tiny_model(
    folder: Path, context: int = 2048, dtype: str = "float32", init_device: str = "cpu", **shape
) -> Path:
    """HF folder: byte-level BPE tokenizer (ChatML template) + a random Llama sized to it
    (or of another `shape`, e.g. SMOLLM2_SHAPE, for benchmarks: dtype "bfloat16" halves the
    file, init_device "cuda" makes large shapes quickly)."""
    import torch
    from tokenizer_models import build_hf_bpe
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    build_hf_bpe(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    dims = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    dims.update(shape)
    cfg = LlamaConfig(
        **dims,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id("<|im_start|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        tie_word_embeddings=False,
    )
    with torch.device(init_device):
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.08)  # spread logits: no near-ties for greedy
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


_built: dict[Path, Path] = {}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Built once per test session, though each module that imports this fixture gets its
    own copy of the fixture."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    base = tmp_path_factory.getbasetemp()
    if base not in _built:
        _built[base] = build_tiny_model(tmp_path_factory.mktemp("tiny-served-model"))
    return _built[base]


@dataclass
class Stack:
    tokenizer: ServerProcess
    inference: ServerProcess
    metrics_port: int
    model: Path

    @property
    def address(self) -> str:
        return self.inference.address

    def metrics(self) -> dict[str, float]:
        """Samples of the inference service's /metrics by name and labels, without the
        model_name label every series carries (a stack serves one model)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:]+(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN)$", line)
            if m:
                key = re.sub(r'model_name="[^"]*",?', "", m.group(1)).replace("{}", "")
                out[key.replace(",}", "}")] = float(m.group(2))
        return out


@dataclass(frozen=True)
class StackSecurity:
    """TLS (a self-signed certificate, also the CA clients trust) and/or a bearer token for
    both services of a test stack; the token reaches them through $KUIPER_AUTH_TOKEN."""

    cert: Path | None = None
    key: Path | None = None
    token: str | None = None

    def server_args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)] if self.cert else []

    def env(self) -> dict[str, str]:
        return server_env({"KUIPER_AUTH_TOKEN": self.token} if self.token else None)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """For health probes (no token needed)."""
        if self.cert is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.cert.read_bytes())


def start_tokenizer(
    model: Path, port: int | None = None, security: StackSecurity = StackSecurity()
) -> ServerProcess:
    port = port or free_port()
    return start_server(
        kuiper_command("serve-tokenizer", "--model", str(model), "--port", str(port),
                       "--metrics-port", "-1", *security.server_args()),
        port,
        env=security.env(),
        wait=False,
        credentials=security.credentials(),
    )  # fmt: skip


@contextmanager
def run_stack(
    model: Path,
    *extra: str,
    device: str = "cpu",
    security: StackSecurity = StackSecurity(),
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
):
    """Both services; the inference service runs as `launcher` (argv prefix, default the
    kuiper CLI) with `env` added to its environment."""
    tok = start_tokenizer(model, security=security)
    port, metrics_port = free_port(), free_port()
    tokenizer_tls = ["--tokenizer-tls-ca", str(security.cert)] if security.cert else []
    inf = start_server(
        [
            *(launcher or kuiper_command()),
            "serve-inference", "--model", str(model), "--device", device, "--host", "127.0.0.1",
            "--port", str(port), "--tokenizer-address", tok.address,
            "--metrics-port", str(metrics_port), "--grace", "20", *security.server_args(),
            *tokenizer_tls, *extra,
        ],
        port,
        env={**security.env(), **(env or {})},
        wait=False,
        credentials=security.credentials(),
    )  # fmt: skip
    stack = Stack(tok, inf, metrics_port, model)
    try:
        tok.wait_ready(60)
        inf.wait_ready(120, INFERENCE_SERVICE)
        yield stack
    finally:
        inf.kill()
        tok.kill()
        stack.tokenizer.kill()  # a test may have replaced it (restart)
