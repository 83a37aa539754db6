"""The `kuiper` command: one entry point, subcommands registered by the module that owns them."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers) and sets a handler with
# parser.set_defaults(func=...). Listed here so `kuiper --help` shows them all.
COMMAND_MODULES = (
    "tokenizer_service.cli",  # serve-tokenizer, encode, decode
    "inference_service.cli",  # generate (served, or in-process with --local)
    "inference_service.serve_cli",  # serve-inference, up
    "kuiper_client.commands",  # chat and the served path of generate
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuiper",
        description="kuiper-serve: LLM inference over gRPC (tokenizer + inference services).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
