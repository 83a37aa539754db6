"""Python client for kuiper-serve (and the `kuiper` CLI's client side)."""

from kuiper_client.client import (
    AsyncKuiperClient,
    Completion,
    GenerateChunk,
    KuiperClient,
    KuiperError,
    ModelInfo,
    TokenLogprob,
    Usage,
    sampling_params,
)

__all__ = [
    "AsyncKuiperClient",
    "Completion",
    "GenerateChunk",
    "KuiperClient",
    "KuiperError",
    "ModelInfo",
    "TokenLogprob",
    "Usage",
    "sampling_params",
]
