"""The whole serving stack on the GPU: `kuiper serve-inference --device cuda` behind the real
tokenizer service, checked against the CUDA backend driven in-process (same device, same
kernels), and 8 concurrent streams against each stream alone."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from kuiper_client import KuiperClient
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

from inference_service.sampling.params import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["Once upon a time", "the lazy dog", "a", "Hello, world! " * 12]


@pytest.fixture(scope="module")
def cuda_llm(tiny_model):  # noqa: F811
    from inference_service.llm import LLM

    return LLM(tiny_model, device="cuda")


def test_served_greedy_equals_in_process_cuda(tiny_model, cuda_llm):  # noqa: F811
    with run_stack(tiny_model, "--num-kv-blocks", "512", device="cuda") as stack:
        with KuiperClient(stack.address, timeout=120) as client:
            info = client.model_info()
            assert info.device.startswith("cuda")

            def served(prompt: str) -> list[int]:
                chunks = client.generate(prompt, max_new_tokens=24, temperature=0.0,
                                         ignore_eos=True)  # fmt: skip
                return [t for c in chunks for t in c.token_ids]

            alone = [served(p) for p in PROMPTS]
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(served, PROMPTS * 2))
        assert together == alone * 2
        for prompt, ids in zip(PROMPTS, alone, strict=True):
            params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
            assert ids == [c.token_id for c in cuda_llm.generate(prompt, params)]


def test_kuiper_up_cuda_demo(tiny_model, subprocess_env):  # noqa: F811
    from conftest import free_port

    cmd = [sys.executable, "-m", "kuiper_serve.cli", "up", "--model", str(tiny_model),
           "--device", "cuda", "--port", str(free_port()), "--tokenizer-port", str(free_port()),
           "--metrics-port", "0", "--demo", "Once upon a time", "--demo-max-new-tokens", "16",
           "--exit-after-demo"]  # fmt: skip
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "+ 16 generated tokens" in result.stdout, result.stdout  # the summary line
