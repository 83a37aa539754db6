"""The CLI's one JSON shape and one exit-code table (docs/serving.md, "JSON output and exit
codes"), on a live stack with the tiny model: `generate --json` served and `--local` print the
same keys and the same greedy ids (oracle: HF transformers), logprobs included on request; the
inference service's metrics port 0 means a free port, as the tokenizer's does, and its log
lines carry timestamps."""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.request

import pytest
from models_util import hf_greedy
from servers import kuiper_command, server_env
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

PROMPT = "hello world"
N = 6
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "time_to_first_token_s", "queue_time_s",
              "cached_prompt_tokens"}  # fmt: skip


def _kuiper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(kuiper_command(*args), capture_output=True, text=True,
                          env=server_env(), timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def stack(tiny_model):  # noqa: F811
    with run_stack(tiny_model, "--metrics-port", "0") as s:  # the last --metrics-port wins
        yield s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_and_local_json_are_one_shape(stack, tiny_model) -> None:  # noqa: F811
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    flags = ["--temperature", "0", "--max-new-tokens", str(N), "--ignore-eos", "--json",
             "--logprobs", "2", PROMPT]  # fmt: skip
    served = _kuiper("generate", "--address", stack.address, *flags)
    local = _kuiper("generate", "--local", "--model", str(tiny_model), "--device", "cpu", *flags)
    assert served.returncode == 0 and local.returncode == 0, served.stderr + local.stderr
    s, loc = json.loads(served.stdout), json.loads(local.stdout)
    assert s.keys() == loc.keys() == {"token_ids", "text", "finish_reason", "usage", "logprobs"}
    assert s["usage"].keys() == loc["usage"].keys() == USAGE_KEYS

    prompt_ids = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(PROMPT).ids
    want = hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_model), prompt_ids, N)
    for out in (s, loc):
        assert out["token_ids"] == want
        assert out["finish_reason"] == "length"
        assert out["usage"]["prompt_tokens"] == len(prompt_ids)
        assert out["usage"]["completion_tokens"] == N
        assert out["usage"]["time_to_first_token_s"] > 0
        assert [lp["token_id"] for lp in out["logprobs"]] == want
        for lp in out["logprobs"]:
            assert len(lp["top"]) == 2 and lp["top"][0][0] == lp["token_id"]  # greedy: top-1
            assert lp["logprob"] <= 0 and math.isclose(lp["top"][0][1], lp["logprob"],
                                                       abs_tol=1e-5)  # fmt: skip
    assert s["text"] == loc["text"]
    for a, b in zip(s["logprobs"], loc["logprobs"], strict=True):
        assert math.isclose(a["logprob"], b["logprob"], abs_tol=1e-3)


@pytest.mark.slow
def test_the_summary_line_counts_tokens_and_speed(stack) -> None:
    out = _kuiper("generate", "--address", stack.address, "--temperature", "0",
                  "--max-new-tokens", str(N), "--ignore-eos", PROMPT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(r"\[length: (\d+) prompt \+ (\d+) generated tokens, first token "
                     r"([\d.]+) s, ([\d.]+) tok/s\]\n", out.stderr)  # fmt: skip
    assert m, out.stderr
    assert int(m[2]) == N and float(m[4]) > 0


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["generate", "--local", "--model", "/nonexistent/m.gguf", "hi"], 1, "cannot load"),
        (["generate", "--local", "--temperature", "-1", "hi"], 2, "bad parameter"),
        (["generate", "--address", "127.0.0.1:1", "--timeout", "-1", "hi"], 2, "--timeout"),
        (["generate", "--address", "127.0.0.1:1", "--timeout", "3", "hi"], 1, "UNAVAILABLE"),
        (["generate", "--no-such-flag", "hi"], 2, "unrecognized arguments"),
        (
            [
                "up",
                "--model",
                "/nonexistent/m.gguf",
                "--port",
                "0",
                "--tokenizer-port",
                "0",
                "--metrics-port",
                "-1",
            ],
            1,
            "model not found",
        ),  # fmt: skip
    ],
)
def test_exit_codes_follow_the_table(argv, code, says) -> None:
    out = _kuiper(*argv)
    assert out.returncode == code, out.stderr
    assert says in out.stderr


@pytest.mark.slow
def test_inference_metrics_port_zero_is_a_free_port_and_logs_have_timestamps(stack) -> None:
    log = stack.inference.log_text()
    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log)
    assert m, log
    body = urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/metrics", timeout=5).read().decode()
    assert "kuiper_inference" in body
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} kuiper\.inference INFO ")
    lines = [ln for ln in log.splitlines() if "kuiper.inference" in ln]
    assert any("SERVING" in ln for ln in lines), log
    assert lines and all(stamped.match(ln) for ln in lines), log


def test_up_checks_the_tokenizer_metrics_port_too(capsys) -> None:
    """up puts the tokenizer's metrics on --metrics-port + 1: a taken one is refused up front,
    named, before anything starts."""
    import socket

    from servers import free_port

    from kuiper_serve.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as probe:  # the port below must be free for the test to mean much
            if probe.connect_ex(("127.0.0.1", port - 1)) == 0:
                pytest.skip(f"127.0.0.1:{port - 1} is in use")
        argv = ["up", "--port", str(free_port()), "--tokenizer-port", str(free_port()),
                "--metrics-port", str(port - 1)]  # fmt: skip
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} (--metrics-port + 1) is already in use" in err
