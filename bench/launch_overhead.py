"""GPU benchmark: host time of one kernel launch through cuda_kernels.Kernel (cuda.bindings'
cuLaunchKernel, or cuLaunchKernelEx with the PDL attribute) vs PyCUDA's prepared_async_call
(the launcher the backend used before), same kernel (gemv_t1, 14 arguments, as a decode step
launches it), same run; prints microseconds per launch and the ratio.

    python bench/launch_overhead.py [--launches 500] [--repeats 7]

The launches queue behind a spin kernel, so the host time is the launch call alone (the GPU
does not run them until the timing is done). Eager steps (prefills, mixed batches) pay this
per kernel; decode steps replay CUDA graphs and do not."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from cuda.bindings import driver
    from gpu_context import primary_context

    from cuda_kernels import load_kernels
    from inference_service.backends.cuda.kernels import GEMV_SIG

    with primary_context() as (cuda, dev):
        kernels = load_kernels()
        ours = kernels.kernel("gemv_t1", GEMV_SIG)
        spin = kernels.kernel("spin_wait", "q")
        # The same cubin loaded a second time, by PyCUDA (only here, for the comparison).
        theirs = cuda.module_from_file(str(kernels.built.cubins["gemv_t1"])).get_function("gemv_t1")
        theirs.prepare(GEMV_SIG)
        stream = cuda.Stream()
        cu_stream = driver.CUstream(stream.handle)
        n, k = 4, 64
        w = cuda.to_device(np.zeros(n * k, np.uint16))
        x = cuda.to_device(np.zeros(k, np.uint16))
        y = cuda.mem_alloc(n * 2)
        gemv_args = (w, n, k, x, 0, k, 0, 0, 1e-5, y, 0, n, 0, 0)
        clock_khz = dev.get_attribute(cuda.device_attribute.CLOCK_RATE)

        def pycuda_launch() -> None:
            theirs.prepared_async_call((1, 1, 1), (128, 1, 1), stream, *gemv_args,
                                       shared_size=2 * k)  # fmt: skip

        def ours_launch() -> None:
            ours.launch((1, 1, 1), (128, 1, 1), *gemv_args, stream=cu_stream, shared=2 * k)

        def ours_pdl() -> None:
            ours.launch((1, 1, 1), (128, 1, 1), *gemv_args, stream=cu_stream, shared=2 * k,
                        pdl=True)  # fmt: skip

        def per_launch_us(fn) -> float:
            times = []
            for _ in range(args.repeats):
                spin.launch((1, 1, 1), (1, 1, 1), int(clock_khz * 0.05 * args.launches),
                            stream=cu_stream)  # fmt: skip
                t0 = time.perf_counter()
                for _ in range(args.launches):
                    fn()
                times.append((time.perf_counter() - t0) / args.launches * 1e6)
                stream.synchronize()
            return statistics.median(times)

        for fn in (pycuda_launch, ours_launch, ours_pdl):  # warm up
            fn()
        stream.synchronize()
        res = {fn.__name__: per_launch_us(fn) for fn in (pycuda_launch, ours_launch, ours_pdl)}
        print(f"{dev.name()}: host us per launch of gemv_t1 (median of {args.repeats} x "
              f"{args.launches} launches queued behind a spin kernel)")  # fmt: skip
        for name, us in res.items():
            print(f"  {name:14s} {us:6.2f} us")
        ratio = res["pycuda_launch"] / res["ours_launch"]
        print(f"  PyCUDA / cuda_kernels.Kernel: {ratio:.2f}x "
              f"(PDL launch: {res['pycuda_launch'] / res['ours_pdl']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
