"""Talking to a running inference service from the CLI: opening the client from the flags,
explaining a failed call, streaming the answer."""

from __future__ import annotations

import argparse
import sys

import grpc
from kuiper_client.client import GenerateChunk, KuiperClient, KuiperError

from kuiper_serve.common.defaults import AUTH_TOKEN_ENV, INFERENCE_ADDRESS


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
            getattr(args, "address", None) or INFERENCE_ADDRESS,
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


def stream_to(out, chunks, seen: list[GenerateChunk] | None = None) -> list[GenerateChunk]:
    """Write each chunk's text to out (None: write nothing) and collect the chunks in seen."""
    seen = [] if seen is None else seen
    for chunk in chunks:
        if out is not None:
            out.write(chunk.text)
            out.flush()
        seen.append(chunk)
    return seen
