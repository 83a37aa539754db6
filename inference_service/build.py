"""From an EngineConfig to a running setup: resolve and load the model, create its backend,
wrap both in an Engine. The server and `LLM` both start this way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from inference_service.backends import create_backend
from inference_service.config import EngineConfig
from inference_service.engine.engine import Engine
from inference_service.models.loader import LoadedModel, load_model


@dataclass
class BuiltEngine:
    engine: Engine  # not started yet
    model: LoadedModel  # config, source and dtype; no weights (the backend holds its copy)
    path: Path  # the resolved model file or folder


def build_engine(config: EngineConfig, *, one_context_kv: bool = False) -> BuiltEngine:
    """Load config.model (None: the default model) onto config.device. one_context_kv: with
    neither num_kv_blocks nor kv_memory_mb set, a KV pool of one full context instead of
    the backend's default size."""
    from kuiper_serve.common.model_source import resolve_model

    path = resolve_model(config.model)
    model = load_model(path, keep_quantized=True)  # CPU: kept quantized; CUDA: bf16 arena
    num_blocks = config.num_kv_blocks
    if one_context_kv and num_blocks is None and config.kv_memory_mb is None:
        context = model.config.max_position_embeddings
        context = min(config.max_model_len or context, context)
        num_blocks = -(-context // config.block_size)
    backend = create_backend(
        model,
        device=config.device,
        num_blocks=num_blocks,
        block_size=config.block_size,
        kv_memory_bytes=config.kv_memory_bytes,
    )
    # Drop our reference to the loaded weights, so the process does not keep two copies.
    return BuiltEngine(Engine(backend, config), dataclasses.replace(model, weights={}), path)
