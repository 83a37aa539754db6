"""The engine's settings, defined once: the `kuiper` CLI builds an EngineConfig (its flags take
their defaults from here), the server and `LLM` pass it on, and `build_engine` turns it into a
model, a backend and a running Engine (whose scheduler reads its batching limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # What runs where.
    model: str | None = None  # GGUF file or HF folder; None: the default model (SmolLM2-135M)
    device: str = "auto"  # auto (cuda when a GPU and pycuda exist), cpu, cuda, cuda:N
    # The KV cache pool: num_kv_blocks if set, else kv_memory_mb, else the backend's choice.
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None
    kv_memory_mb: float | None = None
    # Scheduling.
    max_batch_size: int = 32  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens per step: decodes + prefill chunks
    max_waiting: int = 256  # accepted requests not yet scheduled, at most
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the backend's (the model's context length)
    # Schedule step N+1 while step N runs (backends with step_async, see backends/base.py);
    # False keeps the synchronous loop (the default, and for debugging).
    overlap_steps: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                "max_num_batched_tokens must be >= max_batch_size so every running "
                f"sequence can decode each step (got {self.max_num_batched_tokens} < "
                f"{self.max_batch_size})"
            )

    @property
    def kv_memory_bytes(self) -> int | None:
        return int(self.kv_memory_mb * 2**20) if self.kv_memory_mb is not None else None
