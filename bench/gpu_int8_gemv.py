"""GPU: the weight matmuls of one batch-1 decode step, int8 GEMV vs our bf16 GEMV, same run.

    python bench/gpu_int8_gemv.py [--shape llama-1b|qwen-0.5b|smollm2] [--group 64] [--reps 50]

Every layer's q|k|v, o, gate|up and down matrices and the lm_head, each in its own buffer
(random values; nothing stays in L2 between layers, as in a real step), launched back to back
in one CUDA graph per variant: `gemv_t1` (bf16 weights, cuda_kernels/gemv.cuh) and
`gemv_i8_t1` (int8 weights + fp16 group scales, cuda_kernels/gemv_int8.cu), both reading a bf16
input row and writing fp32. Prints the time per step, the bytes read and the ratio. This is
the part of a decode step that int8 changes (attention, norms and sampling are the same
kernels either way); it is not a whole decode step.
"""

from __future__ import annotations

import argparse

import numpy as np

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head dim, vocab
    "llama-1b": (2048, 8192, 16, 32, 8, 64, 128256),
    "qwen-0.5b": (896, 4864, 24, 14, 2, 64, 151936),
    "smollm2": (576, 1536, 30, 9, 3, 64, 49152),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--group", type=int, default=64, choices=(64, 128))
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()

    from gpu_context import primary_context

    from cuda_kernels import load_kernels
    from inference_service.backends.cuda.graphs import capture

    with primary_context() as (cuda, dev):
        kernels = load_kernels()
        hid, inter, layers, heads, kvh, hd, vocab = SHAPES[args.shape]
        mats = [((heads + 2 * kvh) * hd, hid), (hid, heads * hd), (2 * inter, hid), (hid, inter)]
        shapes = [m for _ in range(layers) for m in mats] + [(vocab, hid)]
        rng = np.random.default_rng(0)
        kmax = max(k for _, k in shapes)
        x = cuda.to_device((rng.standard_normal(kmax).astype(np.float32).view(np.uint32) >> 16)
                           .astype(np.uint16))  # fmt: skip
        y = cuda.mem_alloc(4 * max(n for n, _ in shapes))
        bf16_w, int8_w = [], []
        for n, k in shapes:
            bf16_w.append(cuda.to_device(rng.integers(0x3C00, 0x3D00, (n, k), dtype=np.uint16)))
            q = rng.integers(-127, 128, (n, k), dtype=np.int8)
            s = (rng.random((n, k // args.group)) * 1e-3).astype(np.float16)
            int8_w.append((cuda.to_device(q), cuda.to_device(s)))
        bytes_bf16 = sum(2 * n * k for n, k in shapes)
        bytes_int8 = sum(n * k + 2 * n * (k // args.group) for n, k in shapes)

        from cuda.bindings import driver

        f16 = kernels.kernel("gemv_t1", "PiiPiiPPfPiiPP")
        f8 = kernels.kernel("gemv_i8_t1", "PPiiiPiPiiP")
        stream = cuda.Stream()
        cs = driver.CUstream(stream.handle)

        def grid(n: int) -> tuple[int, int, int]:
            return (max(1, min(-(-n // 4), dev.multiprocessor_count * 8)), 1, 1)

        def rec16() -> None:
            for w, (n, k) in zip(bf16_w, shapes, strict=True):
                f16.launch(grid(n), (128, 1, 1), w, n, k, x, 0, k, 0, 0, 1e-5, y, 2, n, 0, 0,
                           stream=cs, shared=2 * k)  # fmt: skip

        def rec8() -> None:
            for (q, s), (n, k) in zip(int8_w, shapes, strict=True):
                f8.launch(grid(n), (128, 1, 1), q, s, n, k, args.group, x, k, y, 2, n, 0,
                          stream=cs, shared=2 * k)  # fmt: skip

        graphs = {"bf16": capture(cs, rec16), "int8": capture(cs, rec8)}
        start, end = cuda.Event(), cuda.Event()
        best = {}
        for _ in range(3):  # alternate, best of three rounds of --reps replays
            for name, g in graphs.items():
                g.launch(cs)
                stream.synchronize()
                start.record(stream)
                for _ in range(args.reps):
                    g.launch(cs)
                end.record(stream)
                end.synchronize()
                ms = start.time_till(end) / args.reps
                best[name] = min(best.get(name, float("inf")), ms)
        for g in graphs.values():
            g.close()
        print(f"{dev.name()}: {args.shape} decode-step weight matmuls ({len(shapes)} GEMVs), "
              f"int8 group {args.group}, best of 3 x {args.reps} graph replays")  # fmt: skip
        for name, nbytes in (("bf16", bytes_bf16), ("int8", bytes_int8)):
            ms = best[name]
            print(f"  {name}: {ms * 1e3:8.1f} us/step  {nbytes / 2**20:8.1f} MiB  "
                  f"{nbytes / (ms * 1e-3) / 1e12:5.2f} TB/s")  # fmt: skip
        print(f"  int8 speed-up over bf16: {best['bf16'] / best['int8']:.2f}x")


if __name__ == "__main__":
    main()
