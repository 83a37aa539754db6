"""`kuiper up`: both services as processes, the README's demo command, clean stop."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from servers import free_port, health_status, kuiper_command, server_env
from serving_stack import tiny_model  # noqa: F401  (fixture)

from inference_service.sampling.params import SamplingParams


def up_command(*extra: str) -> list[str]:
    return kuiper_command(
        "up", "--port", str(free_port()), "--tokenizer-port", str(free_port()),
        "--metrics-port", "0", *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_up_demo_streams_the_default_model_answer(smollm2_gguf, tmp_path):
    """The README main command (`kuiper up --demo PROMPT`), non-interactively."""
    from inference_service.llm import LLM

    prompt = "Once upon a time"
    env = server_env({"KUIPER_HOME": str(smollm2_gguf.parent.parent)})  # the cached model
    out = subprocess.run(
        up_command("--demo", prompt, "--demo-max-new-tokens", "8", "--exit-after-demo"),
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # The demo samples with temperature 0.7, top_p 0.9, seed 0: seeded, so reproducible.
    llm = LLM(smollm2_gguf, device="cpu")
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=0)
    want = "".join(c.text for c in llm.generate(prompt, params))
    assert want.strip()
    assert f"\n{prompt}{want}\n" in out.stdout
    assert "tokenizer service: 127.0.0.1:" in out.stdout
    assert "inference service: 127.0.0.1:" in out.stdout
    assert out.stdout.rstrip().endswith("stopped")


def test_up_serves_until_sigint_then_stops_both(tiny_model):  # noqa: F811
    """With --frontends 2 passed on to the inference service: Ctrl-C stops both of its
    frontend processes too."""
    inf_port, tok_port = free_port(), free_port()
    cmd = kuiper_command(
        "up", "--model", str(tiny_model), "--device", "cpu", "--port", str(inf_port),
        "--tokenizer-port", str(tok_port), "--metrics-port", "0", "--frontends", "2",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=server_env())  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving;"):
                break
        assert lines and lines[-1].startswith("serving;"), "".join(lines)
        out = "".join(lines)
        assert f"tokenizer-{tok_port}.log" in out and f"inference-{inf_port}.log" in out, out
        assert health_status(f"127.0.0.1:{inf_port}") == 1  # SERVING
        assert health_status(f"127.0.0.1:{tok_port}") == 1
        log = Path(re.search(r"log: (\S+inference-\d+\.log)", out).group(1))
        deadline = time.monotonic() + 60  # frontend 1 starts once frontend 0 serves
        while "frontend 1 of 2 SERVING" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + rest
        assert re.search(r"frontend1 .*inference service stopped", log.read_text())
        assert health_status(f"127.0.0.1:{inf_port}") is None  # both gone
        assert health_status(f"127.0.0.1:{tok_port}") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("bad", [["--model", "/nonexistent/model.gguf"]])
def test_up_reports_a_bad_model(bad):
    out = subprocess.run(up_command(*bad), capture_output=True, text=True, env=server_env(),
                         timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert "model not found" in out.stderr


def test_every_server_command_listens_on_this_machine_only_by_default():
    # A server reachable from the network is an explicit choice (--host 0.0.0.0, as the
    # Docker images and Kubernetes manifests pass), the same for both services.
    from kuiper_serve.cli.main import build_parser

    parser = build_parser()
    for command in ("serve-tokenizer", "serve-inference", "up"):
        assert parser.parse_args([command]).host == "127.0.0.1", command


def test_version_is_the_installed_distributions(capsys):
    import tomllib
    from pathlib import Path

    from kuiper_serve.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"kuiper-serve {version}"


@pytest.mark.parametrize("flag", ["--port", "--tokenizer-port", "--metrics-port"])
def test_up_refuses_a_port_in_use_in_one_line(flag, capsys):
    # Without the check, a tokenizer already on --tokenizer-port answered the health check,
    # and kuiper up blamed its inference service for the failure.
    import socket

    from kuiper_serve.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": free_port(), "--tokenizer-port": free_port(), "--metrics-port": 0}
        ports[flag] = port
        argv = ["up"]
        argv += [x for k, v in ports.items() for x in (k, str(v))]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} ({flag}) is already in use" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("missing", ["--tls-cert", "--tls-key", "--tls-ca"])
def test_up_names_an_unreadable_tls_file_in_one_line(missing, tmp_path, capsys):
    from kuiper_serve.cli.main import main

    files = {}
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        files[flag] = tmp_path / flag.strip("-")
        if flag != missing:
            files[flag].write_text("not checked before the services start")
    argv = ["up", "--port", str(free_port()), "--tokenizer-port", str(free_port())]
    argv += ["--metrics-port", "0", *(x for k, v in files.items() for x in (k, str(v)))]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"kuiper up: cannot read {missing} {files[missing]}"
