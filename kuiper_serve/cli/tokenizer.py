"""`kuiper serve-tokenizer`, `kuiper encode`, `kuiper decode`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kuiper_serve.cli.args import (
    add_client_security_arguments,
    add_connection_arguments,
    add_security_arguments,
    read_prompt,
)
from kuiper_serve.common.defaults import (
    AUTH_TOKEN_ENV,
    DEFAULT_HOST,
    TOKENIZER_ADDRESS,
    TOKENIZER_ADDRESS_ENV,
    TOKENIZER_GRACE_S,
    TOKENIZER_METRICS_PORT,
    TOKENIZER_PORT,
)

CALL_TIMEOUT_S = 30.0
_MAX_UINT32 = (1 << 32) - 1


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a .gguf file, a folder with tokenizer.json (+ tokenizer_config.json), or a "
        "sentencepiece .model file / folder with tokenizer.model. Default: the SmolLM2-135M-"
        "Instruct GGUF, downloaded into $KUIPER_HOME on first use",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"interface to listen on (default {DEFAULT_HOST}, this machine only; use 0.0.0.0 "
        "in a container or to accept remote clients)",
    )
    parser.add_argument(
        "--port", type=int, default=TOKENIZER_PORT, help=f"gRPC port (default {TOKENIZER_PORT})"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=TOKENIZER_METRICS_PORT,
        help=f"Prometheus metrics HTTP port, /metrics (default {TOKENIZER_METRICS_PORT}; "
        "0: a free port, logged; -1: off)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=TOKENIZER_GRACE_S,
        help="seconds in-flight calls get to finish after SIGTERM/SIGINT "
        f"(default {TOKENIZER_GRACE_S:g})",
    )
    add_connection_arguments(parser)
    add_security_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    from kuiper_serve.common.auth import Security
    from tokenizer_service.server import serve

    metrics_port = None if args.metrics_port < 0 else args.metrics_port
    security = Security(args.tls_cert, args.tls_key, args.auth_token or None)
    return serve(
        args.model,
        args.host,
        args.port,
        metrics_port,
        args.grace,
        security,
        max_connection_age_s=args.max_connection_age,
    )


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get(TOKENIZER_ADDRESS_ENV, TOKENIZER_ADDRESS),
        help=f"tokenizer service HOST:PORT (default ${TOKENIZER_ADDRESS_ENV} or {TOKENIZER_ADDRESS})",
    )
    add_client_security_arguments(parser)


def _stub(args: argparse.Namespace) -> tuple[Any, Any, tuple]:
    from kuiper.v1 import tokenizer_pb2_grpc
    from kuiper_client.channel import open_channel

    channel, metadata = open_channel(
        args.address,
        tls=args.tls,
        ca=args.tls_ca,
        token=args.auth_token,
        options=[("grpc.max_receive_message_length", 256 << 20)],
    )
    return channel, tokenizer_pb2_grpc.TokenizerServiceStub(channel), metadata


def _call(args: argparse.Namespace, fn: Any) -> tuple[Any, int]:
    """Run one RPC; turn gRPC failures into one readable line on stderr and exit code 1."""
    import grpc

    address = args.address
    try:
        channel, stub, metadata = _stub(args)
    except OSError as exc:
        print(f"error: cannot read the TLS CA certificate: {exc}", file=sys.stderr)
        return None, 2
    try:
        return fn(stub, metadata), 0
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = (
                "Does it speak TLS? Pass --tls-ca PEM or --tls."  # a plaintext call to TLS
                if "Socket closed" in (exc.details() or "")
                else "Start it with `kuiper serve-tokenizer`, or point --address at a running one."
            )
            print(
                f"error: cannot reach the tokenizer service at {address} ({exc.details()}).\n"
                + hint,
                file=sys.stderr,
            )
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            print(
                f"error: the tokenizer service at {address} wants a bearer token: "
                f"pass --auth-token or set ${AUTH_TOKEN_ENV} ({exc.details()})",
                file=sys.stderr,
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            print(f"error: no answer from {address} within {CALL_TIMEOUT_S:g}s", file=sys.stderr)
        else:
            print(f"error: {code.name}: {exc.details()}", file=sys.stderr)
        return None, 1
    finally:
        channel.close()


def _encode(args: argparse.Namespace) -> int:
    from kuiper.v1 import tokenizer_pb2 as pb

    text = read_prompt(args.text)
    request = pb.EncodeRequest(texts=[text], add_special_tokens=not args.no_special_tokens)
    reply, rc = _call(
        args, lambda stub, md: stub.Encode(request, timeout=CALL_TIMEOUT_S, metadata=md)
    )
    if rc == 0:
        print(json.dumps(list(reply.results[0].ids)))
    return rc


def _token_id(value: str) -> int:
    try:
        token_id = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a token id (an integer)") from None
    if not 0 <= token_id <= _MAX_UINT32:
        raise argparse.ArgumentTypeError(f"{token_id} is not a token id (0 .. 2^32-1)")
    return token_id


def _decode(args: argparse.Namespace) -> int:
    from kuiper.v1 import tokenizer_pb2 as pb

    ids = args.ids
    if len(ids) == 1 and ids[0].lstrip().startswith("["):  # accept `kuiper encode`'s JSON output
        try:
            ids = [str(i) for i in json.loads(ids[0])]
        except ValueError:
            print(f"error: {ids[0]!r} is not a JSON list of token ids", file=sys.stderr)
            return 2
    try:
        token_ids = [_token_id(i) for i in ids]
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = pb.DecodeRequest(
        sequences=[pb.TokenIds(ids=token_ids)], skip_special_tokens=args.skip_special_tokens
    )
    reply, rc = _call(
        args, lambda stub, md: stub.Decode(request, timeout=CALL_TIMEOUT_S, metadata=md)
    )
    if rc == 0:
        print(reply.texts[0])
    return rc


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve-tokenizer",
        help="run the tokenizer service (gRPC: Encode, Decode, DecodeStream, ApplyChatTemplate)",
        description="Run the kuiper.v1.TokenizerService gRPC server for one model's tokenizer, "
        "with grpc health, server reflection and Prometheus metrics. SIGTERM drains in-flight "
        "calls and exits 0.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)

    encode = subparsers.add_parser(
        "encode",
        help="turn text into token ids with a running tokenizer service (prints JSON)",
        description="Encode TEXT with the tokenizer service and print the token ids as a JSON "
        "list, e.g. `kuiper encode 'Hello world'` -> [19556, 905].",
    )
    _client_arguments(encode)
    encode.add_argument(
        "--no-special-tokens",
        action="store_true",
        help="do not add the model's special tokens (e.g. BOS)",
    )
    encode.add_argument("text", metavar="TEXT", help="the text to encode; - reads stdin")
    encode.set_defaults(func=_encode)

    decode = subparsers.add_parser(
        "decode",
        help="turn token ids back into text with a running tokenizer service",
        description="Decode token ids with the tokenizer service and print the text, e.g. "
        '`kuiper decode 19556 905` or `kuiper decode "$(kuiper encode hi)"`.',
    )
    _client_arguments(decode)
    decode.add_argument(
        "--skip-special-tokens",
        action="store_true",
        help="leave special tokens (BOS, EOS, chat markers) out of the text",
    )
    decode.add_argument(
        "ids", metavar="ID", nargs="+", help="token ids, separate or as one JSON list"
    )
    decode.set_defaults(func=_decode)
