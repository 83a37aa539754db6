"""DecodeStream from the client side: incremental detokenization over one bidirectional call.

Each `send` writes one request and returns the server's answer to it (the tokenizer service
answers every request, in order). A text delta never ends inside a UTF-8 character; the deltas
of one sequence join to Decode of all its ids. `push`/`finish` serve the common case of one
sequence; `send` multiplexes many (as the inference service does, one message per step).
After an error (an id outside the vocabulary, a deadline) every later call raises the same
KuiperError: the server ended the stream.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from kuiper.v1 import tokenizer_pb2 as tpb

from kuiper_client.types import UINT64_MAX, KuiperError, check_ids, check_range


@dataclass(frozen=True)
class SequenceIds:
    """New ids of one sequence. `context_ids` and `skip_special_tokens` are read only when the
    sequence opens (its first message); `finished` flushes held-back bytes and frees it."""

    sequence_id: int
    ids: Sequence[int] = ()
    context_ids: Sequence[int] = ()
    skip_special_tokens: bool = False
    finished: bool = False


@dataclass(frozen=True)
class SequenceDelta:
    sequence_id: int
    text: str


@dataclass
class _Sequences:
    """Which sequences are open, so push() sends context only on a sequence's first message."""

    open: set[int] = field(default_factory=set)

    def request(self, sequences: Iterable[SequenceIds]) -> tpb.DecodeStreamRequest:
        out = []
        for s in sequences:
            check_range("sequence_id", s.sequence_id, 0, UINT64_MAX)
            out.append(
                tpb.SequenceIds(
                    sequence_id=s.sequence_id,
                    ids=check_ids(s.ids, "ids"),
                    context_ids=check_ids(s.context_ids, "context_ids"),
                    skip_special_tokens=s.skip_special_tokens,
                    finished=s.finished,
                )
            )
            if s.finished:
                self.open.discard(s.sequence_id)
            else:
                self.open.add(s.sequence_id)
        return tpb.DecodeStreamRequest(sequences=out)

    def one(
        self,
        ids: Sequence[int],
        sequence_id: int,
        context_ids: Sequence[int],
        skip_special_tokens: bool,
        finished: bool,
    ) -> SequenceIds:
        opening = sequence_id not in self.open
        return SequenceIds(
            sequence_id,
            ids,
            context_ids if opening else (),
            skip_special_tokens if opening else False,
            finished,
        )


def _deltas(resp: tpb.DecodeStreamResponse) -> list[SequenceDelta]:
    return [SequenceDelta(d.sequence_id, d.text) for d in resp.deltas]


_END = object()


class DecodeStream:
    """Blocking DecodeStream (from `KuiperClient.decode_stream()`). A context manager."""

    def __init__(self, method, timeout: float | None, metadata) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call = method(iter(self._requests.get, _END), timeout=timeout, metadata=metadata)
        self._replies: Iterator[tpb.DecodeStreamResponse] = iter(self._call)
        self._seqs = _Sequences()
        self._error: KuiperError | None = None
        self._closed = False

    def send(self, sequences: Iterable[SequenceIds]) -> list[SequenceDelta]:
        """The new ids of any number of sequences; one delta per sequence, in order."""
        request = self._seqs.request(sequences)
        if self._error is not None:
            raise self._error
        if self._closed:
            raise KuiperError(grpc.StatusCode.FAILED_PRECONDITION, "the DecodeStream is closed")
        self._requests.put(request)
        try:
            return _deltas(next(self._replies))
        except grpc.RpcError as exc:
            self._error = KuiperError.from_rpc(exc)
        except StopIteration:
            self._error = KuiperError(
                grpc.StatusCode.UNAVAILABLE, "the tokenizer service ended the DecodeStream"
            )
        raise self._error

    def push(
        self,
        ids: Sequence[int],
        *,
        sequence_id: int = 1,
        context_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
        finished: bool = False,
    ) -> str:
        """One sequence's next ids -> the text they complete. The first push of a sequence
        opens it with `context_ids` (e.g. the prompt) and `skip_special_tokens`."""
        seq = self._seqs.one(ids, sequence_id, context_ids, skip_special_tokens, finished)
        return self.send([seq])[0].text

    def finish(self, ids: Sequence[int] = (), *, sequence_id: int = 1) -> str:
        """Close a sequence: the text of `ids` plus the bytes held back for it."""
        return self.push(ids, sequence_id=sequence_id, finished=True)

    def close(self) -> None:
        """End the call (the server sees the end of the requests)."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        if self._error is None:
            try:
                for _ in self._replies:
                    pass
            except grpc.RpcError:
                pass
        self._call.cancel()  # no-op once the call is done

    def __enter__(self) -> DecodeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDecodeStream:
    """asyncio DecodeStream (from `AsyncKuiperClient.decode_stream()`). `async with` closes it."""

    def __init__(self, method, timeout: float | None, metadata) -> None:
        self._call = method(timeout=timeout, metadata=metadata)
        self._seqs = _Sequences()
        self._error: KuiperError | None = None
        self._closed = False

    async def send(self, sequences: Iterable[SequenceIds]) -> list[SequenceDelta]:
        request = self._seqs.request(sequences)
        if self._error is not None:
            raise self._error
        if self._closed:
            raise KuiperError(grpc.StatusCode.FAILED_PRECONDITION, "the DecodeStream is closed")
        try:
            await self._call.write(request)
            reply = await self._call.read()
        except grpc.RpcError as exc:
            self._error = KuiperError.from_rpc(exc)
            raise self._error from None
        if reply is grpc.aio.EOF:
            code = await self._call.code()
            details = await self._call.details()
            if code == grpc.StatusCode.OK:
                code, details = grpc.StatusCode.UNAVAILABLE, "the tokenizer service ended it"
            self._error = KuiperError(code, details or code.name)
            raise self._error
        return _deltas(reply)

    async def push(
        self,
        ids: Sequence[int],
        *,
        sequence_id: int = 1,
        context_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
        finished: bool = False,
    ) -> str:
        seq = self._seqs.one(ids, sequence_id, context_ids, skip_special_tokens, finished)
        return (await self.send([seq]))[0].text

    async def finish(self, ids: Sequence[int] = (), *, sequence_id: int = 1) -> str:
        return await self.push(ids, sequence_id=sequence_id, finished=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            try:
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError:
                pass
        self._call.cancel()

    async def __aenter__(self) -> AsyncDecodeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
