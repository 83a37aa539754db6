"""Host work of one batched decode step, next to the HBM roofline of that step.

    python bench/host_step.py [--shapes llama1b,smollm2] [--streams 1,8,32,64,128,256]
                              [--steps 64] [--json out.json]

Builds the real Engine, Scheduler and BlockManager over a backend that does no math
(`HostOnlyBackend`): it runs the host side of `CudaBackend.step` with the same functions
(check_batch, step_rows, the input layout and `pack_inputs` into an int32 buffer, `pack_rows`
for the device sampler's rows, the argmax-key decoding and `unpack_rows`) and returns ids at
once, so what is timed is the host work a GPU step pays serially today. N streams of 128-token
prompts are prefilled, then `--steps` decode steps of all N are timed and split by phase:

  schedule   Scheduler.schedule (block manager grow, chunk list)
  batch      Engine._batch (BatchItems)
  inputs     the backend's checks, layout and pack_inputs
  sampler    sampler parameter packing, ids back, SampleOutputs
  update     Scheduler.update, RequestOutputs, emitting them
  stats      StepStats

"launches" are the kernel launches of a step: 1 for a decode step replayed as a CUDA graph
(up to 64 rows with the default buckets), else those of the eager step (plan.forward run over a
counting stand-in for the kernels); "launch ms" prices them at the 6.06 us per launch measured
on the H200 machine (bench/launch_overhead.py). That host time is not in "host ms": it is an
estimate from another machine, not a measurement of this one.

The peer is the roofline of the same step on an H200: weight bytes + the KV bytes the step
reads (every stream's context, K and V, bf16), at the 4.18 TB/s device copy bandwidth measured
on the H200 (bench/README.md). "host / roofline" is how many roofline steps the host work of a
step would fill. Times are the engine thread's CPU time (the machine is shared: total times
doubled whenever a neighbour's job took a core), medians over the timed steps (phases: each
phase's median, so they need not add up to the step's). Greedy rows and a sampled mix (temperature / top-k / top-p / min-p, seeded,
every fourth row with a repetition penalty) are timed separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_service.backends.base import BatchItem, check_batch_for  # noqa: E402
from inference_service.backends.cuda.arena import weight_bytes_read_per_token  # noqa: E402
from inference_service.backends.cuda.backend import (  # noqa: E402
    DEFAULT_GRAPH_BUCKETS,
    argmax_ids,
    fast_greedy,
    step_rows,
)
from inference_service.backends.cuda.plan import forward  # noqa: E402
from inference_service.backends.cuda.runner import (  # noqa: E402
    eager_input_layout,
    graph_input_layout,
    pack_inputs,
)
from inference_service.backends.cuda.sampler import (  # noqa: E402
    OUT_WORDS,
    pack_rows,
    supported,
    unpack_rows,
)
from inference_service.backends.cuda.shapes import (  # noqa: E402
    GEMV_MAX_TOKENS,
    KV_DTYPE_BYTES,
    ceil_div,
    prefill_tiles,
)
from inference_service.config import EngineConfig  # noqa: E402
from inference_service.engine.engine import Engine  # noqa: E402
from inference_service.engine.sequence import Sequence  # noqa: E402
from inference_service.models.config import ModelConfig  # noqa: E402
from inference_service.sampling.params import SampleOutput, SamplingParams  # noqa: E402

# The engine thread's CPU time, not total time: this machine is shared, and a neighbour's job
# taking a core doubles total times for seconds at a time (seen: 2.6 to 8.7 ms medians of the same
# 256-stream step in runs a minute apart).
clock = time.thread_time_ns
H200_COPY_BW = 4.18e12  # bytes/s, device-to-device copy (bench/README.md)
# Host cost of one kernel launch from Python on the H200 machine (bench/launch_overhead.py,
# bench/README.md: 6.06 us through cuda_kernels.Kernel).
H200_LAUNCH_US = 6.06
PROMPT = 128
BLOCK = 16
PHASES = ("schedule", "batch", "inputs", "sampler", "update", "stats")

# HF config.json values of the real models (as bench/gpu_decode.py).
SHAPES = {
    "llama1b": ("Llama-3.2-1B", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                max_position_embeddings=131072)),
    "smollm2": ("SmolLM2-135M", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                max_position_embeddings=8192)),
}  # fmt: skip


def model_config(key: str) -> ModelConfig:
    return ModelConfig(architecture="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=True, **SHAPES[key][1])  # fmt: skip


class LaunchCounter:
    """Stands in for StepKernels in plan.forward to count an eager step's kernel launches: each
    of its launch methods enqueues one kernel of ours (cuBLASLt's SwiGLU GEMM would be two)."""

    def __init__(self, c: ModelConfig) -> None:
        self.config = c
        self.qkv_dim = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.q_dim = c.num_heads * c.head_dim
        self.launches = 0

    def attention_choice(self, *args) -> tuple[str, int, int]:
        return ("", 0, 1)

    def __getattr__(self, name: str):
        def launch(*args, **kwargs) -> None:
            self.launches += 1

        return launch


def eager_launches(c: ModelConfig, layout) -> int:
    """Kernel launches of an eager step of this layout (plan.forward over stand-in buffers)."""
    k = LaunchCounter(c)
    addresses = SimpleNamespace(tokens=layout.tokens, inputs=0, resid=0, xnorm=0, qkv=0, attn=0,
                                act=0, counters=0)  # fmt: skip
    kv = SimpleNamespace(k_cache=lambda layer: 0, v_cache=lambda layer: 0)
    buf = SimpleNamespace(weights=defaultdict(int), kv=kv, ws=addresses, logits=0, argmax=0,
                          lm_rows=c.vocab_size)  # fmt: skip
    forward(k, buf, layout, BLOCK * layout.width, None)
    return k.launches


class HostOnlyBackend:
    """CudaBackend.step's host work with no device: same checks, layout, packing and result
    decoding; the 'device' writes nothing, so ids come back at once (from fixed argmax keys
    and zeroed sampler results)."""

    device_name = "none (host work only)"

    def __init__(self, config: ModelConfig, num_blocks: int, max_batch: int = 256) -> None:
        self.config = config
        self.block_size = BLOCK
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # KvPool's: one past the pool
        self.max_batch = max_batch
        self.max_model_len = min(config.max_position_embeddings, num_blocks * BLOCK)
        self.max_width = ceil_div(self.max_model_len, BLOCK)
        self.sample_vocab = config.vocab_size
        self.graph_buckets = DEFAULT_GRAPH_BUCKETS
        self.group = config.num_heads // config.num_kv_heads
        self.inputs_host = np.zeros(1 << 16, np.int32)  # the pinned input buffer's stand-in
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config.vocab_size, max_batch).astype(np.uint64)
        self.argmax_host = (np.uint64(0x3F800000) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - ids)
        self.sampler_out = np.zeros((max_batch, OUT_WORDS), np.int32)
        self.sampler_in = np.zeros(1 << 16, np.int32)
        self.times: dict[str, int] = defaultdict(int)  # ns per phase, summed
        self.launches: int | None = 1  # kernel launches of the last step (None: eager, uncounted)
        self.layout = None

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        t0 = clock()
        check_batch_for(self, batch)
        rows, bucket = step_rows(batch, self.graph_buckets, self.max_batch)
        if bucket is not None:
            layout = graph_input_layout(batch, bucket, BLOCK, self.max_width)
            tiles, pad_to, packed_rows = None, bucket, list(range(len(batch)))
            self.launches = 1  # the graph
        else:
            T = sum(len(it.token_ids) for it in batch)
            tiles = []
            if T > GEMV_MAX_TOKENS and any(len(it.token_ids) > 1 for it in batch):
                lengths = [len(it.token_ids) for it in batch]
                tiles = prefill_tiles(lengths, [it.start_pos for it in batch], self.group)
            layout = eager_input_layout(batch, len(rows), self.max_width, len(tiles))
            pad_to, packed_rows = len(batch), rows
            self.layout = layout  # eager_launches() counts its launches after the step
            self.launches = None
        if self.inputs_host.size < layout.total:
            self.inputs_host = np.zeros(2 * layout.total, np.int32)
        pack_inputs(self.inputs_host, batch, packed_rows, layout, pad_to, BLOCK,
                    self.scratch_block, tiles)  # fmt: skip
        t1 = clock()
        out: list[SampleOutput | None] = [None] * len(batch)
        params = [batch[i].sampling for i in rows]
        dev_rows = [r for r, p in enumerate(params) if not fast_greedy(p)]
        sampled: dict[int, SampleOutput] = {}
        if dev_rows:
            assert all(supported(params[r], self.config.vocab_size) for r in dev_rows)
            packed = pack_rows(dev_rows, [params[r] for r in dev_rows],
                               [batch[rows[r]].history for r in dev_rows],
                               [batch[rows[r]].step for r in dev_rows],
                               self.config.vocab_size)  # fmt: skip
            if self.sampler_in.size < packed.size:
                self.sampler_in = np.zeros(2 * packed.size, np.int32)
            self.sampler_in[: packed.size] = packed
            results = unpack_rows(np.array(self.sampler_out[: len(dev_rows)]),
                                  [params[r] for r in dev_rows])  # fmt: skip
            sampled = dict(zip(dev_rows, results, strict=True))
        ids = argmax_ids(np.array(self.argmax_host[: len(rows)]))
        for r, i in enumerate(rows):
            out[i] = sampled[r] if r in sampled else SampleOutput(token_id=int(ids[r]))
        t2 = clock()
        self.times["inputs"] += t1 - t0
        self.times["sampler"] += t2 - t1
        return out

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        raise NotImplementedError("no math here")

    def close(self) -> None:
        pass


def timed(times: dict[str, int], phase: str, fn):
    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            times[phase] += clock() - t0

    return wrapper


def sampled_params(i: int, max_new: int) -> SamplingParams:
    """The sampled mix: every fourth row greedy, the others temperature with top-p, top-k or
    min-p, seeded; rows 3 mod 4 with a repetition penalty."""
    common = dict(max_new_tokens=max_new, ignore_eos=True, seed=1000 + i)
    kinds = (
        dict(temperature=0.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.0, top_k=50),
        dict(temperature=0.8, min_p=0.05, repetition_penalty=1.1),
    )
    return SamplingParams(**common, **kinds[i % 4])


def roofline_ms(c: ModelConfig, contexts: list[int]) -> float:
    """H200 roofline of one decode step: weights once + every stream's K and V (bf16)."""
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * KV_DTYPE_BYTES
    nbytes = weight_bytes_read_per_token(c) + kv_per_token * sum(contexts)
    return 1e3 * nbytes / H200_COPY_BW


def measure(key: str, n: int, mode: str, steps: int) -> dict:
    c = model_config(key)
    # Streams prefilled first decode while the others prefill (512 tokens per step, less
    # the decodes): room for that many tokens more.
    max_new = steps + ceil_div(n * PROMPT, 512 - n) + 8
    num_blocks = n * ceil_div(PROMPT + max_new, BLOCK) + 64
    backend = HostOnlyBackend(c, num_blocks)
    width = max(n, 1)
    engine = Engine(backend, EngineConfig(max_batch_size=width,
                                          max_num_batched_tokens=max(512, width)))  # fmt: skip
    rng = np.random.default_rng(n)
    for i in range(n):
        params = (
            SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
            if mode == "greedy"
            else sampled_params(i, max_new)
        )
        prompt = rng.integers(0, c.vocab_size, PROMPT).tolist()
        seq = Sequence(seq_id=i + 1, prompt_ids=prompt, sampling=params,
                       max_total_tokens=engine.max_model_len)  # fmt: skip
        engine._seqs[seq.seq_id] = seq
        engine.scheduler.add(seq)
    # Prefill until every stream decodes (not timed).
    while any(s.num_uncomputed_tokens > 1 or not s.output_ids for s in engine._seqs.values()):
        engine._step()
    times = backend.times
    sched = engine.scheduler
    sched.schedule = timed(times, "schedule", sched.schedule)
    sched.update = timed(times, "update", sched.update)
    engine._batch = timed(times, "batch", engine._batch)
    engine._publish_stats = timed(times, "stats", engine._publish_stats)
    roof, totals, per_step = [], [], {p: [] for p in PHASES}
    for _ in range(steps):
        contexts = [s.num_tokens for s in sched.running]
        roof.append(roofline_ms(c, contexts))
        times.clear()
        t0 = clock()
        engine._step()
        total = clock() - t0
        assert engine.last_stats.batch_size == n, (engine.last_stats, n)
        totals.append(total)
        # update = Scheduler.update plus what _step does after it (RequestOutputs, emit).
        times["update"] = total - sum(times.get(p, 0) for p in PHASES if p != "update")
        for p in PHASES:
            per_step[p].append(times.get(p, 0))
    launches = backend.launches or eager_launches(c, backend.layout)
    # Medians per step: a busy neighbour still shows as outliers (caches, memory bandwidth).
    phases = {p: statistics.median(v) / 1e6 for p, v in per_step.items()}
    host = statistics.median(totals) / 1e6
    r = statistics.mean(roof)
    return dict(shape=SHAPES[key][0], streams=n, mode=mode, host_ms=host, roofline_ms=r,
                ratio=host / r, mean_ms=statistics.mean(totals) / 1e6, launches=launches,
                launch_ms=launches * H200_LAUNCH_US / 1e3, **phases)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama1b,smollm2")
    ap.add_argument("--streams", default="1,8,32,64,128,256")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    rows = []
    head = (f"{'shape':<14} {'mode':<8} {'N':>4} {'host ms':>8} {'roof ms':>8} {'host/roof':>9}  "
            + " ".join(f"{p:>8}" for p in PHASES) + f" {'launches':>8} {'launch ms':>9}")  # fmt: skip
    print(head, flush=True)
    for key in args.shapes.split(","):
        for mode in args.modes.split(","):
            for n in [int(x) for x in args.streams.split(",")]:
                r = measure(key, n, mode, args.steps)
                rows.append(r)
                print(f"{r['shape']:<14} {mode:<8} {n:>4} {r['host_ms']:>8.3f} "
                      f"{r['roofline_ms']:>8.3f} {r['ratio']:>9.2f}  "
                      + " ".join(f"{r[p]:>8.3f}" for p in PHASES)
                      + f" {r['launches']:>8} {r['launch_ms']:>9.2f}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
