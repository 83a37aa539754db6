"""GPU benchmark: the prefill GEMMs on our kernel (cuda_kernels/gemm.cuh, as gemm_plan picks it)
vs cuBLASLt through nvmath-python's raw bindings (inference_service/backends/cuda/blaslt.py)
vs torch.matmul (cuBLAS), same GPU, same run; then whole prefills (64, 128 and 512 tokens) of
the SmolLM2-135M and Llama-3.2-1B shapes through CudaBackend with gemm="ours" / "cublaslt" /
"auto" (step() wall time, kernel profile, last-token logits against the HF model's).
It calibrates blaslt.auto_prefers (the gemm="auto" rule).

    python bench/prefill_blaslt.py [--models smollm2,qwen05,llama1b] [--m 128,512,2048]
                                   [--reps 40] [--prefill-models smollm2,llama1b]
                                   [--prefill-tokens 64,128,512] [--json out.json]

Per GEMM: a spin kernel holds the stream while `reps` launches queue behind it (host launch
cost hidden, kernels back to back as in a step), events around them give the mean; the median
over 5 such trials is printed, after a warm-up. Weights rotate over enough copies to exceed
the 50 MB L2 (in a real forward a layer's weights come from HBM). The gate_up row: ours is the
fused SwiGLU mode (act = silu(gate) * up, gemm.cuh mode 3); cuBLASLt is the plain gate|up GEMM
plus our swiglu kernel (what the backend runs); torch the plain gate|up GEMM alone. "host" is
the host time per enqueue (Python + driver/library), which bounds small GEMMs in eager steps.
Needs pycuda, torch, nvmath-python (and transformers for the whole-prefill part)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

MODELS = {  # hidden, intermediate, heads, kv heads, head dim, qkv bias (HF configs)
    "smollm2": ("SmolLM2-135M", 576, 1536, 9, 3, 64, False),
    "qwen05": ("Qwen2.5-0.5B", 896, 4864, 14, 2, 64, True),
    "llama1b": ("Llama-3.2-1B", 2048, 8192, 32, 8, 64, False),
}
L2_BYTES = 50 << 20
TRIALS = 5


def shapes(model: str) -> list[tuple[str, int, int, int]]:
    """(name, N output columns, K, mode) of one layer's prefill GEMMs (modes as in gemm.cuh)."""
    _, hid, inter, h, kvh, d, _ = MODELS[model]
    return [("qkv", (h + 2 * kvh) * d, hid, 0), ("o_proj", hid, h * d, 1),
            ("gate_up", inter, hid, 3), ("down", hid, inter, 1)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,qwen05,llama1b")
    ap.add_argument("--m", default="128,512,2048")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--prefill-models", default="smollm2,llama1b", help="'' skips whole prefills")
    ap.add_argument("--prefill-tokens", default="64,128,512")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pycuda.driver as cuda
    import torch

    from cuda_kernels import load_kernels
    from inference_service.backends.cuda.blaslt import CublasLt
    from inference_service.backends.cuda.shapes import GEMM_LOCKS

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # torch makes the primary context current
    cuda.init()
    dev = cuda.Device(0)
    ctx = dev.retain_primary_context()
    ctx.push()
    out: dict = {"device": torch.cuda.get_device_name(0)}
    try:
        kernels = load_kernels()
        sm_count = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        clock_khz = dev.get_attribute(cuda.device_attribute.CLOCK_RATE)
        spin = kernels.kernel("spin_wait", "q")
        swiglu = kernels.kernel("swiglu", "PPi")
        fns: dict = {}
        locks = torch.zeros(GEMM_LOCKS, device="cuda", dtype=torch.int32)
        lt = CublasLt(0)  # the legacy default stream: torch's events and PyCUDA's calls too
        print(f"{out['device']}, {sm_count} SMs, cuBLASLt {lt.version}; us per GEMM "
              f"(TFLOP/s); ratios = time / cuBLASLt time")  # fmt: skip

        def timed(launch, n_rot: int) -> tuple[float, float]:
            """(median over trials of the mean device us per launch, host us per launch)."""
            for r in range(3):
                launch(r % n_rot)
            torch.cuda.synchronize()
            dev_us, host_us = [], []
            for _ in range(TRIALS):
                spin.launch((1, 1, 1), (1, 1, 1), int(clock_khz * 0.03 * args.reps))
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                t0 = time.perf_counter()
                for r in range(args.reps):
                    launch(r % n_rot)
                host_us.append((time.perf_counter() - t0) * 1e6 / args.reps)
                e.record()
                e.synchronize()
                dev_us.append(s.elapsed_time(e) * 1e3 / args.reps)
            return statistics.median(dev_us), statistics.median(host_us)

        env = dict(torch=torch, kernels=kernels, fns=fns, lt=lt, timed=timed, sm=sm_count,
                   swiglu=swiglu, locks=locks)  # fmt: skip
        rows = []
        for model in args.models.split(","):
            bias_model = MODELS[model][6]
            for m in (int(x) for x in args.m.split(",")):
                print(f"\n{MODELS[model][0]}  M={m}")
                print(f"  {'gemm':8} {'N':>6} {'K':>5} | {'ours':>14} | {'cuBLASLt':>14} | "
                      f"{'torch':>14} | ours/lt torch/lt | host us ours lt")  # fmt: skip
                for name, n, k, mode in shapes(model):
                    row = bench_shape(env, m, n, k, mode, bias_model)
                    row.update(model=model, gemm=name)
                    rows.append(row)
                    flop = 2 * m * row["n"] * k

                    def col(t: float, flop=flop) -> str:
                        return f"{t:7.1f} ({flop / t / 1e6:4.0f})"

                    t_ours, t_lt, t_torch = row["ours_us"], row["blaslt_us"], row["torch_us"]
                    print(f"  {name:8} {row['n']:6d} {k:5d} | {col(t_ours)} | {col(t_lt)} | "
                          f"{col(t_torch)} | {t_ours / t_lt:7.2f} {t_torch / t_lt:8.2f} | "
                          f"{row['host_ours_us']:7.1f} {row['host_blaslt_us']:5.1f}"
                          + ("" if row["bias"] or not (mode == 0 and bias_model)
                             else "  (bias refused: cuBLASLt timed without it)"))  # fmt: skip
                torch.cuda.empty_cache()
        out["gemms"] = rows
        out["refused"] = [list(map(str, key)) for key in lt.refused]
        lt.close()
        tokens = [int(x) for x in args.prefill_tokens.split(",")]
        out["prefill"] = [
            whole_prefill(key, tokens) for key in args.prefill_models.split(",") if key
        ]
    finally:
        cuda.Context.synchronize()
        ctx.pop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


def bench_shape(env: dict, m: int, n: int, k: int, mode: int, bias_model: bool) -> dict:
    """Device and host microseconds of one GEMM on ours / cuBLASLt / torch.matmul."""
    from inference_service.backends.cuda.shapes import GEMM_SWIGLU, ceil_div, gemm_plan

    torch, lt, timed, swiglu = env["torch"], env["lt"], env["timed"], env["swiglu"]
    sw = mode == GEMM_SWIGLU
    wn = 2 * n if sw else n  # weight rows
    n_rot = max(1, min(32, -(-2 * L2_BYTES // (wn * k * 2))))
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(wn, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(n_rot)]
    c_bf = torch.empty(m, wn, device="cuda", dtype=torch.bfloat16)
    act = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    c32 = torch.zeros(m, n, device="cuda", dtype=torch.float32)
    bias = torch.randn(n, device="cuda") if mode == 0 and bias_model else None
    tile, splits = gemm_plan(m, n, k, env["sm"], mode)
    if tile.name not in env["fns"]:
        env["fns"][tile.name] = env["kernels"].kernel(tile.name, "PiPiiiiPiiPP")
    f, grid = env["fns"][tile.name], tile.grid(m, n, sw, splits)
    c_ours = act if sw else (c_bf if mode == 0 else c32)
    state = {"bias": bias.data_ptr() if bias is not None else 0}

    def ours(r: int) -> None:
        f.launch(grid, (tile.threads, 1, 1), a.data_ptr(), k, ws[r].data_ptr(), k, m, n, k,
                 c_ours.data_ptr(), n, mode, state["bias"], env["locks"].data_ptr(),
                 shared=tile.smem)  # fmt: skip

    def blaslt(r: int) -> None:
        c = c_bf if sw or mode == 0 else c32
        if not lt.gemm(a.data_ptr(), k, ws[r].data_ptr(), k, m, wn, k, c.data_ptr(), wn,
                       0 if sw else mode, state["bias"]):  # fmt: skip
            raise LookupError(f"cuBLASLt refused M={m} N={wn} K={k} mode {mode}")
        if sw:
            swiglu.launch((ceil_div(n // 8, 256), m, 1), (256, 1, 1), c_bf.data_ptr(),
                          act.data_ptr(), n)  # fmt: skip

    def tmm(r: int) -> None:
        torch.matmul(a, ws[r].T, out=c_bf)

    try:
        t_lt, h_lt = timed(blaslt, n_rot)
    except LookupError:  # the fp32 bias epilogue refused: cuBLASLt without it
        state["bias"] = 0
        t_lt, h_lt = timed(blaslt, n_rot)
    has_bias = bool(state["bias"])
    t_ours, h_ours = timed(ours, n_rot)
    t_torch, _ = timed(tmm, n_rot)
    return dict(m=m, n=wn, k=k, mode=mode, tile=tile.name, splits=splits, ours_us=t_ours,
                blaslt_us=t_lt, torch_us=t_torch, host_ours_us=h_ours, host_blaslt_us=h_lt,
                bias=has_bias)  # fmt: skip


def whole_prefill(key: str, tokens_list: list[int]) -> list[dict]:
    """Wall time of a prefill step of each length through CudaBackend, gemm="ours" /
    "cublaslt" / "auto" (same backend, switched), the per-label kernel profile of each, and the
    last-token logits against the HF model's (bf16, same weights)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_decode import (
        GREEDY,
        SHAPES,
        hf_model,
        model_config,
        step_seconds,
        summarize,
        weights_from_hf,
    )

    from inference_service.backends.base import BatchItem
    from inference_service.backends.cuda.backend import CudaBackend
    from inference_service.models.loader import LoadedModel

    s = SHAPES[key]
    cfg = model_config(s)
    hf = hf_model(s)
    model = LoadedModel(config=cfg, weights=weights_from_hf(hf), source="random", dtype="bf16")
    rng = np.random.default_rng(0)
    prompts = {t: rng.integers(0, cfg.vocab_size, t).tolist() for t in tokens_list}
    with torch.no_grad():
        ref = {t: hf(torch.tensor([p], device="cuda")).logits[0, -1].float().cpu().numpy()
               for t, p in prompts.items()}  # fmt: skip
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    backend = CudaBackend(model, num_blocks=256, block_size=16, gemm="cublaslt")
    del model
    gc.collect()
    results = []
    for tokens, prompt in prompts.items():
        item = BatchItem(1, np.array(prompt, np.int32), 0, list(range(-(-tokens // 16))), GREEDY)
        res: dict = {"model": s["name"], "tokens": tokens}
        choices = ("ours", "cublaslt", "auto")
        for choice in choices + choices:  # warm-up, then measure
            backend.gemm = choice
            ms = step_seconds(backend, item, reps=6) * 1e3
            prof = summarize(backend.profile_step([item]))
            # logits() of an item without sampling params: greedy rows keep only the argmax
            got = backend.logits([BatchItem(1, item.token_ids, 0, item.block_table)])[0]
            err = float(np.max(np.abs(got - ref[tokens])) / np.max(np.abs(ref[tokens])))
            same = bool(got.argmax() == ref[tokens].argmax())
            res[choice] = dict(ms=ms, tok_s=tokens / ms * 1e3, profile=prof, vs_hf=err,
                               argmax_hf=same, nan=int(np.isnan(got).sum()))  # fmt: skip
        print(f"\n{s['name']}: prefill of {tokens} tokens (step() wall, median of 6)")
        for choice in choices:
            r = res[choice]
            gemm_us = sum(p["total_us"] for p in r["profile"]
                          if p["kernel"].startswith("gemm") or p["kernel"] == "swiglu")  # fmt: skip
            print(f"  gemm={choice:8} {r['ms']:7.2f} ms {r['tok_s']:8.0f} tok/s  GEMMs(+swiglu) "
                  f"{gemm_us / 1e3:6.2f} ms of kernels; logits vs HF {r['vs_hf']:.2e} "
                  f"(argmax same {r['argmax_hf']}, NaN {r['nan']})")  # fmt: skip
            for p in r["profile"][:6]:
                print(f"      {p['kernel']:24} x{p['n']:<3d} {p['total_us']:9.1f} us")
        results.append(res)
    backend.close()
    return results


if __name__ == "__main__":
    main()
