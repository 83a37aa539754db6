"""`kuiper serve-inference`: the inference service alone (e.g. in Kubernetes)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from kuiper_serve.cli.args import (
    add_connection_arguments,
    add_engine_flags,
    add_model_flags,
    add_security_arguments,
    apply_threads_flag,
    engine_config,
)
from kuiper_serve.common.defaults import (
    DEFAULT_HOST,
    INFERENCE_METRICS_PORT,
    INFERENCE_PORT,
    TOKENIZER_ADDRESS,
    TOKENIZER_ADDRESS_ENV,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-inference",
        help="run the inference service (needs a tokenizer service)",
        description="Serve kuiper.v1.InferenceService over gRPC. The tokenizer service is "
        f"reached at --tokenizer-address (env {TOKENIZER_ADDRESS_ENV}).",
    )
    add_model_flags(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to listen on, gRPC and metrics (default {DEFAULT_HOST}, this machine "
                   "only; use 0.0.0.0 in a container or to accept remote clients)")  # fmt: skip
    p.add_argument(
        "--port", type=int, default=INFERENCE_PORT, help=f"gRPC port (default {INFERENCE_PORT})"
    )
    p.add_argument(
        "--tokenizer-address",
        default=None,
        help="host:port of the tokenizer service "
        f"(default: ${TOKENIZER_ADDRESS_ENV} or {TOKENIZER_ADDRESS})",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=INFERENCE_METRICS_PORT,
        help=f"Prometheus /metrics port (default {INFERENCE_METRICS_PORT}; 0: a free port, logged; -1: off)",
    )
    add_connection_arguments(p)
    add_security_arguments(p)
    p.add_argument(
        "--tokenizer-tls",
        action="store_true",
        help="reach the tokenizer service over TLS, trusting the system's CAs",
    )
    p.add_argument(
        "--tokenizer-tls-ca",
        metavar="PEM",
        help="reach the tokenizer service over TLS, trusting this CA certificate "
        "(for a self-signed tokenizer certificate: that certificate)",
    )
    p.add_argument(
        "--tokenizer-auth-token",
        default=None,
        help="bearer token for the tokenizer service (default: the same as --auth-token)",
    )
    add_engine_flags(p)
    p.set_defaults(func=cmd_serve_inference)


def cmd_serve_inference(args: argparse.Namespace) -> int:
    from inference_service import frontends

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.frontends is not None and args.frontends < 1:
        print(f"kuiper serve-inference: --frontends must be >= 1, got {args.frontends}",
              file=sys.stderr)  # fmt: skip
        return 2
    apply_threads_flag(args)
    # Several frontends: a private folder (engine socket, metrics files) and prometheus_client
    # in multiprocess mode, set up before anything imports it.
    runtime = None
    if frontends.multi_frontend_possible(args.frontends, args.device, args.single_process):
        try:
            runtime = frontends.prepare()
        except OSError as exc:  # no writable temporary folder: serve with one frontend
            logging.getLogger("kuiper.inference").warning(
                "several frontends need a private temporary folder (%s); serving with 1", exc
            )
    try:
        return _serve(args, runtime)
    finally:
        if runtime is not None:
            frontends.cleanup(runtime)


def _serve(args: argparse.Namespace, runtime) -> int:
    from inference_service.server import ServerConfig, serve
    from kuiper_serve.common.auth import Security

    try:
        cfg = ServerConfig(
            engine=engine_config(args),
            host=args.host,
            port=args.port,
            tokenizer_address=args.tokenizer_address,
            metrics_port=args.metrics_port,
            max_request_bytes=args.max_request_bytes,
            engine_stall_s=args.engine_stall_timeout,
            engine_restart_s=args.engine_restart_timeout,
            frontends=args.frontends,
            runtime=runtime,
            grace_s=args.grace,
            max_connection_age_s=args.max_connection_age,
            single_process=args.single_process,
            auto_max_batch_size=args.max_batch_size is None,
            security=Security(args.tls_cert, args.tls_key, args.auth_token or None),
            tokenizer_tls=args.tokenizer_tls,
            tokenizer_tls_ca=args.tokenizer_tls_ca,
            tokenizer_auth_token=args.tokenizer_auth_token or args.auth_token or None,
        )
        return asyncio.run(serve(cfg))
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        print(f"kuiper serve-inference: {exc}", file=sys.stderr)
        return 1
