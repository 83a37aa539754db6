"""`python -m tokenizer_service [--model PATH] [--host H] [--port P] [--metrics-port M]`."""

from __future__ import annotations

import argparse
import sys

from tokenizer_service.cli import add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer_service", description="Run the kuiper tokenizer service."
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
