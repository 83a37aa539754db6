"""The project's CUDA kernels (*.cu) and the loader that compiles and caches them."""

from cuda_kernels.loader import (
    BuiltKernels,
    KernelBuildError,
    Kernels,
    build_all,
    cache_key,
    kernel_sources,
    load_kernels,
)

__all__ = [
    "BuiltKernels",
    "KernelBuildError",
    "Kernels",
    "build_all",
    "cache_key",
    "kernel_sources",
    "load_kernels",
]
