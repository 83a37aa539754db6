"""Client-side CLI commands: `kuiper chat`, and the served path of `kuiper generate`
(`generate_remote`, called by the generate command when --local is not given)."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from kuiper_client.client import (
    DEFAULT_ADDRESS,
    GenerateChunk,
    KuiperClient,
    KuiperError,
    sampling_params,
)
from tokenizer_service.cli import add_client_security_arguments
from tokenizer_service.defaults import AUTH_TOKEN_ENV


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 0) -> None:
    """The sampling flags shared by generate and chat."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="tokens to generate at most (0: server default)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


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
    }


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="multi-turn chat with a running inference service",
        description="Each line on standard input is a user turn; the answer streams back and "
        "the conversation history is kept. Works piped; ends at EOF (or /exit).",
    )
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"inference service host:port (default {DEFAULT_ADDRESS})",
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--timeout", type=float, default=None, help="deadline per answer, seconds (0: none)"
    )
    add_client_security_arguments(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)


def open_client(
    args: argparse.Namespace, timeout: float | None, command: str
) -> KuiperClient | None:
    """KuiperClient for the --address/--tls/--tls-ca/--auth-token flags; None (after saying
    why on stderr) when the CA file cannot be read or the timeout is negative. A timeout of 0
    means no deadline (as for the Node client), not one that has already passed."""
    if timeout is not None and not timeout >= 0:
        print(f"kuiper {command}: --timeout must be >= 0 seconds (0: none), got {timeout}",
              file=sys.stderr)  # fmt: skip
        return None
    try:
        return KuiperClient(
            getattr(args, "address", None) or DEFAULT_ADDRESS,
            timeout=timeout or None,
            tls=bool(getattr(args, "tls", False)),
            tls_ca=getattr(args, "tls_ca", None),
            token=getattr(args, "auth_token", None) or None,
        )
    except OSError as exc:
        print(f"kuiper {command}: cannot read the TLS CA certificate: {exc}", file=sys.stderr)
        return None


def explain(exc: KuiperError, address: str | None = None) -> str:
    """The error, plus what to do: a token the server wants, a server not running at
    `address`, or an address that is not an inference service."""
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{exc} (pass --auth-token or set ${AUTH_TOKEN_ENV})"
    if address and exc.code == grpc.StatusCode.UNAVAILABLE:
        if "Connection refused" in exc.message:
            return f"{exc} (is the inference service running at {address}? `kuiper up` starts it)"
        if "Socket closed" in exc.message:  # what a plaintext client sees from a TLS port
            return f"{exc} (does {address} speak TLS? pass --tls-ca PEM or --tls)"
    if address and exc.code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{exc} ({address} is not an inference service; is it the tokenizer's port?)"
    return str(exc)


def _stream_to(out, chunks, seen: list[GenerateChunk] | None = None) -> list[GenerateChunk]:
    """Write each chunk's text to out (None: write nothing) and collect the chunks in seen."""
    seen = [] if seen is None else seen
    for chunk in chunks:
        if out is not None:
            out.write(chunk.text)
            out.flush()
        seen.append(chunk)
    return seen


def generate_remote(args: argparse.Namespace) -> int:
    """Stream the answer to args.prompt from the service at args.address; with --json print
    one object {"token_ids", "text", "finish_reason", "usage"} at the end instead."""
    as_json = bool(getattr(args, "json", False))
    client = open_client(args, getattr(args, "timeout", None), "generate")
    if client is None:
        return 2
    seen: list[GenerateChunk] = []
    interrupted = False
    try:
        with client:
            chunks = client.generate(args.prompt, **sampling_kwargs(args))
            _stream_to(None if as_json else sys.stdout, chunks, seen)
    except KuiperError as exc:
        print(f"kuiper generate: {explain(exc, client.address)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: closing the client cancelled the RPC; no traceback
        interrupted = True
    if as_json:
        last = seen[-1] if seen else None
        usage = last.usage if last else None
        finish = "cancelled" if interrupted else (last.finish_reason if last else None)
        print(
            json.dumps(
                {
                    "token_ids": [t for c in seen for t in c.token_ids],
                    "text": "".join(c.text for c in seen),
                    "finish_reason": finish,
                    "usage": usage.__dict__ if usage else None,
                }
            )
        )
    else:
        sys.stdout.write("\n")
    return 130 if interrupted else 0


def cmd_chat(args: argparse.Namespace) -> int:
    try:  # a flag the request cannot carry would fail every turn alike: say it once, up front
        sampling_params(**sampling_kwargs(args))
    except KuiperError as exc:
        print(f"kuiper chat: {exc}", file=sys.stderr)
        return 2
    client = open_client(args, args.timeout, "chat")
    if client is None:
        return 2
    with client:
        try:
            return _chat_loop(args, client)
        except KeyboardInterrupt:  # Ctrl-C ends the chat like EOF does
            sys.stdout.write("\n")
            return 0


def _chat_loop(args: argparse.Namespace, client: KuiperClient) -> int:
    interactive = sys.stdin.isatty()
    history: list[tuple[str, str]] = []
    if args.system:
        history.append(("system", args.system))
    failures = 0
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        turn = line.rstrip("\r\n")
        if not turn.strip():
            continue
        if turn.strip() in ("/exit", "/quit"):
            break
        if not interactive:
            sys.stdout.write(f"> {turn}\n")  # piped: keep the transcript readable
        history.append(("user", turn))
        try:
            seen = _stream_to(sys.stdout, client.chat(history, **sampling_kwargs(args)))
        except KuiperError as exc:
            history.pop()  # the turn got no answer; let the user try again
            failures += 1
            print(f"\nkuiper chat: {explain(exc, client.address)}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append(("assistant", "".join(c.text for c in seen)))
    if interactive:
        sys.stdout.write("\n")
    return 1 if failures else 0
