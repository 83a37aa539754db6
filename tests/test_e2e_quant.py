"""`kuiper export MODEL OUT --quant int8`, then `kuiper up --model OUT` serves it: the served
greedy tokens and their logprobs match the original fp32 model (transformers) within a stated
tolerance."""

from __future__ import annotations

import subprocess
import time

import numpy as np
from servers import free_port, kuiper_command, server_env
from serving_stack import tiny_model  # noqa: F401  (fixture)

LOGPROB_TOL = 0.05  # int8 (group 64) moves a tiny model's log-probabilities by less than this


def test_export_int8_then_up_serves_it(tiny_model, tmp_path):  # noqa: F811
    import torch
    from kuiper_client import KuiperClient
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int8"
    done = subprocess.run(
        kuiper_command("export", str(tiny_model), str(out), "--quant", "int8", "--quiet"),
        capture_output=True, text=True, env=server_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"wrote {out} (int8, group 64)" in done.stdout
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()

    port, tok_port = free_port(), free_port()
    cmd = kuiper_command(
        "up", "--model", str(out), "--device", "cpu", "--threads", "1", "--port", str(port),
        "--tokenizer-port", str(tok_port), "--metrics-port", "0",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=server_env())  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving;"):
                break
        assert lines and lines[-1].startswith("serving;"), "".join(lines)
        prompt = np.random.default_rng(3).integers(5, 200, 12).tolist()
        with KuiperClient(f"127.0.0.1:{port}") as client:
            chunks = list(client.generate(prompt, max_new_tokens=10, temperature=0.0,
                                          ignore_eos=True, logprobs=1))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tokens = [t for c in chunks for t in c.token_ids]
    served = [lp.logprob for c in chunks for lp in c.logprobs]
    assert len(tokens) == 10 and len(served) == 10

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].numpy()  # predicts each token
    picked = ref[np.arange(10), tokens]
    np.testing.assert_allclose(served, picked, atol=LOGPROB_TOL, rtol=0)
    # Greedy up to the same tolerance: every served token is (nearly) the original's argmax.
    assert np.all(ref.max(-1) - picked <= LOGPROB_TOL)
