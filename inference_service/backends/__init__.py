"""Compute backends: `create_backend` picks numpy (CPU reference) or CUDA."""

from __future__ import annotations

from inference_service.backends.base import Backend, BatchItem
from inference_service.models.loader import LoadedModel

DEFAULT_CPU_KV_BYTES = 1 << 30  # the CPU pool is lazily mapped, so this is a cap, not a cost


def cuda_available() -> bool:
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # noqa: BLE001 - any failure means: no usable CUDA here
        return False


def create_backend(
    model: LoadedModel,
    device: str = "auto",
    num_blocks: int | None = None,
    block_size: int = 16,
    kv_memory_bytes: int | None = None,
) -> Backend:
    """A backend for `model` on `device` ("auto", "cpu" or "cuda").

    KV pool size: num_blocks if given, else kv_memory_bytes / bytes per block. On the CPU
    with neither, 1 GiB worth (at least one full context); on CUDA with neither, the CUDA
    backend sizes its pool from free device memory (num_blocks=None)."""
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        from inference_service.backends.numpy_backend import NumpyBackend, kv_bytes_per_block

        if num_blocks is None:
            per_block = kv_bytes_per_block(model.config, block_size)
            budget = kv_memory_bytes if kv_memory_bytes is not None else DEFAULT_CPU_KV_BYTES
            num_blocks = budget // per_block
            if kv_memory_bytes is None:
                context_blocks = -(-model.config.max_position_embeddings // block_size)
                num_blocks = max(num_blocks, context_blocks)
            if num_blocks < 1:
                raise ValueError(
                    f"kv_memory_bytes={kv_memory_bytes} is less than one KV block "
                    f"({per_block} bytes)"
                )
        return NumpyBackend(model, num_blocks=num_blocks, block_size=block_size)
    if device == "cuda" or device.startswith("cuda:"):
        from inference_service.backends.cuda.backend import CudaBackend

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return CudaBackend(
            model,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_memory_bytes=kv_memory_bytes,
            device_index=index,
        )
    raise ValueError(f"unknown device {device!r} (use auto, cpu or cuda)")


__all__ = ["Backend", "BatchItem", "create_backend", "cuda_available"]
