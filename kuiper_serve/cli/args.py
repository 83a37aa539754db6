"""argparse helpers shared by several `kuiper` commands: security, address, model, engine and
sampling flags."""

from __future__ import annotations

import argparse
import os
import sys

from inference_service.config import EngineConfig
from inference_service.frontends import GPU_FRONTENDS
from inference_service.sampling.params import DEFAULT_MAX_NEW_TOKENS
from inference_service.watchdog import DEFAULT_RESTART_S, DEFAULT_STALL_S
from kuiper_serve.common.defaults import (
    AUTH_TOKEN_ENV,
    CPU_THREADS_ENV,
    INFERENCE_ADDRESS,
    INFERENCE_GRACE_S,
)

ENGINE = EngineConfig()  # the model and engine flags' defaults


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-connection-age: the same for every kuiper server."""
    parser.add_argument(
        "--max-connection-age",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask clients to reconnect once a connection is this old, so new replicas behind "
        "a Service get traffic; calls in progress are never cut (default 0: never)",
    )


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --auth-token: the same for every kuiper server."""
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument(
        "--auth-token",
        default=os.environ.get(AUTH_TOKEN_ENV),
        help="require the metadata 'authorization: Bearer TOKEN' on every call but health and "
        f"reflection (default ${AUTH_TOKEN_ENV}; prefer the variable, arguments show in ps)",
    )


def add_client_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --auth-token (alias --token): the same for every client command."""
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA certificate"
    )
    parser.add_argument(
        "--auth-token",
        "--token",
        dest="auth_token",
        default=os.environ.get(AUTH_TOKEN_ENV),
        help=f"bearer token the server requires (default ${AUTH_TOKEN_ENV})",
    )


def add_inference_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=INFERENCE_ADDRESS,
        help=f"inference service host:port (default {INFERENCE_ADDRESS})",
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags of generate and chat; unset ones leave the server's defaults."""
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help=f"tokens to generate at most (0: default, {DEFAULT_MAX_NEW_TOKENS})")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="default 1.0 (off)")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default 1.0 (off)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="also return each token's log-probability and the N most likely "
                   "alternatives (shown in --json output)")  # fmt: skip


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """Sampling keywords for KuiperClient from parsed flags (absent flags: server defaults)."""
    return {
        "max_new_tokens": getattr(args, "max_new_tokens", 0) or 0,
        "temperature": getattr(args, "temperature", None),
        "top_p": getattr(args, "top_p", None),
        "top_k": getattr(args, "top_k", 0) or 0,
        "min_p": getattr(args, "min_p", 0.0) or 0.0,
        "repetition_penalty": getattr(args, "repetition_penalty", None),
        "seed": getattr(args, "seed", None),
        "stop": list(getattr(args, "stop", None) or []),
        "ignore_eos": bool(getattr(args, "ignore_eos", False)),
        "logprobs": getattr(args, "logprobs", None),
    }


def read_prompt(value: str) -> str:
    """A PROMPT/TEXT argument; '-' reads standard input less one trailing newline (echo's
    newline is not part of the text), the same for every command."""
    if value != "-":
        return value
    return sys.stdin.read().removesuffix("\n").removesuffix("\r")


def add_model_flags(
    p: argparse.ArgumentParser,
    device_help: str = "auto (default): cuda when a GPU and pycuda exist, else cpu",
) -> None:
    p.add_argument("--model", default=ENGINE.model,
                   help="GGUF file, HF folder or Hugging Face id org/name[@rev] (default: SmolLM2-135M)")  # fmt: skip
    p.add_argument("--device", default=ENGINE.device, choices=["auto", "cpu", "cuda"],
                   help=device_help)  # fmt: skip
    add_threads_flag(p)


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU backend: threads for the matmuls (quantized kernels and BLAS; "
                   f"default: all cores; env {CPU_THREADS_ENV})")  # fmt: skip


def apply_threads_flag(args: argparse.Namespace) -> None:
    """--threads reaches the CPU backend (in this process and the servers `up` starts)
    through the environment, where NumpyBackend reads it."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"kuiper: --threads must be >= 1, got {threads}")
        os.environ[CPU_THREADS_ENV] = str(threads)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    kv = p.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-memory",
        type=float,
        default=ENGINE.kv_memory_mb,
        metavar="MB",
        help="KV cache pool size in MiB (default: backend's choice)",
    )
    kv.add_argument("--num-kv-blocks", type=int, default=ENGINE.num_kv_blocks,
                    help="KV cache pool size in blocks")  # fmt: skip
    p.add_argument("--block-size", type=int, default=ENGINE.block_size,
                   help=f"tokens per KV block (default {ENGINE.block_size})")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="running sequences at most (default: the backend's widest batch, 256 on "
                   "a GPU, 32 on the CPU, at most the KV pool's block count)")  # fmt: skip
    p.add_argument(
        "--max-waiting",
        type=int,
        default=ENGINE.max_waiting,
        help=f"queued requests at most; beyond: RESOURCE_EXHAUSTED (default {ENGINE.max_waiting})",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=ENGINE.max_num_batched_tokens,
        help="tokens per engine step, prefill chunks + decodes (default "
        f"{ENGINE.max_num_batched_tokens}; raised to --max-batch-size when below it)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest request message accepted (default: the model's context length x 5 bytes "
        "+ 1 MiB, at most 4 MiB); larger ones are refused before they are parsed",
    )
    p.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=DEFAULT_STALL_S,
        metavar="SECONDS",
        help="health turns NOT_SERVING when one engine step runs longer than this (default "
        f"{DEFAULT_STALL_S:g})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=INFERENCE_GRACE_S,
        help="seconds running streams get to finish after SIGTERM",
    )
    p.add_argument(
        "--engine-restart-timeout",
        type=float,
        default=DEFAULT_RESTART_S,
        metavar="SECONDS",
        help="kill and restart an engine process that sends no heartbeat for this long (a "
        "wedged step, a stopped process); its streams end UNAVAILABLE (default "
        f"{DEFAULT_RESTART_S:g}; 0: never)",
    )
    p.add_argument(
        "--single-process",
        action="store_true",
        help="run the engine as a thread of the gRPC server instead of its own process "
        "(debugging; slower under load)",
    )
    p.add_argument(
        "--frontends",
        type=int,
        default=None,
        metavar="N",
        help="gRPC frontend processes sharing the port (SO_REUSEPORT, Linux), all over one "
        f"engine process (default: 1 on the CPU; on a GPU {GPU_FRONTENDS}, at most the cores "
        "minus 2: one frontend tops out at about 17k tokens/s on one core)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the model and engine flags describe. Without --max-batch-size it has
    EngineConfig's default width; the server then takes the backend's (auto_max_batch_size)."""
    width = args.max_batch_size or ENGINE.max_batch_size
    return EngineConfig(
        model=args.model,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_memory_mb=args.kv_memory,
        max_batch_size=width,
        # every running sequence must be able to decode in each step
        max_num_batched_tokens=max(args.max_batched_tokens, width),
        max_waiting=args.max_waiting,
    )
