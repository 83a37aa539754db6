"""Opening a channel to a kuiper service: plaintext or TLS, with the optional bearer token.

The one channel opener of the project: the clients here, the inference service (towards the
tokenizer service) and the `kuiper` CLI all use it. The well-known ports live here too, so that
this package needs nothing but grpc and the kuiper.v1 stubs and the servers share its numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

INFERENCE_PORT = 50051
TOKENIZER_PORT = 50052
DEFAULT_ADDRESS = f"localhost:{INFERENCE_PORT}"
DEFAULT_TOKENIZER_ADDRESS = f"localhost:{TOKENIZER_PORT}"


def channel_credentials(
    ca: str | Path | None = None, token: str | None = None
) -> grpc.ChannelCredentials:
    """TLS trusting `ca` (or the system roots), plus the bearer token if given."""
    root = Path(ca).read_bytes() if ca else None
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token (for plaintext channels, where call credentials
    are not allowed)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(
    address: str,
    *,
    tls: bool = False,
    ca: str | Path | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    aio: bool = False,
) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """A client channel and the metadata each call must send. TLS when `tls` or `ca` is given
    (trusting `ca`, else the system roots), the token then rides as call credentials; on
    plaintext (call credentials need TLS) it goes in the returned metadata instead. Raises
    OSError when `ca` cannot be read."""
    module = grpc.aio if aio else grpc
    if tls or ca:
        creds = channel_credentials(ca, token)
        return module.secure_channel(address, creds, options=list(options)), ()
    return module.insecure_channel(address, options=list(options)), bearer_metadata(token)
