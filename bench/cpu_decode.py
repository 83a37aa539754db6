"""CPU prefill/decode tokens/s: our numpy backend vs HF transformers fp32, same model, same run.

    .venv/bin/python bench/cpu_decode.py [--model PATH] [--prompt-tokens 128] [--decode-tokens 64]

The model defaults to SmolLM2-135M-Instruct (Q4_1 GGUF); both engines run it dequantized to
fp32 (transformers loads the same GGUF). Prefill: one forward pass over the prompt. Decode:
greedy tokens one at a time with a KV cache (transformers: its forward with past_key_values,
no generate() overhead). Each figure is the best of --repeats runs. Needs torch, transformers
and accelerate (the `test` extra).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ours(model_path, prompt: list[int], n_decode: int, repeats: int):
    from inference_service.backends.base import BatchItem
    from inference_service.backends.numpy_backend import NumpyBackend
    from inference_service.engine.sampling_params import SamplingParams
    from inference_service.models import load_model

    t0 = time.perf_counter()
    backend = NumpyBackend(load_model(model_path), num_blocks=64, block_size=16)
    load_s = time.perf_counter() - t0
    table = list(range(64))
    greedy = SamplingParams(temperature=0.0)
    ids = np.asarray(prompt, np.int32)

    def prefill():
        return backend.logits([BatchItem(0, ids, 0, table)])

    tokens: list[int] = []

    def decode():
        tokens.clear()
        token = int(np.argmax(prefill()[0]))
        t0 = time.perf_counter()
        for step in range(n_decode):
            item = BatchItem(0, np.array([token], np.int32), len(ids) + step, table, greedy)
            token = backend.step([item])[0].token_id
            tokens.append(token)
        return time.perf_counter() - t0

    prefill_s = best_of(repeats, prefill)
    decode_s = min(decode() for _ in range(repeats))
    return load_s, prefill_s, decode_s, list(tokens)


def transformers_fp32(model_path, prompt: list[int], n_decode: int, repeats: int):
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    path = os.fspath(model_path)
    if path.endswith(".gguf"):
        folder, name = os.path.split(path)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt])
    # transformers 5.2x renamed past_key_values to cache (argument and output field).
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def cache_of(out):
        return getattr(out, cache_kw)

    def prefill():
        with torch.inference_mode():
            return hf(ids, use_cache=True)

    tokens: list[int] = []

    def decode():
        tokens.clear()
        with torch.inference_mode():
            out = prefill()
            past, token = cache_of(out), int(out.logits[0, -1].argmax())
            t0 = time.perf_counter()
            for _ in range(n_decode):
                out = hf(torch.tensor([[token]]), use_cache=True, **{cache_kw: past})
                past, token = cache_of(out), int(out.logits[0, -1].argmax())
                tokens.append(token)
            return time.perf_counter() - t0

    prefill_s = best_of(repeats, prefill)
    decode_s = min(decode() for _ in range(repeats))
    return load_s, prefill_s, decode_s, list(tokens), torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF or HF folder (default: SmolLM2-135M)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from tokenizer_service.model_source import resolve_model

    path = resolve_model(args.model)
    prompt = np.random.default_rng(0).integers(100, 10000, args.prompt_tokens).tolist()
    n = args.decode_tokens
    o_load, o_pre, o_dec, o_tok = ours(path, prompt, n, args.repeats)
    h_load, h_pre, h_dec, h_tok, threads = transformers_fp32(path, prompt, n, args.repeats)

    print(f"model: {path.name}  cpu: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {threads}")  # fmt: skip
    print(f"prompt {len(prompt)} tokens, decode {n} tokens, best of {args.repeats}")
    print(f"{'':14}{'ours (numpy)':>14}{'transformers':>14}{'ratio':>8}")
    rows = [
        ("load s", o_load, h_load, h_load / o_load),
        ("prefill tok/s", len(prompt) / o_pre, len(prompt) / h_pre, h_pre / o_pre),
        ("decode tok/s", n / o_dec, n / h_dec, h_dec / o_dec),
    ]
    for name, a, b, r in rows:
        print(f"{name:14}{a:14.1f}{b:14.1f}{r:7.2f}x")
    agree = next((i for i, (a, b) in enumerate(zip(o_tok, h_tok, strict=True)) if a != b), n)
    print(f"greedy tokens identical for the first {agree} of {n}")


if __name__ == "__main__":
    main()
