"""Serving overhead: the same greedy decode through gRPC + the tokenizer service vs the engine
alone (in this process, no gRPC, no detokenization), with 1 stream and with 16 streams.

    python bench/serve_overhead.py [--model PATH] [--device cpu] [--max-new-tokens 32]

Prints wall time and tokens/s of both paths and their ratio (served / engine; 1.00 = no
overhead). Both paths generate exactly the same ids (checked). Server processes are started
here on free loopback ports with the same model and engine settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "The three laws of robotics are",
    "In 1969, the first",
    "My favourite recipe for bread",
    "Explain gravity to a child:",
    "The quick brown fox",
    "Dear diary, today",
    "A list of prime numbers: 2, 3,",
    "The weather tomorrow will be",
    "Once there was a little robot",
    "How to learn a new language:",
    "The best way to sort a list is",
    "Breaking news:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, proc: subprocess.Popen, service: str = "") -> None:
    from kuiper_serve.cli.up import wait_healthy as wait

    wait(address, proc, 600, service)


def make_engine(model_path: Path, args):
    from inference_service.backends import create_backend
    from inference_service.config import EngineConfig
    from inference_service.engine.engine import Engine
    from inference_service.models import load_model
    from tokenizer_service.tokenizer import load_tokenizer

    backend = create_backend(load_model(model_path), args.device, num_blocks=args.num_kv_blocks)
    # as the server does: never sample ids past the tokenizer's (padded embedding tables)
    backend.sample_vocab = min(backend.config.vocab_size, load_tokenizer(model_path).vocab_size)
    engine = Engine(backend, EngineConfig(max_batch_size=32))
    engine.start()
    return engine


def engine_run(engine, prompts_ids: list[list[int]], max_new_tokens: int):
    from inference_service.sampling.params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    engine.block_manager.reset_prefix_cache()  # the same starting state as the server's
    t0 = time.perf_counter()
    outs = engine.generate(prompts_ids, params)
    return time.perf_counter() - t0, outs


async def served_run(address: str, prompts: list[str], max_new_tokens: int):
    from kuiper_client import AsyncKuiperClient

    async with AsyncKuiperClient(address, timeout=3600) as client:

        async def one(prompt: str) -> list[int]:
            ids = []
            async for chunk in client.generate(
                prompt, max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True
            ):
                ids += chunk.token_ids
            return ids

        await one(prompts[0])  # warm the channel and both services' paths
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, outs


def spawn(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def start_servers(model_path: Path, args) -> tuple[str, list[subprocess.Popen]]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "kuiper_serve.cli"]
    tok_port, inf_port = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="kuiper-bench-"))
    tok = spawn(
        base + ["serve-tokenizer", "--model", str(model_path), "--port", str(tok_port),
                "--metrics-port", "-1"],
        logs / "tokenizer.log", env,
    )  # fmt: skip
    inf_cmd = base + [
        "serve-inference", "--model", str(model_path), "--device", args.device,
        "--host", "127.0.0.1", "--port", str(inf_port),
        "--tokenizer-address", f"127.0.0.1:{tok_port}", "--metrics-port", "0",
        "--max-batch-size", "32",
    ]  # fmt: skip
    if args.num_kv_blocks:
        inf_cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    inf = spawn(inf_cmd, logs / "inference.log", env)
    procs = [inf, tok]
    try:
        wait_healthy(f"127.0.0.1:{tok_port}", tok)
        wait_healthy(f"127.0.0.1:{inf_port}", inf, "kuiper.v1.InferenceService")
    except BaseException:
        stop_servers(procs)
        raise
    return f"127.0.0.1:{inf_port}", procs


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
        p.wait(60)


def random_model_folder(shape: str) -> Path:
    """The tests' random Llama + BPE tokenizer: "tiny" (2 layers, hidden 64: the engine is so
    fast that what is measured is nearly all serving overhead) or "smollm2" (SmolLM2-135M's
    shape, for machines without the real file, e.g. a GPU box)."""
    sys.path.insert(0, str(REPO / "tests"))
    from serving_stack import SMOLLM2_SHAPE, build_tiny_model

    dims = SMOLLM2_SHAPE if shape == "smollm2" else {}
    return build_tiny_model(Path(tempfile.mkdtemp(prefix=f"kuiper-{shape}-")), **dims)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tests' tiny random model instead (overhead-dominated)",
    )
    parser.add_argument(
        "--random",
        choices=["tiny", "smollm2"],
        default=None,
        help="a random model of this shape with a trained BPE tokenizer",
    )
    args = parser.parse_args()

    from kuiper_serve.common.model_source import resolve_model
    from tokenizer_service.tokenizer import load_tokenizer

    if args.random:
        model_path = random_model_folder(args.random)
    elif args.tiny:
        model_path = random_model_folder("tiny")
    else:
        model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    prompts_ids = [tokenizer.encode(p) for p in PROMPTS]

    address, procs = start_servers(model_path, args)
    engine = make_engine(model_path, args)
    engine_run(engine, prompts_ids[:1], args.max_new_tokens)  # warm up as the served path does
    best: dict[tuple[str, int], tuple[float, list]] = {}
    try:
        # Interleaved, best of --repeats: a busy machine slows both paths alike.
        for _ in range(args.repeats):
            for n in (1, 16):
                runs = {
                    "engine": engine_run(engine, prompts_ids[:n], args.max_new_tokens),
                    "served": asyncio.run(served_run(address, PROMPTS[:n], args.max_new_tokens)),
                }
                for path, (t, outs) in runs.items():
                    if (path, n) not in best or t < best[path, n][0]:
                        best[path, n] = (t, outs)
    finally:
        engine.stop()
        stop_servers(procs)

    print(f"model {model_path.name}, device {args.device}, greedy, "
          f"{args.max_new_tokens} new tokens per stream, best of {args.repeats}")  # fmt: skip
    print(f"{'streams':>7} {'engine s':>9} {'engine tok/s':>12} {'served s':>9} "
          f"{'served tok/s':>12} {'served/engine time':>19}")  # fmt: skip
    ok = True
    for n in (1, 16):
        (te, oe), (ts, os_) = best["engine", n], best["served", n]
        same = oe == os_
        ok &= same
        tokens = n * args.max_new_tokens
        print(f"{n:>7} {te:>9.3f} {tokens / te:>12.1f} {ts:>9.3f} {tokens / ts:>12.1f} "
              f"{ts / te:>18.3f}x" + ("" if same else "  (OUTPUTS DIFFER)"))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
