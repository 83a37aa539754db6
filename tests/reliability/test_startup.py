"""Start-up failures of `kuiper serve-inference` end with one line that says what is wrong
(finding 8: it used to be followed by asyncio's 'Event loop is closed' and 'coroutine
AioServer.shutdown was never awaited'), including running out of memory for the KV cache
(the message names what to lower)."""

from __future__ import annotations

import subprocess

import reliability_util
from servers import free_port, kuiper_command, server_env

tiny_model = reliability_util.tiny_model  # fixture

NOISE = ("Event loop is closed", "never awaited", "Traceback")


def serve_inference(*args: str) -> subprocess.CompletedProcess:
    cmd = kuiper_command("serve-inference", "--device", "cpu", "--port", str(free_port()),
                         "--metrics-port", "0", "--tokenizer-address", "127.0.0.1:1", *args)  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=120)


def test_model_load_failure_is_one_clean_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 7)
    out = serve_inference("--model", str(bad))
    assert out.returncode == 1
    assert "kuiper serve-inference:" in out.stderr and "broken.gguf" in out.stderr
    for noise in NOISE:
        assert noise not in out.stderr + out.stdout, out.stderr


def test_out_of_memory_at_start_says_what_to_lower(tiny_model):  # noqa: F811
    out = serve_inference("--model", str(tiny_model), "--num-kv-blocks", str(10**11))
    assert out.returncode == 1
    assert "not enough host memory" in out.stderr
    assert "lower --kv-memory or --num-kv-blocks" in out.stderr
    for noise in NOISE:
        assert noise not in out.stderr + out.stdout, out.stderr
