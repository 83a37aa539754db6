"""Compile the project's CUDA kernels to cubins with nvcc and load them with PyCUDA.

Cubins are cached on disk, keyed by the kernel source (and every shared header), the nvcc
version, the target arch and the flags, under $KUIPER_HOME/cuda-kernels or the user cache dir.
A cold start compiles all files in parallel (seconds); a warm start only hashes the sources,
asks nvcc its version and loads the cubins (well under a second). Everything but `load_kernels`
works without a GPU or PyCUDA, so CI can build and unit-test it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KERNEL_DIR = Path(__file__).resolve().parent
NVCC_FLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-lineinfo")
# Kernels that stage operands in more than the default 48 KiB of dynamic shared memory.
BIG_SMEM_PREFIXES = ("gemv_", "gemm_", "prefill_attention_")
MAX_DYNAMIC_SMEM = 200 * 1024


class KernelBuildError(RuntimeError):
    """nvcc is missing or rejected a kernel; the message says which and why."""


def kernel_sources(kernel_dir: Path = KERNEL_DIR) -> list[Path]:
    return sorted(kernel_dir.glob("*.cu"))


def header_sources(kernel_dir: Path = KERNEL_DIR) -> list[Path]:
    return sorted(kernel_dir.glob("*.cuh"))


def find_nvcc() -> str | None:
    """$KUIPER_NVCC, nvcc on PATH, or $CUDA_HOME/bin/nvcc."""
    env = os.environ.get("KUIPER_NVCC")
    if env:
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def parse_nvcc_version(text: str) -> str:
    """'Cuda compilation tools, release 13.0, V13.0.88' -> '13.0.88'."""
    m = re.search(r"V(\d+\.\d+\.\d+)", text) or re.search(r"release (\d+\.\d+)", text)
    if not m:
        raise KernelBuildError(f"cannot read the nvcc version from: {text.strip()[:200]!r}")
    return m.group(1)


@functools.cache
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise KernelBuildError(f"{nvcc} --version failed: {out.stderr.strip()[:500]}")
    return parse_nvcc_version(out.stdout)


def arch_for(compute_capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm_90'."""
    major, minor = compute_capability
    return f"sm_{major}{minor}"


def cache_key(
    source: bytes, headers: Iterable[bytes], version: str, arch: str, flags: Sequence[str]
) -> str:
    h = hashlib.sha256()
    for part in (source, *headers, version.encode(), arch.encode(), " ".join(flags).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    home = os.environ.get("KUIPER_HOME")
    if home:
        return Path(home) / "cuda-kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("kuiper")) / "cuda-kernels"


def compile_cubin(src: Path, arch: str, out: Path, nvcc: str, flags: Sequence[str] = NVCC_FLAGS):
    """nvcc -cubin into a temp file next to `out`, then an atomic rename (safe for concurrent
    processes sharing one cache)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".cubin", dir=out.parent)
    os.close(fd)
    cmd = [nvcc, "-cubin", f"-arch={arch}", *flags, "-I", str(src.parent), "-o", tmp, str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"nvcc failed on {src.name} for {arch}:\n{res.stderr.strip()}")
    os.replace(tmp, out)


@dataclass(frozen=True)
class BuiltKernels:
    arch: str
    cubins: dict[str, Path]  # module name (file stem) -> cubin path
    compiled: list[str]  # the modules this call had to compile (empty on a warm start)


def build_all(
    arch: str, kernel_dir: Path = KERNEL_DIR, out_dir: Path | None = None, jobs: int | None = None
) -> BuiltKernels:
    """Every .cu file as a cubin for `arch`, compiled only where the cache has none."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            "nvcc not found: install the CUDA toolkit, put nvcc on PATH, or set KUIPER_NVCC"
        )
    version = nvcc_version(nvcc)
    out_dir = out_dir or cache_dir()
    headers = [p.read_bytes() for p in header_sources(kernel_dir)]
    cubins: dict[str, Path] = {}
    todo: list[tuple[Path, Path]] = []
    for src in kernel_sources(kernel_dir):
        key = cache_key(src.read_bytes(), headers, version, arch, NVCC_FLAGS)
        path = out_dir / f"{src.stem}-{arch}-{key}.cubin"
        cubins[src.stem] = path
        if not path.exists():
            todo.append((src, path))
    if todo:
        with ThreadPoolExecutor(max_workers=jobs or min(len(todo), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda sp: compile_cubin(sp[0], arch, sp[1], nvcc), todo))
    return BuiltKernels(arch, cubins, [s.stem for s, _ in todo])


class Kernels:
    """The loaded modules; `kernels.fn("gemv_t1")` returns the PyCUDA Function by name."""

    def __init__(self, built: BuiltKernels) -> None:
        import pycuda.driver as cuda

        self.built = built
        self._modules = {name: cuda.module_from_file(str(p)) for name, p in built.cubins.items()}
        self._funcs: dict[str, Any] = {}
        self._cuda = cuda

    def fn(self, name: str) -> Any:
        f = self._funcs.get(name)
        if f is None:
            # Look the name up in the cubins' symbol strings first: asking every module would
            # make the driver report failed lookups (compute-sanitizer counts those as errors).
            needle = name.encode() + b"\x00"
            owners = [m for m, p in self.built.cubins.items() if needle in p.read_bytes()]
            for mod in owners:
                try:
                    f = self._modules[mod].get_function(name)
                    break
                except self._cuda.LogicError:
                    continue
            if f is None:
                raise KeyError(f"no kernel named {name!r} in {sorted(self._modules)}")
            if name.startswith(BIG_SMEM_PREFIXES):
                f.set_attribute(
                    self._cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, MAX_DYNAMIC_SMEM
                )
            self._funcs[name] = f
        return f


def load_kernels(arch: str | None = None) -> Kernels:
    """Build (or find cached) and load every kernel for the current context's device."""
    if arch is None:
        import pycuda.driver as cuda

        arch = arch_for(cuda.Context.get_device().compute_capability())
    return Kernels(build_all(arch))
