"""Run sample_rows on a few rows (vector and scalar load paths, every feature) for
compute-sanitizer (test_memcheck.py::test_is_memcheck_clean)."""

from __future__ import annotations

import numpy as np
import pycuda.driver as cuda

from cuda_kernels import load_kernels
from inference_service.backends.cuda.sampler import DeviceSampler
from inference_service.sampling.params import SamplingParams


def main() -> None:
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        kernels = load_kernels()
        stream = cuda.Stream()
        rng = np.random.default_rng(0)
        params = [
            SamplingParams(
                temperature=0.7,
                top_k=40,
                top_p=0.9,
                min_p=0.05,
                seed=1,
                repetition_penalty=1.3,
                logprobs=20,
            ),  # fmt: skip
            SamplingParams(temperature=1.0, top_p=0.5, seed=2, logprobs=0),
            SamplingParams(temperature=0.0, repetition_penalty=0.8, logprobs=3),
        ]
        for vocab in (1000, 4099, 151936):  # 4099: scalar loads (not a multiple of 4)
            logits = rng.integers(-5, 5, (3, vocab)).astype(np.float32)  # ties everywhere
            buf = cuda.to_device(logits)
            hists = [rng.integers(-3, vocab + 3, 50) for _ in params]
            sampler = DeviceSampler(cuda, kernels, vocab)
            out = sampler.sample(int(buf), [2, 0, 1], params, hists, [0, 1, 2], stream)
            assert all(0 <= o.token_id < vocab for o in out)
        print("memcheck sampling done")
    finally:
        cuda.Context.synchronize()
        ctx.pop()


if __name__ == "__main__":
    main()
