"""Compile the project's CUDA kernels to cubins with nvcc and load each cubin once.

A kernel file is one module, or several: VARIANTS lists the files compiled more than once with
`-D` defines (one module per row count / unroll), so their builds run in parallel. Cubins are
cached on disk, keyed by the source (and every shared header), the defines, the nvcc version,
the target arch and the flags, under $KUIPER_HOME/cuda-kernels or the user cache dir. A cold
start compiles every module in parallel (seconds); a warm start only hashes the sources, asks
nvcc its version and loads the cubins.

Loading and launching go through cuda.bindings (the driver API): each cubin is loaded once per
context with cuModuleLoadData, and every kernel is launched with cuLaunchKernel, or
cuLaunchKernelEx with the programmatic-stream-serialization attribute (programmatic dependent
launch, which PyCUDA cannot set). PyCUDA owns the context, memory and streams: launches take
its stream handles and device pointers as plain ints. Everything but `load_kernels` works
without a GPU, so CI can build and unit-test it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent
NVCC_FLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-lineinfo")
# Kernels that stage operands in more than the default 48 KiB of dynamic shared memory.
BIG_SMEM_PREFIXES = ("gemv_", "gemm_", "prefill_attention_")
MAX_DYNAMIC_SMEM = 200 * 1024

# Files compiled once per variant: module f"{stem}_{suffix}" with -D{macro}={value}.
GEMV_ROWS = tuple(range(1, 9))  # gemv.cu: gemv*_t{rows} for 1..8 token rows
DECODE_UNROLLS = (1, 2, 4, 8)  # attention_decode.cu: paged_decode_d*_u{U}
VARIANTS: dict[str, tuple[tuple[str, tuple[tuple[str, int], ...]], ...]] = {
    "gemv": tuple((f"t{t}", (("GEMV_ROWS", t),)) for t in GEMV_ROWS),
    "attention_decode": tuple((f"u{u}", (("DEC_UNROLL", u),)) for u in DECODE_UNROLLS),
}


class KernelBuildError(RuntimeError):
    """nvcc is missing or rejected a kernel; the message says which and why."""


@dataclass(frozen=True)
class KernelModule:
    """One cubin to build: a .cu file and the -D defines of this variant."""

    name: str  # module name: the file stem, plus the variant suffix (gemv_t3)
    source: Path
    defines: tuple[tuple[str, int], ...] = ()

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(f"-D{k}={v}" for k, v in self.defines)


def kernel_sources(kernel_dir: Path = KERNEL_DIR) -> list[Path]:
    return sorted(kernel_dir.glob("*.cu"))


def kernel_modules(kernel_dir: Path = KERNEL_DIR) -> list[KernelModule]:
    """Every module to build: one per .cu file, or one per variant for the files in VARIANTS."""
    mods: list[KernelModule] = []
    for src in kernel_sources(kernel_dir):
        variants = VARIANTS.get(src.stem)
        if variants is None:
            mods.append(KernelModule(src.stem, src))
        else:
            mods += [KernelModule(f"{src.stem}_{sfx}", src, d) for sfx, d in variants]
    return mods


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
        defines = " ".join(f for f in flags if f.startswith("-D"))
        what = f"{src.name} ({defines})" if defines else src.name
        raise KernelBuildError(f"nvcc failed on {what} for {arch}:\n{res.stderr.strip()}")
    os.replace(tmp, out)


@dataclass(frozen=True)
class BuiltKernels:
    arch: str
    cubins: dict[str, Path]  # module name -> cubin path
    compiled: list[str]  # the modules this call had to compile (empty on a warm start)


def build_all(
    arch: str, kernel_dir: Path = KERNEL_DIR, out_dir: Path | None = None, jobs: int | None = None
) -> BuiltKernels:
    """Every kernel module as a cubin for `arch`, compiled only where the cache has none."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            "nvcc not found: install the CUDA toolkit, put nvcc on PATH, or set KUIPER_NVCC"
        )
    version = nvcc_version(nvcc)
    out_dir = out_dir or cache_dir()
    headers = [p.read_bytes() for p in header_sources(kernel_dir)]
    cubins: dict[str, Path] = {}
    todo: list[tuple[KernelModule, Path]] = []
    sources: dict[Path, bytes] = {}
    for mod in kernel_modules(kernel_dir):
        src = sources.setdefault(mod.source, mod.source.read_bytes())
        flags = (*NVCC_FLAGS, *mod.flags)
        path = out_dir / f"{mod.name}-{arch}-{cache_key(src, headers, version, arch, flags)}.cubin"
        cubins[mod.name] = path
        if not path.exists():
            todo.append((mod, path))
    if todo:
        with ThreadPoolExecutor(max_workers=jobs or min(len(todo), os.cpu_count() or 1)) as pool:
            list(
                pool.map(
                    lambda mp: compile_cubin(
                        mp[0].source, arch, mp[1], nvcc, (*NVCC_FLAGS, *mp[0].flags)
                    ),
                    todo,
                )
            )
    return BuiltKernels(arch, cubins, [m.name for m, _ in todo])


def cu_driver() -> Any:
    from cuda.bindings import driver

    return driver


def check_result(result: Any, what: str) -> Any:
    """cuda.bindings calls return (CUresult, *values): raise on an error, return the values."""
    drv = cu_driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# Kernel signatures: one letter per parameter, as PyCUDA's prepare() took them.
# P: pointer (int or anything with __index__), i: int32, f: float32, q: int64. Every argument
# gets an 8-byte slot of the parameter buffer (cuLaunchKernel reads each through its pointer).
_SLOTS = {"P": "Q", "i": "i4x", "f": "f4x", "q": "q"}


class Kernel:
    """One kernel with a fixed signature, launched through cuda.bindings. Each Kernel owns its
    parameter buffer, so one Kernel must not be launched from two threads at once (each
    backend makes its own); the driver copies the parameters at the launch, so the buffer is
    free again when launch() returns."""

    def __init__(self, name: str, function: Any, signature: str) -> None:
        if any(c not in _SLOTS for c in signature):
            raise ValueError(
                f"{name}: bad signature {signature!r} (letters from {''.join(_SLOTS)})"
            )
        self.name = name
        self.signature = signature
        self.function = function  # cuda.bindings CUfunction
        self._pack = struct.Struct("<" + "".join(_SLOTS[c] for c in signature)).pack_into
        self._values = np.zeros(max(1, len(signature)), np.uint64)
        base = self._values.__array_interface__["data"][0]
        self._ptrs = np.arange(base, base + 8 * len(signature), 8, dtype=np.uint64)
        self._params = self._ptrs.__array_interface__["data"][0] if signature else 0
        self._pdl_config: Any = None
        drv = cu_driver()
        self._launch = drv.cuLaunchKernel
        self._launch_ex = drv.cuLaunchKernelEx
        self._ok = drv.CUresult.CUDA_SUCCESS

    def launch(self, grid: Sequence[int], block: Sequence[int], *args: Any, stream: Any = None,
               shared: int = 0, pdl: bool = False) -> None:  # fmt: skip
        """Enqueue on `stream` (a cuda.bindings CUstream, or None for the legacy default
        stream). pdl: with the programmatic-stream-serialization attribute, so the kernel may
        start while the previous one finishes (see common.cuh pdl_wait)."""
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name}: {len(args)} arguments for signature {self.signature!r}")
        self._pack(self._values, 0, *args)
        if pdl:
            err = self._launch_pdl(grid, block, stream, shared)
        else:
            gx, gy, gz = grid
            bx, by, bz = block
            err = self._launch(self.function, gx, gy, gz, bx, by, bz, shared, stream,
                               self._params, 0)[0]  # fmt: skip
        if err != self._ok:
            check_result(
                (err,), f"launch of {self.name} (grid {tuple(grid)}, block {tuple(block)})"
            )

    def _launch_pdl(self, grid: Sequence[int], block: Sequence[int], stream: Any, shared: int):
        drv = cu_driver()
        cfg = self._pdl_config
        if cfg is None:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            cfg = self._pdl_config = drv.CUlaunchConfig()
            cfg.attrs = [attr]
            cfg.numAttrs = 1
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
        cfg.sharedMemBytes = shared
        cfg.hStream = stream if stream is not None else 0
        return self._launch_ex(cfg, self.function, self._params, 0)[0]

    def attribute(self, attr: str) -> int:
        """A CUfunction_attribute by its short name, e.g. "NUM_REGS", "SHARED_SIZE_BYTES"."""
        drv = cu_driver()
        which = getattr(drv.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{attr}")
        return int(
            check_result(drv.cuFuncGetAttribute(which, self.function), f"{self.name}: {attr}")
        )


class Kernels:
    """Every module of one build loaded once into the current context;
    `kernels.kernel("gemv_t1", "PiiP...")` gives a launchable Kernel."""

    def __init__(self, built: BuiltKernels) -> None:
        drv = cu_driver()
        self.built = built
        self._images = {name: p.read_bytes() for name, p in built.cubins.items()}
        self._modules = {
            name: check_result(drv.cuModuleLoadData(image), f"cuModuleLoadData({name})")
            for name, image in self._images.items()
        }
        self._funcs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def function(self, name: str) -> Any:
        """The CUfunction named `name` (looked up once)."""
        with self._lock:
            f = self._funcs.get(name)
            if f is None:
                f = self._funcs[name] = self._lookup(name)
            return f

    def _lookup(self, name: str) -> Any:
        # Look the name up in the cubins' symbol strings first: asking every module would make
        # the driver report failed lookups (compute-sanitizer counts those as errors).
        drv = cu_driver()
        needle = name.encode() + b"\x00"
        owner = next((m for m, image in self._images.items() if needle in image), None)
        if owner is None:
            raise KeyError(f"no kernel named {name!r} in {sorted(self._modules)}")
        f = check_result(drv.cuModuleGetFunction(self._modules[owner], name.encode()),
                   f"cuModuleGetFunction({name})")  # fmt: skip
        if name.startswith(BIG_SMEM_PREFIXES):
            attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check_result(
                drv.cuFuncSetAttribute(f, attr, MAX_DYNAMIC_SMEM), f"cuFuncSetAttribute({name})"
            )
        return f

    def kernel(self, name: str, signature: str) -> Kernel:
        """A new launcher (own parameter buffer) for the kernel `name`."""
        return Kernel(name, self.function(name), signature)


# One Kernels per (context, build): backends and tests in one process share the loaded
# modules. The entry keeps the PyCUDA context object alive, so a cached context handle can
# never be reused by a new context while its modules are cached.
_LOADED: dict[tuple[int, tuple[tuple[str, Path], ...]], tuple[Any, Kernels]] = {}
_LOADED_LOCK = threading.Lock()


def load_kernels(arch: str | None = None) -> Kernels:
    """Build (or find cached) and load every kernel into the calling thread's current context
    (pushed by PyCUDA); loaded once per context."""
    import pycuda.driver as cuda

    ctx = cuda.Context.get_current()
    if ctx is None:
        raise RuntimeError("load_kernels needs a current CUDA context (push one with PyCUDA)")
    if arch is None:
        arch = arch_for(cuda.Context.get_device().compute_capability())
    built = build_all(arch)
    key = (int(ctx.handle), tuple(sorted(built.cubins.items())))
    with _LOADED_LOCK:
        hit = _LOADED.get(key)
        if hit is None:
            hit = _LOADED[key] = (ctx, Kernels(built))
        return hit[1]
