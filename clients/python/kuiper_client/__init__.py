"""Python client for kuiper-serve: `KuiperClient` (blocking) and `AsyncKuiperClient` (asyncio)
over every RPC of the inference and tokenizer services. Needs only grpcio and protobuf."""

from kuiper_client.client import (
    AsyncKuiperClient,
    KuiperClient,
    sampling_params,
    tokenizer_address_for,
)
from kuiper_client.decode_stream import (
    AsyncDecodeStream,
    DecodeStream,
    SequenceDelta,
    SequenceIds,
)
from kuiper_client.types import (
    ChatTemplate,
    Completion,
    GenerateChunk,
    KuiperError,
    ModelInfo,
    TokenizerInfo,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AsyncDecodeStream",
    "AsyncKuiperClient",
    "ChatTemplate",
    "Completion",
    "DecodeStream",
    "GenerateChunk",
    "KuiperClient",
    "KuiperError",
    "ModelInfo",
    "SequenceDelta",
    "SequenceIds",
    "TokenLogprob",
    "TokenizerInfo",
    "Usage",
    "sampling_params",
    "tokenizer_address_for",
]
