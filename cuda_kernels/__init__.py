"""The project's CUDA kernels (*.cu) and the loader that compiles, caches, loads and launches
them."""

from cuda_kernels.loader import (
    BuiltKernels,
    Kernel,
    KernelBuildError,
    KernelModule,
    Kernels,
    build_all,
    cache_key,
    kernel_modules,
    kernel_sources,
    load_kernels,
)

__all__ = [
    "BuiltKernels",
    "Kernel",
    "KernelBuildError",
    "KernelModule",
    "Kernels",
    "build_all",
    "cache_key",
    "kernel_modules",
    "kernel_sources",
    "load_kernels",
]
