"""`kuiper chat`: multi-turn chat with a running inference service."""

from __future__ import annotations

import argparse
import sys

from kuiper_client.client import KuiperClient, KuiperError, sampling_params

from kuiper_serve.cli.args import (
    add_client_security_arguments,
    add_inference_address,
    add_sampling_flags,
    sampling_kwargs,
)
from kuiper_serve.cli.remote import explain, open_client, stream_to


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="multi-turn chat with a running inference service",
        description="Each line on standard input is a user turn; the answer streams back and "
        "the conversation history is kept. Works piped; ends at EOF (or /exit).",
    )
    add_inference_address(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--timeout", type=float, default=None, help="deadline per answer, seconds (0: none)"
    )
    add_client_security_arguments(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)


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
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat like EOF does
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
        seen: list = []
        try:
            stream_to(sys.stdout, client.chat(history, **sampling_kwargs(args)), seen)
        except KeyboardInterrupt:
            # Ctrl-C while the answer streams stops that answer (the RPC is cancelled when
            # the generator closes) and keeps the chat: the partial answer stays in history.
            sys.stdout.write(" [interrupted]\n")
            sys.stdout.flush()
            history.append(("assistant", "".join(c.text for c in seen)))
            continue
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
