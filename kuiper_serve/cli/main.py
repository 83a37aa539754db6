"""The `kuiper` command: one entry point, subcommands registered by the module that owns them."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

# Each module exposes register(subparsers) and sets a handler with
# parser.set_defaults(func=...). Listed here so `kuiper --help` shows them all.
COMMAND_MODULES = (
    "kuiper_serve.cli.tokenizer",  # serve-tokenizer, encode, decode
    "kuiper_serve.cli.generate",  # generate (served, or in-process with --local)
    "kuiper_serve.cli.serve",  # serve-inference
    "kuiper_serve.cli.up",  # up: both services on one machine
    "kuiper_serve.cli.chat",  # chat
    "kuiper_serve.cli.bench.command",  # bench: load generator
    "kuiper_serve.cli.export",  # export (int8 / bf16 folders)
)


def version() -> str:
    try:
        return metadata.version("kuiper-serve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuiper",
        description="kuiper-serve: LLM inference over gRPC (tokenizer + inference services).",
    )
    parser.add_argument("--version", action="version", version=f"kuiper-serve {version()}")
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
