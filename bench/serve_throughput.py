"""Serving throughput: N concurrent streams through gRPC (tokenizer service + inference service)
vs the engine alone doing the same work in this process, for N in 1, 8, 32, 64, 128, 256.

    python bench/serve_throughput.py --random llama1b --device cuda       # GPU, real shape
    python bench/serve_throughput.py --short                              # CPU, tiny, < 1 min
    python bench/serve_throughput.py --address HOST:PORT --model PATH     # a running server

Every stream sends a token-id prompt (--prompt-len random ids, distinct per stream, so no
prefix sharing) and asks for --new-tokens greedy tokens with ignore_eos. Streams are spread
over --clients client processes (so the load generator is not the bottleneck) that start
together. Per N it prints: output tok/s (all tokens / first request to last token), decode
tok/s (tokens after every stream has its first token / that window), TTFT p50/p99,
inter-token latency p50/p99 (gaps between a stream's token messages), the CPU use of every
server process (cores busy; the engine process apart from the gRPC frontend), and the engine
alone (same settings, built by the same code) with the served/engine ratios. Servers are
started here (engine in its own process unless --single-process) unless --address is given.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Random-weight shapes (HF config values of the real models; the vocabulary of the trained
# test tokenizer is smaller, so sampling is limited to it, as for any padded table).
SHAPES = {
    "tiny": {},
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


@dataclass
class StreamRecord:
    """One stream as its client saw it (time.monotonic, the same clock in every process)."""

    t_submit: float
    messages: list[tuple[float, int]]  # (arrival, tokens in the message)
    error: str | None = None


@dataclass
class RunStats:
    tokens: int
    output_tps: float
    decode_tps: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    errors: int


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(records: list[StreamRecord], t0: float) -> RunStats:
    ok = [r for r in records if r.error is None and r.messages]
    tokens = sum(n for r in ok for _, n in r.messages)
    t_end = max((r.messages[-1][0] for r in ok), default=t0)
    firsts = [next(t for t, n in r.messages if n) for r in ok]
    t_all_first = max(firsts, default=t0)
    after = sum(n for r in ok for t, n in r.messages if t > t_all_first)
    gaps = [b[0] - a[0] for r in ok for a, b in zip(r.messages, r.messages[1:], strict=False)]
    window = t_end - t_all_first
    return RunStats(
        tokens=tokens,
        output_tps=tokens / (t_end - t0) if t_end > t0 else 0.0,
        decode_tps=after / window if window > 0 else float("nan"),
        ttft_p50=pct([f - r.t_submit for f, r in zip(firsts, ok, strict=True)], 50),
        ttft_p99=pct([f - r.t_submit for f, r in zip(firsts, ok, strict=True)], 99),
        itl_p50=pct(gaps, 50),
        itl_p99=pct(gaps, 99),
        errors=len(records) - len(ok),
    )


# ---- client processes ------------------------------------------------------------------------
def _client_task(
    address: str, prompts: list[list[int]], new_tokens: int, start_at: float
) -> list[StreamRecord]:
    return asyncio.run(_drive(address, prompts, new_tokens, start_at))


async def _drive(
    address: str, prompts: list[list[int]], new_tokens: int, start_at: float
) -> list[StreamRecord]:
    import grpc
    from kuiper.v1 import inference_pb2 as ipb
    from kuiper.v1 import inference_pb2_grpc as igrpc
    from kuiper.v1 import tokenizer_pb2 as tpb

    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = igrpc.InferenceServiceStub(channel)
        sampling = ipb.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

        async def one(prompt: list[int]) -> StreamRecord:
            rec = StreamRecord(time.monotonic(), [])
            try:
                req = ipb.GenerateRequest(token_ids=tpb.TokenIds(ids=prompt), sampling=sampling)
                async for resp in stub.Generate(req, timeout=3600):
                    if resp.token_ids:
                        rec.messages.append((time.monotonic(), len(resp.token_ids)))
            except grpc.aio.AioRpcError as exc:
                rec.error = f"{exc.code().name}: {exc.details()}"
            return rec

        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return list(await asyncio.gather(*(one(p) for p in prompts)))


def run_served(pool, address: str, prompts: list[list[int]], new_tokens: int, clients: int):
    k = max(1, min(clients, len(prompts)))
    parts = [prompts[i::k] for i in range(k)]
    start_at = time.monotonic() + 1.0  # every client connected and waiting by then
    jobs = [pool.apply_async(_client_task, (address, p, new_tokens, start_at)) for p in parts]
    records = [r for j in jobs for r in j.get()]
    return records, start_at


# ---- the engine alone ------------------------------------------------------------------------
def run_engine(engine, prompts: list[list[int]], new_tokens: int):
    from inference_service.sampling.params import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.block_manager.reset_prefix_cache()
    records: dict[int, StreamRecord] = {}
    done = threading.Event()
    lock = threading.Lock()
    remaining = [len(prompts)]

    def listen(outputs) -> None:
        now = time.monotonic()
        with lock:
            for out in outputs:
                rec = records.get(out.request_id)
                if rec is None:
                    continue
                if out.new_token_ids:
                    rec.messages.append((now, len(out.new_token_ids)))
                if out.finished:
                    if out.error:
                        rec.error = out.error
                    remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    engine.add_output_listener(listen)
    try:
        t0 = time.monotonic()
        with lock:
            for p in prompts:
                records[engine.submit(p, params)] = StreamRecord(time.monotonic(), [])
        if not done.wait(3600):
            raise TimeoutError("the engine did not finish")
    finally:
        engine.remove_output_listener(listen)
    return list(records.values()), t0


# ---- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(model: Path, args, engine_flags: list[str]):
    from kuiper_serve.cli.up import wait_healthy

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "kuiper_serve.cli"]
    tok_port, inf_port = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="kuiper-throughput-"))

    def spawn(cmd: list[str], name: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    tok = spawn(base + ["serve-tokenizer", "--model", str(model), "--port", str(tok_port),
                        "--metrics-port", "-1"], "tokenizer")  # fmt: skip
    inf_cmd = base + [
        "serve-inference", "--model", str(model), "--device", args.device,
        "--host", "127.0.0.1", "--port", str(inf_port),
        "--tokenizer-address", f"127.0.0.1:{tok_port}", "--metrics-port", "-1", *engine_flags,
    ]  # fmt: skip
    if args.single_process:
        inf_cmd.append("--single-process")
    if args.frontends is not None:
        inf_cmd += ["--frontends", str(args.frontends)]
    inf = spawn(inf_cmd, "inference")
    procs = {"tokenizer": tok, "inference": inf}
    try:
        wait_healthy(f"127.0.0.1:{tok_port}", tok, 600)
        wait_healthy(f"127.0.0.1:{inf_port}", inf, 900, "kuiper.v1.InferenceService")
    except BaseException:
        print((logs / "inference.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        stop_servers(procs)
        raise
    return f"127.0.0.1:{inf_port}", procs, logs / "inference.log"


def stop_servers(procs: dict[str, subprocess.Popen]) -> None:
    for name in ("inference", "tokenizer"):
        p = procs.get(name)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def server_pids(procs: dict[str, subprocess.Popen], log: Path | None) -> dict[str, int]:
    """tokenizer, inference (frontend 0), and from its log: frontends 1..N-1 and, split
    mode, the engine core (the inference process's spawned children)."""
    pids = {name: p.pid for name, p in procs.items()}

    def scan() -> tuple[str, dict[str, str], int]:
        text = log.read_text(errors="replace") if log is not None else ""
        m = re.search(r"; (\d+) frontend process\(es\)", text)  # frontend 0's SERVING line
        serving = dict(re.findall(r"frontend (\d+) of \d+ SERVING \(pid (\d+)\)", text))
        return text, serving, int(m.group(1)) if m else 1

    text, serving, count = scan()
    deadline = time.monotonic() + 60  # frontends 1..N-1 start once frontend 0 serves
    while len(serving) < count - 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        text, serving, count = scan()
    for index, pid in sorted(serving.items()):
        pids[f"frontend{index}"] = int(pid)
    engine = re.findall(r"\(engine process (\d+)\)", text)
    if engine:
        pids["engine"] = int(engine[-1])
    return pids


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def maps_cuda(pid: int) -> bool | None:
    try:
        return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


# ---- main ------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="a running inference service")
    parser.add_argument("--model", default=None, help="model path (default: --random's)")
    parser.add_argument("--random", choices=sorted(SHAPES), default=None,
                        help="random weights in this shape with the tests' BPE tokenizer")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--streams", default="1,8,32,64,128,256")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="default: enough for the largest N (same for both paths)")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--frontends", type=int, default=None,
                        help="gRPC frontend processes of the started server (default: the "
                        "server's: 1 on the CPU, 4 on a GPU)")  # fmt: skip
    parser.add_argument("--single-process", action="store_true",
                        help="serve with the engine thread inside the gRPC process")  # fmt: skip
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-alone runs")
    parser.add_argument("--short", action="store_true",
                        help="CPU, tiny random model, N in 1,4,16, 16+16 tokens (CI)")  # fmt: skip
    args = parser.parse_args()
    if args.short:
        args.device, args.streams, args.clients = "cpu", "1,4,16", 2
        args.prompt_len, args.new_tokens = 16, 16
        args.random = args.random or ("tiny" if args.model is None else None)
    streams = [int(s) for s in args.streams.split(",")]

    from inference_service.config import EngineConfig
    from inference_service.engine_core.build import EngineSpec, build_engine
    from kuiper_serve.common.model_source import resolve_model
    from tokenizer_service.tokenizer import load_tokenizer

    t_build = time.monotonic()
    if args.random:
        sys.path.insert(0, str(REPO / "tests"))
        import torch
        from serving_stack import build_tiny_model

        big = args.random != "tiny"
        cuda = big and torch.cuda.is_available()
        model = build_tiny_model(
            Path(tempfile.mkdtemp(prefix=f"kuiper-{args.random}-")),
            dtype="bfloat16" if big else "float32",
            init_device="cuda" if cuda else "cpu",
            **SHAPES[args.random],
        )
        if cuda:
            torch.cuda.empty_cache()
    else:
        model = resolve_model(args.model)
    vocab = load_tokenizer(model).vocab_size
    blocks_per_seq = -(-(args.prompt_len + args.new_tokens) // 16) + 1
    num_blocks = args.num_kv_blocks or max(streams) * blocks_per_seq + 64
    engine_flags = ["--num-kv-blocks", str(num_blocks),
                    "--max-batched-tokens", str(args.max_batched_tokens)]  # fmt: skip
    if args.max_batch_size:
        engine_flags += ["--max-batch-size", str(args.max_batch_size)]
    print(f"model {model} ({args.random or 'given'}, built in {time.monotonic() - t_build:.0f}s), "
          f"device {args.device}, {args.prompt_len}-token id prompts, {args.new_tokens} new "
          f"tokens per stream, greedy, ignore_eos; {num_blocks} KV blocks; frontends "
          f"{'1 (--single-process)' if args.single_process else args.frontends or 'default'}",
          flush=True)  # fmt: skip

    procs: dict[str, subprocess.Popen] = {}
    log = None
    if args.address:
        address = args.address
    else:
        address, procs, log = start_servers(model, args, engine_flags)
    pids = server_pids(procs, log) if procs else {}
    engine = None
    if not args.no_engine:
        width = args.max_batch_size or EngineConfig.max_batch_size
        config = EngineConfig(
            model=str(model), device=args.device, num_kv_blocks=num_blocks, max_batch_size=width,
            max_num_batched_tokens=max(args.max_batched_tokens, width),
        )  # fmt: skip
        # the server's settings: without --max-batch-size the backend's width
        spec = EngineSpec(config, auto_max_batch_size=args.max_batch_size is None)
        engine = build_engine(spec).engine
        # as the server does: never sample ids past the tokenizer's (padded tables)
        engine.backend.sample_vocab = min(engine.backend.config.vocab_size, vocab)
        engine.start()
        print(f"engine alone: {engine.backend.device_name}, batch <= "
              f"{engine.config.max_batch_size}", flush=True)  # fmt: skip
    if pids:
        where = {name: maps_cuda(pid) for name, pid in pids.items()}
        print("server processes: " + ", ".join(
            f"{n} pid {p}" + (" (CUDA mapped)" if where[n] else "") for n, p in pids.items()),
            flush=True)  # fmt: skip

    rng = random.Random(0)
    low = min(vocab, 1000)  # skip special ids at the top and bottom of small vocabularies

    def prompts_for(n: int) -> list[list[int]]:
        return [[rng.randrange(3, low) for _ in range(args.prompt_len)] for _ in range(n)]

    rows = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, min(args.clients, max(streams)))) as pool:
        try:
            for n in streams:
                warm = [p[:8] for p in prompts_for(n)]  # the same batch sizes, few tokens
                run_served(pool, address, warm, 4, args.clients)
                if engine is not None:
                    run_engine(engine, warm, 4)
                prompts = prompts_for(n)
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                records, t0 = run_served(pool, address, prompts, args.new_tokens, args.clients)
                wall = time.monotonic() - t0  # from the common start (clients wait for it)
                cpu = {name: (cpu_seconds(pid) - cpu0[name]) / wall for name, pid in pids.items()}
                served = summarize(records, t0)
                eng = summarize(*run_engine(engine, prompts, args.new_tokens)) if engine else None
                rows.append((n, served, eng, cpu))
                errors = [r.error for r in records if r.error]
                if errors:
                    print(f"N={n}: {len(errors)} streams failed, e.g. {errors[0]}", flush=True)
                print_row(n, served, eng, cpu, header=len(rows) == 1)
        finally:
            if engine is not None:
                engine.stop()
            stop_servers(procs)
    ok = all(s.errors == 0 and s.tokens == n * args.new_tokens for n, s, _, _ in rows)
    return 0 if ok else 1


def print_row(n: int, s: RunStats, e: RunStats | None, cpu: dict[str, float], header: bool):
    if header:
        print(f"{'N':>4} | {'served tok/s':>12} {'decode':>8} {'TTFT p50/p99 ms':>16} "
              f"{'ITL p50/p99 ms':>15} | {'engine tok/s':>12} {'decode':>8} "
              f"{'TTFT p50 ms':>11} | {'served/engine':>13} {'decode':>6} | CPU cores")  # fmt: skip
    ms = 1000.0
    eng = (f"{e.output_tps:>12.0f} {e.decode_tps:>8.0f} {e.ttft_p50 * ms:>11.1f} | "
           f"{s.output_tps / e.output_tps:>13.3f} {s.decode_tps / e.decode_tps:>6.3f}"
           if e else f"{'-':>12} {'-':>8} {'-':>11} | {'-':>13} {'-':>6}")  # fmt: skip
    cores = " ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    print(f"{n:>4} | {s.output_tps:>12.0f} {s.decode_tps:>8.0f} "
          f"{s.ttft_p50 * ms:>7.1f}/{s.ttft_p99 * ms:<8.1f} "
          f"{s.itl_p50 * ms:>6.2f}/{s.itl_p99 * ms:<8.2f} | {eng} | {cores}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
