"""Kernel launches with programmatic dependent launch (PDL) through libcuda's cuLaunchKernelEx,
called with ctypes (PyCUDA cannot set launch attributes). Used while capturing decode graphs:
each kernel may then start while the previous one finishes, doing its independent prologue
(the GEMVs prefetch their weights) before `griddepcontrol.wait` (see common.cuh)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from pathlib import Path

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CTYPES = {"P": ctypes.c_uint64, "i": ctypes.c_int32, "f": ctypes.c_float, "q": ctypes.c_int64}


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("programmatic", ctypes.c_int)]


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint),
    ]  # fmt: skip


class PdlLauncher:
    """The project's cubins loaded a second time through libcuda (into the current context),
    launched with the programmatic-stream-serialization attribute."""

    def __init__(self, cubins: Mapping[str, Path], big_smem_prefixes: tuple[str, ...],
                 max_dynamic_smem: int) -> None:  # fmt: skip
        self._lib = ctypes.CDLL("libcuda.so.1")
        self._cubins = dict(cubins)
        self._modules: dict[str, ctypes.c_void_p] = {}
        self._funcs: dict[str, ctypes.c_void_p] = {}
        self._big = big_smem_prefixes
        self._max_smem = max_dynamic_smem
        self._attr = _LaunchAttr()
        self._attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        self._attr.value.programmatic = 1

    def _check(self, res: int, what: str) -> None:
        if res != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(res, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {name.value.decode() if name.value else res}")

    def _module(self, stem: str) -> ctypes.c_void_p:
        mod = self._modules.get(stem)
        if mod is None:
            mod = ctypes.c_void_p()
            data = self._cubins[stem].read_bytes()
            self._check(self._lib.cuModuleLoadData(ctypes.byref(mod), data), "cuModuleLoadData")
            self._modules[stem] = mod
        return mod

    def function(self, name: str) -> ctypes.c_void_p:
        f = self._funcs.get(name)
        if f is None:
            needle = name.encode() + b"\x00"
            stem = next(s for s, p in self._cubins.items() if needle in p.read_bytes())
            f = ctypes.c_void_p()
            self._check(
                self._lib.cuModuleGetFunction(ctypes.byref(f), self._module(stem), name.encode()),
                f"cuModuleGetFunction({name})",
            )
            if name.startswith(self._big):
                self._check(
                    self._lib.cuFuncSetAttribute(
                        f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self._max_smem
                    ),
                    "cuFuncSetAttribute",
                )
            self._funcs[name] = f
        return f

    def launch(self, name: str, fmt: str, grid: Sequence[int], block: Sequence[int],
               stream_handle: int, args: Sequence, shared: int = 0) -> None:  # fmt: skip
        if len(fmt) != len(args):
            raise ValueError(f"{name}: {len(args)} arguments for signature {fmt!r}")
        vals = [
            _CTYPES[c](int(a) if c in "Piq" else float(a)) for c, a in zip(fmt, args, strict=True)
        ]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        cfg = _LaunchConfig(*grid, *block, shared, ctypes.c_void_p(stream_handle),
                            ctypes.pointer(self._attr), 1)  # fmt: skip
        self._check(
            self._lib.cuLaunchKernelEx(ctypes.byref(cfg), self.function(name), params, None),
            f"cuLaunchKernelEx({name})",
        )
