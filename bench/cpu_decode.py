"""CPU prefill/decode tokens/s: our numpy backend vs HF transformers fp32, same model, same run.

    .venv/bin/python bench/cpu_decode.py [--model PATH] [--prompt-tokens 128] [--decode-tokens 64]

The model defaults to SmolLM2-135M-Instruct (Q4_1 GGUF); both engines run it dequantized to
fp32 (transformers loads the same GGUF). Prefill: one forward pass over the prompt. Decode:
greedy tokens one at a time with a KV cache (transformers: its forward with its cache, no
generate() overhead). The two engines take turns, repeat by repeat, so a busy machine slows
both alike; each figure is the best of --repeats. Needs torch, transformers and accelerate
(the `test` extra).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time
from collections.abc import Callable

import numpy as np


class Ours:
    def __init__(self, model_path, prompt: list[int]) -> None:
        from inference_service.backends.numpy_backend import NumpyBackend
        from inference_service.models import load_model
        from inference_service.sampling.params import SamplingParams

        t0 = time.perf_counter()
        self.backend = NumpyBackend(load_model(model_path), num_blocks=64, block_size=16)
        self.load_s = time.perf_counter() - t0
        self.ids = np.asarray(prompt, np.int32)
        self.greedy = SamplingParams(temperature=0.0)

    def prefill(self) -> int:
        from inference_service.backends.base import BatchItem

        logits = self.backend.logits([BatchItem(0, self.ids, 0, list(range(64)))])
        return int(np.argmax(logits[0]))

    def decode(self, n: int) -> tuple[float, list[int]]:
        from inference_service.backends.base import BatchItem

        token, tokens = self.prefill(), []
        t0 = time.perf_counter()
        for step in range(n):
            pos = len(self.ids) + step
            item = BatchItem(0, np.array([token], np.int32), pos, list(range(64)), self.greedy)
            token = self.backend.step([item])[0].token_id
            tokens.append(token)
        return time.perf_counter() - t0, tokens


class Transformers:
    def __init__(self, model_path, prompt: list[int]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        path = os.fspath(model_path)
        if path.endswith(".gguf"):
            folder, name = os.path.split(path)
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        else:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.hf = hf.eval()
        self.load_s = time.perf_counter() - t0
        self.ids = torch.tensor([prompt])
        # transformers 5.2x renamed past_key_values to cache (argument and output field).
        params = inspect.signature(hf.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids, cache=None):
        import torch

        with torch.inference_mode():
            kw = {self.cache_kw: cache} if cache is not None else {}
            out = self.hf(ids, use_cache=True, **kw)
        return getattr(out, self.cache_kw), int(out.logits[0, -1].argmax())

    def prefill(self) -> int:
        return self._forward(self.ids)[1]

    def decode(self, n: int) -> tuple[float, list[int]]:
        import torch

        cache, token = self._forward(self.ids)
        tokens = []
        t0 = time.perf_counter()
        for _ in range(n):
            cache, token = self._forward(torch.tensor([[token]]), cache)
            tokens.append(token)
        return time.perf_counter() - t0, tokens


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The options of both CPU benchmarks (this one and quant.py): model and run lengths."""
    ap.add_argument("--model", default=None, help="GGUF or HF folder (default: SmolLM2-135M)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/torch threads for both engines (default: each library's own)")  # fmt: skip
    args = ap.parse_args()

    import torch

    if args.threads:
        os.environ["KUIPER_CPU_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    from kuiper_serve.common.model_source import resolve_model

    path = resolve_model(args.model)
    prompt = np.random.default_rng(0).integers(100, 10000, args.prompt_tokens).tolist()
    n = args.decode_tokens
    engines = {"ours": Ours(path, prompt), "hf": Transformers(path, prompt)}
    best = {(e, k): float("inf") for e in engines for k in ("prefill", "decode")}
    tokens: dict[str, list[int]] = {}
    loads = []
    for _ in range(args.repeats):
        for name, eng in engines.items():
            best[name, "prefill"] = min(best[name, "prefill"], timed(eng.prefill))
            decode_s, tokens[name] = eng.decode(n)
            best[name, "decode"] = min(best[name, "decode"], decode_s)
        loads.append(os.getloadavg()[0])

    print(f"model: {path.name}  cpu: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, threads {args.threads or 'default'} "
          f"(torch {torch.get_num_threads()}), "
          f"load average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print(f"prompt {len(prompt)} tokens, decode {n} tokens, best of {args.repeats}")
    print(f"{'':14}{'ours (numpy)':>14}{'transformers':>14}{'ratio':>8}")
    o, h = engines["ours"], engines["hf"]
    rows = [
        ("load s", o.load_s, h.load_s, h.load_s / o.load_s),
        ("prefill tok/s", len(prompt) / best["ours", "prefill"],
         len(prompt) / best["hf", "prefill"], best["hf", "prefill"] / best["ours", "prefill"]),
        ("decode tok/s", n / best["ours", "decode"], n / best["hf", "decode"],
         best["hf", "decode"] / best["ours", "decode"]),
    ]  # fmt: skip
    for name, a, b, r in rows:
        print(f"{name:14}{a:14.1f}{b:14.1f}{r:7.2f}x")
    pairs = zip(tokens["ours"], tokens["hf"], strict=True)
    agree = next((i for i, (a, b) in enumerate(pairs) if a != b), n)
    print(f"greedy tokens identical for the first {agree} of {n}")


if __name__ == "__main__":
    main()
