"""GPU benchmark: every tile of our prefill GEMM (cuda_kernels/gemm.cuh, shapes.GEMM_TILES)
next to torch.matmul (cuBLAS) on the prefill GEMMs of three model shapes, same GPU, same run.
This is how shapes.gemm_plan() is calibrated: the table marks the (tile, k splits) it picks
(*) and the fastest one (+); split-K runs only in the fp32 modes (o_proj, down).

    python bench/prefill_gemm.py [--models smollm2,qwen05,llama1b] [--m 128,512,2048]
                                 [--reps 40] [--json out.json]

Per (shape, kernel): a spin kernel holds the stream while `reps` launches queue up behind it
(so host launch cost is hidden and the kernels run back to back, as in a captured graph), then
events around the launches give the mean; the median over 5 such trials is printed. Weights
rotate over enough copies to exceed the 50 MB L2 (a layer's weights come from HBM in a real
forward; the activations may stay in L2, as they do here). The gate_up row is the fused SwiGLU
mode (act = silu(gate) * up) against cuBLAS's plain gate|up GEMM. Needs pycuda and torch."""

from __future__ import annotations

import argparse
import json
import statistics

MODELS = {  # hidden, intermediate, heads, kv heads, head dim (HF configs)
    "smollm2": ("SmolLM2-135M", 576, 1536, 9, 3, 64),
    "qwen05": ("Qwen2.5-0.5B", 896, 4864, 14, 2, 64),
    "llama1b": ("Llama-3.2-1B", 2048, 8192, 32, 8, 64),
}
L2_BYTES = 50 << 20
TRIALS = 5


def shapes(model: str) -> list[tuple[str, int, int, int]]:
    """(name, N output columns, K, mode) of one layer's prefill GEMMs (mode as in gemm.cuh)."""
    _, hid, inter, h, kvh, d = MODELS[model]
    return [
        ("qkv", (h + 2 * kvh) * d, hid, 0),
        ("o_proj", hid, h * d, 1),
        ("gate_up", inter, hid, 3),
        ("down", hid, inter, 1),
    ]


def bench_shape(torch, fns, locks, timed, m: int, n: int, k: int, mode: int, swiglu: bool):
    """(cuBLAS us, {(tile, splits): our us}) for one GEMM shape."""
    from inference_service.backends.cuda.shapes import GEMM_LOCKS, GEMM_SPLITS, GEMM_TILES

    wn = 2 * n if swiglu else n  # weight rows
    n_rot = max(1, min(32, -(-2 * L2_BYTES // (wn * k * 2))))
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(wn, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_rot)]
    c_bf = torch.empty(m, wn, device="cuda", dtype=torch.bfloat16)
    c = torch.zeros(m, n, device="cuda", dtype=torch.float32) if mode in (1, 2) else c_bf
    t_torch = timed(lambda r: torch.matmul(a, ws[r].T, out=c_bf), n_rot)
    ours = {}
    kt = -(-k // 64)
    for tile in GEMM_TILES:
        gx, gy, _ = tile.grid(m, n, swiglu)
        for splits in GEMM_SPLITS if mode in (1, 2) and gx * gy <= GEMM_LOCKS else (1,):
            if -(-kt // splits) * (splits - 1) >= kt:
                continue
            f, grid = fns[tile.name], tile.grid(m, n, swiglu, splits)

            def launch(r: int, f=f, grid=grid, block=(tile.threads, 1, 1), smem=tile.smem) -> None:
                f.launch(grid, block, a.data_ptr(), k, ws[r].data_ptr(), k, m, n, k, c.data_ptr(),
                         n, mode, 0, locks.data_ptr(), shared=smem)  # fmt: skip

            ours[(tile.name, splits)] = timed(launch, n_rot)
    return t_torch, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,qwen05,llama1b")
    ap.add_argument("--m", default="128,512,2048")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pycuda.driver as cuda
    import torch

    from cuda_kernels import load_kernels
    from inference_service.backends.cuda.shapes import (
        GEMM_LOCKS,
        GEMM_SWIGLU,
        GEMM_TILES,
        gemm_plan,
    )

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # torch makes the primary context current
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        kernels = load_kernels()
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count
        spin = kernels.kernel("spin_wait", "q")
        fns = {t.name: kernels.kernel(t.name, "PiPiiiiPiiPP") for t in GEMM_TILES}
        locks = torch.zeros(GEMM_LOCKS, device="cuda", dtype=torch.int32)
        clock_khz = cuda.Device(0).get_attribute(cuda.device_attribute.CLOCK_RATE)

        def timed(launch, n_rot: int) -> float:
            """Median over trials of the mean microseconds per launch, launches back to back."""
            for r in range(3):
                launch(r % n_rot)
            out = []
            for _ in range(TRIALS):
                # hold the stream ~20 us per queued launch so the queue fills before it runs
                spin.launch((1, 1, 1), (1, 1, 1), int(clock_khz * 0.02 * args.reps))
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for r in range(args.reps):
                    launch(r % n_rot)
                e.record()
                e.synchronize()
                out.append(s.elapsed_time(e) * 1e3 / args.reps)
            return statistics.median(out)

        name = torch.cuda.get_device_name(0)
        print(f"{name}, {sm_count} SMs; us per GEMM (TFLOP/s); x = ours / cuBLAS")
        results = []
        for model in args.models.split(","):
            for m in (int(x) for x in args.m.split(",")):
                print(f"\n{MODELS[model][0]}  M={m}")
                for gname, n, k, mode in shapes(model):
                    swiglu = mode == GEMM_SWIGLU
                    t_torch, ours = bench_shape(torch, fns, locks, timed, m, n, k, mode, swiglu)
                    wn = 2 * n if swiglu else n
                    flop = 2 * m * wn * k
                    tile, splits = gemm_plan(m, n, k, sm_count, mode)
                    pick = (tile.name, splits)
                    best = min(ours, key=ours.get)
                    results.append(dict(model=model, m=m, gemm=gname, n=n, k=k, mode=mode,
                                        torch_us=t_torch, pick=list(pick), best=list(best),
                                        ours=[[t, s, us] for (t, s), us in ours.items()]))  # fmt: skip
                    print(f"  {gname:8} N={wn:<6d} K={k:<5d} cuBLAS {t_torch:7.1f} us "
                          f"({flop / t_torch / 1e6:5.0f})")  # fmt: skip
                    for key, t in ours.items():
                        mark = ("*" if key == pick else " ") + ("+" if key == best else " ")
                        print(f"      {mark} {key[0]:16} k/{key[1]} {t:7.1f} us "
                              f"({flop / t / 1e6:5.0f})  x{t / t_torch:4.2f}")  # fmt: skip
                torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(device=name, sm_count=sm_count, results=results), fh, indent=1)
    finally:
        cuda.Context.synchronize()
        ctx.pop()


if __name__ == "__main__":
    main()
