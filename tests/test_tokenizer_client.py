"""The inference service's DecodeStream client: what a failed write reports."""

from __future__ import annotations

import asyncio

import grpc

from inference_service.tokenizer_client import (
    DecodeStreamMux,
    TokenizerClient,
    TokenizerRequestError,
    TokenizerUnavailableError,
)


class EndedCall:
    """A stream the tokenizer service has ended with a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def done(self) -> bool:
        return True

    async def code(self) -> grpc.StatusCode:
        return self._code

    async def details(self) -> str:
        return self._details


def write_failure() -> grpc.aio.AioRpcError:
    """What grpc.aio raises for a write into a stream that has just ended."""
    md = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, md, md, "Internal error from Core")


def test_failed_write_reports_the_streams_own_status():
    async def main() -> None:
        client = TokenizerClient("127.0.0.1:1", timeout_s=1.0)
        mux = DecodeStreamMux(client)
        try:
            bad = EndedCall(grpc.StatusCode.INVALID_ARGUMENT, "token id 9999 is out of range")
            err = await mux._write_error(bad, write_failure())
            assert isinstance(err, TokenizerRequestError)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "9999" in str(err)
            gone = EndedCall(grpc.StatusCode.UNAVAILABLE, "connection reset")
            assert isinstance(
                await mux._write_error(gone, write_failure()), TokenizerUnavailableError
            )
            # no status of its own: the connection went (a killed tokenizer), reported as
            # unavailable so the mux reconnects and replays instead of failing the request
            err = await mux._write_error(EndedCall(grpc.StatusCode.OK, ""), write_failure())
            assert isinstance(err, TokenizerUnavailableError) and "Internal error from Core" in str(
                err
            )
        finally:
            await client.close()

    asyncio.run(main())
