"""GPU benchmark: non-greedy sampling of logits rows on the host (sampling/sampler.py::sample)
vs on the device (cuda_kernels/sampling.cu::sample_rows through backends/cuda/sampler.py), same
rows, same parameters, same run; prints the time per row and the host / device ratio.

    python bench/device_sampling.py [--vocab 151936]

kernel: the sample_rows launch alone (CUDA events, best of 5); e2e: what step() adds after the
forward (pack + uniforms + copies + launch + sync + unpack, wall clock, best of 5)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from inference_service.sampling.params import SamplingParams
from inference_service.sampling.sampler import sample

CASES = {
    "top_p=0.9 T=0.8": SamplingParams(temperature=0.8, top_p=0.9, seed=1),
    "top_k=50 top_p=0.9": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
    "T=1 plain": SamplingParams(temperature=1.0, seed=1),
    "greedy pen=1.2": SamplingParams(temperature=0.0, repetition_penalty=1.2),
    "top_p=0.9 pen=1.2 lp=20": SamplingParams(
        temperature=0.8, top_p=0.9, logprobs=20, repetition_penalty=1.2, seed=1
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    import pycuda.driver as cuda

    from cuda_kernels import load_kernels
    from inference_service.backends.cuda.sampler import DeviceSampler

    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        run(cuda, DeviceSampler(cuda, load_kernels(), args.vocab), args.vocab)
        cuda.Context.synchronize()
    finally:
        ctx.pop()


def run(cuda, sampler, vocab: int) -> None:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((64, vocab)) * 3.0).astype(np.float32)
    hist = rng.integers(0, vocab, 2000)
    buf = cuda.mem_alloc(logits.nbytes)
    stream = cuda.Stream()
    print(f"{cuda.Device(0).name()}, vocab {vocab}")
    print(f"{'case':24s} {'host ms/row':>11s} {'kernel 1 row us':>15s} {'64 rows us':>10s} "
          f"{'e2e 1 row us':>12s} {'e2e 64 us':>9s} {'host/e2e (1 row)':>16s}")  # fmt: skip
    for name, p in CASES.items():
        t0 = time.perf_counter()
        for r in range(5):
            sample(logits[r], p, hist, r)
        host_ms = (time.perf_counter() - t0) / 5 * 1e3
        kern, e2e = {}, {}
        for n in (1, 64):
            params, hists, steps = [p] * n, [hist] * n, list(range(n))
            cuda.memcpy_htod(buf, logits[:n])
            sampler.sample(int(buf), steps, params, hists, steps, stream)  # warm up, allocate
            start, end = cuda.Event(), cuda.Event()
            ks, es = [], []
            for _ in range(5):
                cuda.memcpy_htod(buf, logits[:n])
                t0 = time.perf_counter()
                sampler.sample(int(buf), steps, params, hists, steps, stream)
                es.append(time.perf_counter() - t0)
                cuda.memcpy_htod(buf, logits[:n])  # same inputs, kernel alone
                start.record(stream)
                sampler.launch(n, int(buf), stream)
                end.record(stream)
                end.synchronize()
                ks.append(end.time_since(start) * 1e3)
            kern[n], e2e[n] = min(ks), min(es) * 1e6
        print(f"{name:24s} {host_ms:11.2f} {kern[1]:15.1f} {kern[64]:10.1f} {e2e[1]:12.1f} "
              f"{e2e[64]:9.1f} {host_ms * 1e3 / e2e[1]:15.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
