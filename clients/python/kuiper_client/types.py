"""What the clients return (plain dataclasses) and raise (KuiperError), plus the range checks
that turn a value a proto field cannot hold into an error naming the field."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc


class KuiperError(Exception):
    """A failed call: `code` is the gRPC status code, the message says what to do."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> KuiperError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code, details or code.name)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    queue_time_s: float
    cached_prompt_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed message: ids and text since the previous one; the last one carries
    finish_reason ("length", "stop", "eos", "cancelled") and usage."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    """A whole generation, joined."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    architecture: str
    vocab_size: int
    context_length: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    device: str
    kv_block_size: int
    kv_blocks_total: int
    max_batch_size: int


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_tokens: list[tuple[int, str]]  # (id, content)
    has_chat_template: bool
    backend: str  # "hf-tokenizers", "sentencepiece" or "gguf"
    source: str
    stop_ids: list[int]  # every id that ends generation


@dataclass(frozen=True)
class ChatTemplate:
    """Messages rendered by the model's chat template, and that text's ids."""

    text: str
    ids: list[int]


INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def check_range(name: str, value: int, lo: int, hi: int, note: str = "") -> None:
    """KuiperError(INVALID_ARGUMENT) naming `name` unless `value` is an integer in [lo, hi]
    (protobuf itself only says "Value out of range")."""
    try:
        ok = not isinstance(value, bool) and lo <= operator.index(value) <= hi
    except TypeError:
        ok = False
    if not ok:
        hint = f"; {note}" if note else ""
        raise KuiperError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name} must be an integer in [{lo}, {hi}]{hint}, got {value!r}",
        )


def check_ids(ids: Sequence[int], name: str) -> list[int]:
    """`ids` as a list of uint32 token ids (a string is not a sequence of ids)."""
    if isinstance(ids, str | bytes):
        raise KuiperError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be token ids, got {ids!r}"
        )
    for t in ids:
        check_range(name, t, 0, UINT32_MAX)
    return [operator.index(t) for t in ids]
