"""Talking to a running inference service from the CLI: opening the client from the flags,
explaining a failed call, streaming the answer."""

from __future__ import annotations

import argparse
import json
import socket
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
        # Checked first: with `localhost` grpc tries ::1 too, and its message may end in
        # that address's "Connection refused" although 127.0.0.1 answered with TLS.
        tls_hint = f"{exc} (does {address} speak TLS? pass --tls-ca PEM or --tls)"
        if any(s in exc.message for s in TLS_SIGNS):  # a plaintext client at a TLS port
            return tls_hint
        if "Connection refused" in exc.message:
            # grpc reports the last address it tried: for `localhost` that may be ::1, refused,
            # while 127.0.0.1 listens and hung up on plaintext. Something listening means the
            # refusal is not the story.
            if _listening(address):
                return tls_hint
            return f"{exc} (is the inference service running at {address}? `kuiper up` starts it)"
    if address and exc.code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{exc} ({address} is not an inference service; is it the tokenizer's port?)"
    return str(exc)


def _listening(address: str) -> bool:
    """Whether any address `host:port` resolves to accepts a TCP connection."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return False
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or "localhost", int(port), type=socket.SOCK_STREAM
        )
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(sockaddr) == 0:
                return True
    return False


# What grpc reports when a plaintext client talks to a TLS port (the server hangs up).
TLS_SIGNS = (
    "Socket closed",
    "Connection reset by peer",
    "Broken pipe",
    "Trying to connect an http1.x server",
)


def result_json(
    token_ids: list[int],
    text: str,
    finish_reason: str | None,
    usage: dict | None,
    logprobs: list | None = None,
) -> str:
    """The one object `generate --json` prints, served or --local (docs/serving.md, "JSON
    output and exit codes"): snake_case keys, finish_reason in lower case ("length", "stop",
    "eos", "cancelled"), usage with the proto's Usage fields; "logprobs" only when asked for,
    one {"token_id", "logprob", "top": [[id, logprob], ...]} per token."""
    out: dict = {"token_ids": token_ids, "text": text, "finish_reason": finish_reason,
                 "usage": usage}  # fmt: skip
    if logprobs is not None:
        out["logprobs"] = [
            {"token_id": t, "logprob": lp, "top": [[i, v] for i, v in top]}
            for t, lp, top in logprobs
        ]
    return json.dumps(out, ensure_ascii=False)


def summary_line(finish: str | None, prompt_tokens: int, completion_tokens: int,
                 ttft_s: float, elapsed_s: float) -> str:  # fmt: skip
    """`[length: 5 prompt + 32 generated tokens, first token 0.12 s, 45.1 tok/s]`: decode
    speed counts the tokens after the first over the time after it."""
    rate = (
        (completion_tokens - 1) / (elapsed_s - ttft_s)
        if completion_tokens > 1 and elapsed_s > ttft_s
        else 0.0
    )
    return (f"[{finish}: {prompt_tokens} prompt + {completion_tokens} generated tokens, "
            f"first token {ttft_s:.2f} s, {rate:.1f} tok/s]")  # fmt: skip


def stream_to(out, chunks, seen: list[GenerateChunk] | None = None) -> list[GenerateChunk]:
    """Write each chunk's text to out (None: write nothing) and collect the chunks in seen."""
    seen = [] if seen is None else seen
    for chunk in chunks:
        if out is not None:
            out.write(chunk.text)
            out.flush()
        seen.append(chunk)
    return seen
