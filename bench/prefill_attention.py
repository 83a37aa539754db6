"""GPU microbenchmark: causal prefill attention of one layer, the tensor-core
prefill_attention_d*_k* (attention_prefill.cu; k2 and k4, and the one the backend picks)
against the tiled paged_attention_d* (attention.cu) it replaces in the GEMM path, in the same
run, on random bf16 data in real model shapes.

    python bench/prefill_attention.py [--tokens 512] [--reps 200]

Every launch is timed between two events, all queued behind a spin kernel so they run back to
back with no launch gaps; the median over reps is printed, with the speedup."""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from inference_service.backends.cuda.shapes import (
    ATT_THREADS,
    PF_KGROUPS,
    attention_kernel,
    attention_splits,
    prefill_attention_kernel,
    prefill_kgroups,
    prefill_smem,
    prefill_threads,
    prefill_tiles,
)

# (name, query heads, kv heads, head dim) of the real models.
SHAPES = [("Llama-3.2-1B", 32, 8, 64), ("SmolLM2-135M", 9, 3, 64), ("Qwen2.5-0.5B", 14, 2, 64)]
ATT_SIG, PF_SIG = "PiPPPiPPPiPPPiiiif", "PiPPPiPiPiiif"
MAX_SPLITS, PARTIAL_TOKENS = 32, 64  # backends/cuda/kernels.py


def time_launches(cuda, spin, f, grid, block, args, shared: int, reps: int) -> float:
    """Median microseconds of f<<<grid, block, shared>>>(*args) over reps back-to-back launches."""
    f.launch(grid, block, *args, shared=shared)  # warm-up
    cuda.Context.synchronize()
    events = [(cuda.Event(), cuda.Event()) for _ in range(reps)]
    spin.launch((1, 1, 1), (1, 1, 1), 200_000_000)  # async: holds the stream
    for start, end in events:
        start.record()
        f.launch(grid, block, *args, shared=shared)
        end.record()
    cuda.Context.synchronize()
    return statistics.median(1e3 * end.time_since(start) for start, end in events)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()

    from gpu_context import primary_context

    from cuda_kernels import load_kernels

    with primary_context() as (cuda, dev):
        kernels = load_kernels()
        sm = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        spin = kernels.kernel("spin_wait", "q")
        print(f"{dev.name()}: one layer's causal attention over a {args.tokens}-token prompt, "
              f"median of {args.reps} (us)")  # fmt: skip
        # What this timing method reports for a kernel that does nothing (launch + events).
        floor = time_launches(cuda, spin, spin, (1, 1, 1), (1, 1, 1), (0,), 0, args.reps)
        print(f"(an empty kernel measures {floor:.1f} us this way)")
        print(f"{'model':<14} {'H/KVH/D':>9} {'old':>8} {'k2':>8} {'k4':>8} {'picked':>7} "
              f"{'speedup':>8} {'TFLOP/s':>8}")  # fmt: skip
        rng = np.random.default_rng(0)
        T, bs = args.tokens, 16
        for name, H, KVH, D in SHAPES:
            nb = -(-T // bs)
            qkv_dim = (H + 2 * KVH) * D
            bits = lambda *s: rng.standard_normal(s).astype(np.float32).view(np.uint32) >> 16  # noqa: E731
            qkv = cuda.to_device(bits(T, qkv_dim).astype(np.uint16))
            kc = cuda.to_device(bits(nb, bs, KVH, D).astype(np.uint16))
            vc = cuda.to_device(bits(nb, bs, KVH, D).astype(np.uint16))
            table = cuda.to_device(rng.permutation(nb).astype(np.int32))
            tok_seq = cuda.to_device(np.zeros(T, np.int32))
            pos = cuda.to_device(np.arange(T, dtype=np.int32))
            out = cuda.mem_alloc(T * H * D * 2)
            scale = float(1 / np.sqrt(D))
            max_splits = min(MAX_SPLITS, PARTIAL_TOKENS * MAX_SPLITS // T)
            nsplit = attention_splits(T, KVH, T, sm, max_splits)
            part_o = cuda.mem_alloc(T * H * nsplit * D * 4)
            part_ml = cuda.mem_alloc(T * H * nsplit * 2 * 4)
            counters = cuda.to_device(np.zeros(T * KVH, np.int32))
            old = kernels.kernel(attention_kernel(D), ATT_SIG)
            tiles = np.asarray(prefill_tiles([T], [0], H // KVH), np.int32)
            tiles_d = cuda.to_device(tiles)
            old_args = (qkv, qkv_dim, kc, vc, table, nb, tok_seq, pos, out, H * D, part_o,
                        part_ml, counters, H, KVH, D, bs, scale)  # fmt: skip
            new_args = (qkv, qkv_dim, kc, vc, table, nb, out, H * D, tiles_d, H, KVH, bs, scale)
            t_old = time_launches(cuda, spin, old, (T, KVH, nsplit), (ATT_THREADS, 1, 1),
                                  old_args, 0, args.reps)  # fmt: skip
            t_new = {}
            for kg in PF_KGROUPS[D]:
                new = kernels.kernel(prefill_attention_kernel(D, kg), PF_SIG)
                t_new[kg] = time_launches(cuda, spin, new, (len(tiles), KVH, 1),
                                          (prefill_threads(kg), 1, 1), new_args,
                                          prefill_smem(D, kg), args.reps)  # fmt: skip
            kg = prefill_kgroups(D, len(tiles) * KVH, sm)
            flops = 4 * H * D * T * (T + 1) / 2  # QK^T and PV over the causal half
            cols = " ".join(f"{t_new.get(g, float('nan')):8.1f}" for g in (2, 4))
            print(f"{name:<14} {f'{H}/{KVH}/{D}':>9} {t_old:8.1f} {cols} {f'k{kg}':>7} "
                  f"{t_old / t_new[kg]:7.1f}x {flops / t_new[kg] / 1e6:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
