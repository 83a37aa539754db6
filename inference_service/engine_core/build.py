"""The engine a server runs, built the same way in the engine-core process and in the
single-process server: `inference_service.build` plus the serving defaults (the batch width
from the backend) and an out-of-memory message that says what to lower."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from inference_service.backends.base import Backend
from inference_service.build import build_engine as build_model_engine
from inference_service.config import EngineConfig
from inference_service.engine.engine import Engine

CPU_MAX_BATCH_SIZE = 32  # the numpy backend gains nothing from wider batches on a few cores


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build the engine (picklable: it crosses to the core process)."""

    config: EngineConfig
    auto_max_batch_size: bool = False  # max_batch_size from the backend (default_max_batch_size)


@dataclass(frozen=True)
class BuiltEngine:
    engine: Engine  # not started yet
    source: str  # the resolved model path
    dtype: str


def default_max_batch_size(backend: Backend) -> int:
    """The widest batch the backend runs in one step (the CUDA backend's `max_batch`, the top
    of its buffers and graph buckets: 256), never more sequences than the KV pool has blocks
    (each running sequence holds at least one). CPU: 32."""
    limit = int(getattr(backend, "max_batch", CPU_MAX_BATCH_SIZE))
    return max(1, min(limit, backend.num_blocks))


def _is_out_of_memory(exc: BaseException) -> bool:
    # numpy raises MemoryError; pycuda its own MemoryError class; CUDA says "out of memory".
    return type(exc).__name__ == "MemoryError" or "out of memory" in str(exc).lower()


def build_engine(spec: EngineSpec) -> BuiltEngine:
    """Load the model and create the backend in this process (the device context too).
    Running out of memory raises RuntimeError saying what to lower."""
    config = spec.config
    try:
        built = build_model_engine(config)
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        raise RuntimeError(
            f"not enough {'device' if config.device != 'cpu' else 'host'} memory for the model "
            f"and its KV cache ({type(exc).__name__}: {exc}); lower --kv-memory or "
            "--num-kv-blocks (or --max-batch-size / --max-batched-tokens), or pick a smaller model"
        ) from None
    engine = built.engine
    if spec.auto_max_batch_size:
        engine = widest_batch_engine(engine)
    return BuiltEngine(engine, str(built.path), built.model.dtype)


def widest_batch_engine(engine: Engine) -> Engine:
    """An engine (not started) over the same backend whose max_batch_size is the backend's
    widest batch (default_max_batch_size): the server's default, and `LLM`'s."""
    width = default_max_batch_size(engine.backend)
    config = dataclasses.replace(
        engine.config,
        max_batch_size=width,
        max_num_batched_tokens=max(engine.config.max_num_batched_tokens, width),
    )
    return Engine(engine.backend, config)  # the first one never started
