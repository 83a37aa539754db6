"""Quantized weights on the CPU: memory, speed and quality, against peers in the same run.

    .venv/bin/python bench/quant.py [--model PATH] [--threads N] [--skip-quality]

1. Weight bytes the CPU backend holds: quantized in memory (the default model's GGUF Q4_1 +
   Q8_0 blocks; an int8 export) vs float32 (the path before: every weight expanded).
2. Batch-1 prefill and decode tokens/s, default model: quantized (GGUF blocks, numba kernels)
   vs our float32 path vs transformers fp32; the engines take turns repeat by repeat and each
   figure is the best of --repeats (a busy machine slows all alike).
3. The kernel choice: one decode matmul in the real shapes, numba kernel vs numpy dequantize
   per call + sgemm vs float32 sgemm.
4. Quality, int8 export (group 64) vs bf16 export (`kuiper export --quant none`) of the same
   model: greedy agreement over 64 tokens on 20 prompts (int8 teacher-forced on bf16's tokens:
   share of positions where its argmax is bf16's token; and free-running: tokens before the
   first difference) and perplexity of both on a fixed text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "To make a cup of tea, you first",
    "The three primary colors are",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "In computer science, a linked list is",
    "My favorite season of the year is",
    "The Pacific Ocean is",
    "A healthy breakfast usually includes",
    "The theory of relativity was proposed by",
    "When I was a child, I wanted to be",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
    "Paris and London are both",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
    "The most important invention of the 20th century",
    "Dogs are popular pets because",
    "The recipe calls for two cups of flour and",
]

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined a screw press with movable metal type, oil-based ink and paper. "
    "Before his invention, books were copied by hand, which made them rare and expensive; a "
    "single Bible could take a scribe more than a year to finish. Printing changed that. "
    "Within a few decades, presses had spread to more than two hundred cities across Europe, "
    "and millions of books had been produced. Cheaper books meant that more people learned to "
    "read, and ideas travelled faster than ever before. Scientists could share their results, "
    "reformers could spread their arguments, and merchants could print price lists and maps. "
    "Historians often describe the printing press as one of the most important inventions of "
    "the second millennium, because it made knowledge easier to copy, to check and to keep. "
    "Today the same questions return with every new technology that copies information: who "
    "can use it, who controls it, and how it changes the way people think and work together."
)


def held_bytes(backend) -> int:
    """Bytes of the weights a NumpyBackend holds (quantized or float32 arrays)."""
    total = 0
    seen: set[int] = set()
    w = backend.weights  # models.layout.FusedWeights
    tensors = [w.embed, w.lm_head, w.final_norm]
    for layer in w.layers:
        tensors += [getattr(layer, f.name) for f in dataclasses.fields(layer)]
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes
    return total


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------- speed


def speed(path: Path, args) -> None:
    from cpu_decode import Ours, Transformers

    from inference_service.backends.numpy_backend import NumpyBackend
    from inference_service.models import load_model

    prompt = np.random.default_rng(0).integers(100, 10000, args.prompt_tokens).tolist()
    n = args.decode_tokens
    quant = Ours(path, prompt)  # cpu_decode's float32 engine, its backend swapped below
    t0 = time.perf_counter()
    quant.backend = NumpyBackend(load_model(path, keep_quantized=True), 64, 16)
    quant.load_s = time.perf_counter() - t0
    engines = {"quantized": quant, "fp32": Ours(path, prompt), "hf": Transformers(path, prompt)}
    best = {(e, k): float("inf") for e in engines for k in ("prefill", "decode")}
    tokens: dict[str, list[int]] = {}
    loads = []
    for _ in range(args.repeats):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.prefill()
            best[name, "prefill"] = min(best[name, "prefill"], time.perf_counter() - t0)
            decode_s, tokens[name] = eng.decode(n)
            best[name, "decode"] = min(best[name, "decode"], decode_s)
        loads.append(os.getloadavg()[0])
    qb, fb = held_bytes(quant.backend), held_bytes(engines["fp32"].backend)
    print(f"\n## speed: {path.name}, prompt {len(prompt)} tokens, decode {n}, "
          f"best of {args.repeats}, load average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print(f"weights held: quantized {qb / 2**20:.1f} MiB, fp32 {fb / 2**20:.1f} MiB "
          f"({qb / fb:.1%} of fp32)")  # fmt: skip
    print(f"{'':14}{'quantized':>11}{'fp32 (ours)':>13}{'transformers':>14}"
          f"{'q/fp32':>8}{'q/hf':>7}")  # fmt: skip
    for kind, count in (("prefill", len(prompt)), ("decode", n)):
        q, f, h = (count / best[e, kind] for e in ("quantized", "fp32", "hf"))
        print(f"{kind + ' tok/s':14}{q:11.1f}{f:13.1f}{h:14.1f}{q / f:7.2f}x{q / h:6.2f}x")
    same = next(
        (
            i
            for i, (a, b) in enumerate(zip(tokens["quantized"], tokens["fp32"], strict=True))
            if a != b
        ),
        n,
    )
    print(
        f"greedy tokens quantized vs fp32 (same GGUF values): identical for the first {same} of {n}"
    )


def kernels(path: Path, repeats: int) -> None:
    """One decode matmul (x [1, in]) in the model's shapes, three ways."""
    from inference_service.backends.cpu_kernels import matvec
    from inference_service.backends.numpy_backend import NumpyBackend
    from inference_service.models import load_model

    backend = NumpyBackend(load_model(path, keep_quantized=True), 4, 16)
    weights = backend.weights
    layer = weights.layers[0]
    print("\n## kernel choice: one decode matmul, microseconds (best of "
          f"{repeats}; the fp32 matrix is cache-resident here, unlike in a real step)")  # fmt: skip
    print(f"{'matrix':26}{'numba':>9}{'numpy dequant+sgemm':>21}{'fp32 sgemm':>12}")
    for name, w in (("gate|up " + str(layer.wgu.shape), layer.wgu),
                    ("down " + str(layer.wd.shape), layer.wd),
                    ("lm_head " + str(weights.lm_head.shape), weights.lm_head)):  # fmt: skip
        x = np.random.default_rng(1).standard_normal((1, w.shape[1])).astype(np.float32)
        f32 = w.dequantize()
        a = best_of(lambda w=w, x=x: matvec(x, w), repeats)
        b = best_of(lambda w=w, x=x: x @ w.dequantize().T, max(3, repeats // 5))
        c = best_of(lambda f32=f32, x=x: x @ f32.T, repeats)
        print(f"{name:26}{a * 1e6:9.0f}{b * 1e6:21.0f}{c * 1e6:12.0f}")


# ---------------------------------------------------------------------------- quality


def _greedy_batch(backend, prompts: list[list[int]], n: int, forced=None) -> list[list[int]]:
    """n greedy tokens for every prompt, batched; with `forced`, the tokens fed back are
    forced[i] (teacher forcing) and the argmaxes are returned."""
    from inference_service.backends.base import BatchItem

    blocks = -(-(max(map(len, prompts)) + n) // 16)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(len(prompts))]
    items = [BatchItem(i, np.array(p, np.int32), 0, tables[i]) for i, p in enumerate(prompts)]
    out = [[int(t)] for t in backend.logits(items).argmax(-1)]
    for step in range(n - 1):
        feed = [(forced[i][step] if forced else out[i][-1]) for i in range(len(prompts))]
        items = [BatchItem(i, np.array([feed[i]], np.int32), len(p) + step, tables[i])
                 for i, p in enumerate(prompts)]  # fmt: skip
        for i, t in enumerate(backend.logits(items).argmax(-1)):
            out[i].append(int(t))
    return out


def _perplexity(backend, ids: list[int]) -> float:
    from inference_service.backends.base import BatchItem

    table = list(range(-(-len(ids) // 16)))
    nll = 0.0
    for pos in range(len(ids) - 1):
        item = BatchItem(0, np.array([ids[pos]], np.int32), pos, table)
        logits = backend.logits([item])[0].astype(np.float64)
        m = logits.max()
        nll += m + np.log(np.exp(logits - m).sum()) - logits[ids[pos + 1]]
    return float(np.exp(nll / (len(ids) - 1)))


def quality(path: Path, group: int) -> None:
    from inference_service.backends.numpy_backend import NumpyBackend
    from inference_service.models import load_model
    from inference_service.quant.export import export_model
    from kuiper_serve.cli.export import write_gguf_tokenizer
    from tokenizer_service.tokenizer import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="kuiper-quant-bench-"))
    try:
        kw = dict(gguf_tokenizer=write_gguf_tokenizer, progress=False)
        s8 = export_model(path, tmp / "int8", "int8", group, **kw)
        s16 = export_model(path, tmp / "bf16", "none", **kw)
        tok = load_tokenizer(tmp / "bf16")
        prompts = [tok.encode(p) for p in PROMPTS]
        n_blocks = 20 * (-(-(max(map(len, prompts)) + 64) // 16)) + 64
        int8 = NumpyBackend(load_model(tmp / "int8", keep_quantized=True), n_blocks, 16)
        bf16 = NumpyBackend(load_model(tmp / "bf16"), n_blocks, 16)
        ref = _greedy_batch(bf16, prompts, 64)
        forced = _greedy_batch(int8, prompts, 64, forced=ref)
        free = _greedy_batch(int8, prompts, 64)
        agree = np.mean(
            [a == b for r, f in zip(ref, forced, strict=True) for a, b in zip(r, f, strict=True)]
        )
        prefix = [next((i for i, (a, b) in enumerate(zip(r, f, strict=True)) if a != b), 64)
                  for r, f in zip(ref, free, strict=True)]  # fmt: skip
        ids = tok.encode(TEXT)
        ppl8, ppl16 = _perplexity(int8, ids), _perplexity(bf16, ids)
        print(f"\n## quality: {path.name} exported as int8 (group {group}) vs bf16")
        print(f"file tensor bytes: int8 {s8.written_bytes / 2**20:.1f} MiB, bf16 "
              f"{s16.written_bytes / 2**20:.1f} MiB, fp32 {s8.source_bytes / 2**20:.1f} MiB")  # fmt: skip
        print(f"greedy agreement, 20 prompts x 64 tokens, int8 teacher-forced on bf16's tokens: "
              f"{agree:.1%}")  # fmt: skip
        print(f"free-running: identical tokens before the first difference: mean "
              f"{np.mean(prefix):.1f} of 64, {sum(p == 64 for p in prefix)}/20 prompts all 64")  # fmt: skip
        print(f"perplexity on a fixed {len(ids)}-token text: int8 {ppl8:.3f}, bf16 {ppl16:.3f} "
              f"({ppl8 / ppl16 - 1:+.2%})")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    from cpu_decode import add_run_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--group-size", type=int, default=64, choices=(64, 128))
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every engine (numba, BLAS, torch; default: each's own)")  # fmt: skip
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()

    import torch

    if args.threads:
        os.environ["KUIPER_CPU_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    from kuiper_serve.common.model_source import resolve_model

    path = resolve_model(args.model)
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"threads {args.threads or 'default'}")  # fmt: skip
    if not args.skip_speed:
        speed(path, args)
        kernels(path, 20)
    if not args.skip_quality:
        quality(path, args.group_size)


if __name__ == "__main__":
    main()
