"""GPU benchmark: batch-1 decode and 512-token prefill of the CUDA backend in real model shapes
(random bf16 weights from the HF configs), next to HF transformers bf16 on the same GPU in the
same run, and next to the HBM roofline (weight bytes per token / measured copy bandwidth).

    python bench/gpu_decode.py [--models smollm2,qwen05,llama1b] [--steps 128] [--json out.json]

Needs a CUDA GPU, pycuda, cuda-bindings, torch and transformers (bench only)."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from inference_service.backends.base import BatchItem
from inference_service.backends.cuda.arena import weight_bytes_read_per_token
from inference_service.models.config import ModelConfig, RopeScaling
from inference_service.models.loader import LoadedModel
from inference_service.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)

# HF config.json values of the real models.
SHAPES: dict[str, dict] = {
    "smollm2": dict(
        name="SmolLM2-135M", arch="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie=True,
        bias=False, rope_scaling=None,
    ),
    "qwen05": dict(
        name="Qwen2.5-0.5B", arch="qwen2", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie=True,
        bias=True, rope_scaling=None,
    ),
    "llama1b": dict(
        name="Llama-3.2-1B", arch="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie=True,
        bias=False, rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192),
    ),
}  # fmt: skip


def model_config(s: dict) -> ModelConfig:
    rs = s["rope_scaling"]
    return ModelConfig(
        architecture=s["arch"], vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_layers=s["num_layers"],
        num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"], head_dim=s["head_dim"],
        rms_norm_eps=s["rms_norm_eps"], rope_theta=s["rope_theta"],
        max_position_embeddings=s["max_position_embeddings"], tie_word_embeddings=s["tie"],
        attention_bias=s["bias"], rope_scaling=RopeScaling(**rs) if rs else None,
    )  # fmt: skip


def hf_model(s: dict):
    """A random-init HF model in bf16 on the GPU, in the same shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        rms_norm_eps=s["rms_norm_eps"], rope_theta=s["rope_theta"],
        max_position_embeddings=s["max_position_embeddings"], tie_word_embeddings=s["tie"],
    )  # fmt: skip
    if s["arch"] == "qwen2":
        cfg, cls = Qwen2Config(**kw), Qwen2ForCausalLM
    else:
        rs = s["rope_scaling"]
        if rs:
            kw["rope_scaling"] = {"rope_type": "llama3", **rs}
        cfg, cls = LlamaConfig(head_dim=s["head_dim"], **kw), LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(cfg).to(torch.bfloat16)
    return model.eval()


def weights_from_hf(model) -> dict[str, np.ndarray]:
    """The HF model's tensors as numpy uint16 bf16 bit patterns (what CudaBackend takes)."""
    import torch

    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.bfloat16).contiguous()
        out[name] = t.view(torch.int16).cpu().numpy().view(np.uint16)
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 20)."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / statistics.median(times[5:])


@dataclass
class Result:
    model: str
    weight_mb: float
    roofline_tok_s: float
    decode_tok_s: float
    decode_pct_roofline: float
    decode_step_us: float
    graph_replay_us: float
    eager_decode_tok_s: float
    prefill512_tok_s: float
    prefill512_our_gemm_tok_s: float  # the same with gemm="ours" (no cuBLASLt)
    hf_decode_tok_s: float
    hf_prefill512_tok_s: float
    first_tokens_agree_with_hf: int
    profile_decode: list
    profile_prefill512: list
    gemm_vs_torch: list
    attention_kernels: list


def run_decode(backend, prompt: list[int], steps: int, table: list[int]) -> tuple[list[int], float]:
    """Prefill, then `steps` greedy decode steps through step(); returns tokens and the wall time
    of the decode steps alone (each step ends with its ids on the host)."""
    hist = list(prompt)
    item = BatchItem(0, np.array(prompt, np.int32), 0, table, GREEDY)
    tok = backend.step([item])[0].token_id
    toks = [tok]
    t0 = time.perf_counter()
    for _ in range(steps):
        hist.append(tok)
        item = BatchItem(0, np.array([tok], np.int32), len(hist) - 1, table, GREEDY)
        tok = backend.step([item])[0].token_id
        toks.append(tok)
    return toks, time.perf_counter() - t0


def step_seconds(backend, item: BatchItem, reps: int = 5) -> float:
    """Median wall time of `reps` steps of item through backend.step(), after one warm-up."""
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        backend.step([item])
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def gemm_set_to(backend, choice: str):
    """backend.gemm = choice inside the block, restored after."""
    saved, backend.gemm = backend.gemm, choice
    try:
        yield
    finally:
        backend.gemm = saved


def bench_model(key: str, steps: int, bw: float) -> Result:
    import torch

    from inference_service.backends.cuda.backend import CudaBackend

    s = SHAPES[key]
    cfg = model_config(s)
    hf = hf_model(s)
    model = LoadedModel(config=cfg, weights=weights_from_hf(hf), source="random", dtype="bf16")
    backend = CudaBackend(model, num_blocks=256, block_size=16)
    del model
    gc.collect()
    wbytes = weight_bytes_read_per_token(cfg)
    roofline = bw / wbytes
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, 16).tolist()
    table = list(range(64))

    run_decode(backend, prompt, 16, table)  # warm-up: captures the graphs
    toks, t = run_decode(backend, prompt, steps, table)
    decode = steps / t
    backend.use_graphs = False
    _, te = run_decode(backend, prompt, 32, table)
    backend.use_graphs = True
    eager = 32 / te

    last = BatchItem(0, np.array([toks[-1]], np.int32), len(prompt) + steps, table, GREEDY)
    graph_us = backend.time_decode_graph([last])
    prof_decode = summarize(backend.profile_step([last]))

    long_prompt = rng.integers(0, cfg.vocab_size, 512).tolist()
    item = BatchItem(1, np.array(long_prompt, np.int32), 0, list(range(64, 96)), GREEDY)
    prefill = 512 / step_seconds(backend, item)
    prof_prefill = summarize(backend.profile_step([item]))
    # the default may use cuBLASLt: time our own GEMMs too; the GEMM table compares ours
    with gemm_set_to(backend, "ours"):
        prefill_ours = 512 / step_seconds(backend, item)
        gemms = gemm_vs_torch(cfg, summarize(backend.profile_step([item])), 512)
    att = attention_kernels(backend, toks[-1], len(prompt) + steps)

    # HF transformers bf16, same GPU, same weights.
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        hf.generate(ids, attention_mask=torch.ones_like(ids), **{**gen, "max_new_tokens": 8,
                                                                  "min_new_tokens": 8})  # fmt: skip
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        torch.cuda.synchronize()
        hf_decode = steps / (time.perf_counter() - t0)
        hf_toks = out[0, len(prompt) :].tolist()
        lp = torch.tensor([long_prompt], device="cuda")
        hf(lp)
        torch.cuda.synchronize()
        hts = []
        for _ in range(5):
            t0 = time.perf_counter()
            hf(lp)
            torch.cuda.synchronize()
            hts.append(time.perf_counter() - t0)
        hf_prefill = 512 / statistics.median(hts)
    agree = 0
    for a, b in zip(toks, hf_toks, strict=False):
        if a != b:
            break
        agree += 1

    backend.close()
    del backend, hf
    gc.collect()
    torch.cuda.empty_cache()
    return Result(
        model=s["name"], weight_mb=wbytes / 1e6, roofline_tok_s=roofline, decode_tok_s=decode,
        decode_pct_roofline=100 * decode / roofline, decode_step_us=1e6 / decode,
        graph_replay_us=graph_us, profile_decode=prof_decode, profile_prefill512=prof_prefill,
        gemm_vs_torch=gemms, attention_kernels=att,
        eager_decode_tok_s=eager, prefill512_tok_s=prefill,
        prefill512_our_gemm_tok_s=prefill_ours, hf_decode_tok_s=hf_decode,
        hf_prefill512_tok_s=hf_prefill, first_tokens_agree_with_hf=agree,
    )  # fmt: skip


def attention_kernels(backend, tok: int, short_pos: int) -> list[dict]:
    """Decode step at a short and two long contexts with each decode attention kernel
    (paged_decode_d*_u{U}; "auto" = the backend's default choice of U) and the tiled one
    (decode_unroll=0), same run: graph replay us and
    the attention kernel's mean us (profile_step). The long contexts read whatever the pool
    holds past the written positions: fine for timing, the logits are not used."""
    from inference_service.backends.cuda.shapes import DEC_UNROLLS, decode_unroll_for, width_bucket

    rows = []
    for ctx in (short_pos, 1024, 4000):
        table = list(range(ceil_div_int(ctx + 1, backend.block_size)))
        item = BatchItem(0, np.array([tok], np.int32), ctx, table, GREEDY)
        width = width_bucket(ceil_div_int(ctx + 1, backend.block_size), backend.max_width)
        auto = decode_unroll_for(width * backend.block_size, backend.config.num_kv_heads, 1)
        for u in (None, *DEC_UNROLLS, 0):
            backend.decode_unroll = u
            backend.clear_graphs()
            replay = backend.time_decode_graph([item])
            prof = backend.profile_step([item])
            att = [us for label, us in prof if label == "attention"]
            name = f"auto(u{auto})" if u is None else f"decode_u{u}" if u else "tiled"
            rows.append(dict(ctx=ctx + 1, kernel=name,
                             graph_replay_us=replay, attention_us=sum(att) / len(att)))  # fmt: skip
    backend.decode_unroll = None
    backend.clear_graphs()
    return rows


def ceil_div_int(a: int, b: int) -> int:
    return -(-a // b)


def gemm_vs_torch(cfg: ModelConfig, prof: list[dict], m: int) -> list[dict]:
    """Our prefill GEMMs (mean per layer, from the profile) next to torch.matmul (cuBLAS) on the
    same shapes, same GPU, random bf16 operands."""
    import torch

    hid, inter = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    qd = cfg.num_heads * cfg.head_dim
    shapes = {"gemm qkv": (qkv, hid), "gemm o_proj": (hid, qd), "gemm gate_up": (2 * inter, hid),
              "gemm down": (hid, inter)}  # fmt: skip
    ours = {p["kernel"]: p["mean_us"] for p in prof}
    out = []
    for name, (n, k) in shapes.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ w.T
        times = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ w.T
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        t_torch = statistics.median(times)
        flop = 2 * m * n * k
        t_ours = ours.get(name, float("nan"))
        out.append(dict(gemm=name, m=m, n=n, k=k, ours_us=t_ours, torch_us=t_torch,
                        ours_tflops=flop / t_ours / 1e6, torch_tflops=flop / t_torch / 1e6))  # fmt: skip
    return out


def summarize(profile: list[tuple[str, float]]) -> list[dict]:
    """Per-label launch count and total microseconds, largest first."""
    agg: dict[str, list[float]] = {}
    for label, us in profile:
        agg.setdefault(label, []).append(us)
    rows = [
        dict(kernel=k, n=len(v), total_us=sum(v), mean_us=sum(v) / len(v)) for k, v in agg.items()
    ]
    return sorted(rows, key=lambda r: -r["total_us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,qwen05,llama1b")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"GPU: {gpu}; device copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    results = []
    for key in args.models.split(","):
        r = bench_model(key, args.steps, bw)
        results.append(r)
        print(r.model, r.decode_tok_s, r.prefill512_tok_s, flush=True)
    print(f"\n{gpu}, bf16, batch 1, {args.steps} decode steps after a 16-token prompt")
    print(f"{'model':14} {'weights MB':>10} {'roofline':>9} {'decode':>8} {'%roof':>6} "
          f"{'eager':>7} {'HF':>6} {'x HF':>6} {'prefill512':>10} {'our GEMM':>9} {'HF pf':>8} "
          f"{'agree':>5}")  # fmt: skip
    for r in results:
        print(f"{r.model:14} {r.weight_mb:10.0f} {r.roofline_tok_s:9.0f} {r.decode_tok_s:8.0f} "
              f"{r.decode_pct_roofline:5.0f}% {r.eager_decode_tok_s:7.0f} {r.hf_decode_tok_s:6.0f} "
              f"{r.decode_tok_s / r.hf_decode_tok_s:6.1f} {r.prefill512_tok_s:10.0f} "
              f"{r.prefill512_our_gemm_tok_s:9.0f} {r.hf_prefill512_tok_s:8.0f} {r.first_tokens_agree_with_hf:5d}")  # fmt: skip
    for r in results:
        print(f"\n{r.model}: prefill GEMMs, M=512, ours vs torch.matmul (cuBLAS):")
        for g in r.gemm_vs_torch:
            print(f"    {g['gemm']:14} N={g['n']:<6d} K={g['k']:<5d} ours {g['ours_us']:7.1f} us "
                  f"{g['ours_tflops']:5.0f} TFLOP/s | torch {g['torch_us']:7.1f} us "
                  f"{g['torch_tflops']:5.0f} TFLOP/s")  # fmt: skip
        print(f"{r.model}: decode attention, graph replay us / attention kernel us (events):")
        for a in r.attention_kernels:
            print(f"    ctx {a['ctx']:5d} {a['kernel']:9} replay {a['graph_replay_us']:7.1f} us  "
                  f"attention {a['attention_us']:5.1f} us")  # fmt: skip
        print(f"{r.model}: decode step {r.decode_step_us:.0f} us wall, {r.graph_replay_us:.0f} us "
              f"graph replay; kernels back to back (eager, events), decode | prefill 512:")  # fmt: skip
        for name, prof in (("decode", r.profile_decode), ("prefill", r.profile_prefill512)):
            total = sum(p["total_us"] for p in prof)
            print(f"  {name}: {total:.0f} us in kernels")
            for p in prof:
                print(f"    {p['kernel']:22} x{p['n']:<3d} {p['total_us']:9.1f} us "
                      f"({p['mean_us']:.1f} each)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=gpu, copy_bw=bw, results=[asdict(r) for r in results]), f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
