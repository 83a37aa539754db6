"""A small, fast GGUF reader: metadata and tensor views over one read-only mmap.

gguf.GGUFReader builds a numpy object for every element of every metadata array (the
tokenizer's 49k tokens and merges), which takes seconds; here string arrays are walked with
struct and kept only as their length unless asked for. Quantized blocks are still decoded by
the gguf library (gguf.quants.dequantize)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.models.config import ModelLoadError
from inference_service.models.mapped_file import map_readonly

_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGUF dims reversed
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # raw uint8 bytes, a view of the mmap


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # string arrays appear as a StringArray (length only)
    tensors: dict[str, GGUFTensor]


class StringArray:
    """Placeholder for a metadata string array we did not decode: only its length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF file (header ends early)")

    def scalar(self, vtype: int) -> Any:
        fmt, size = _SCALARS[vtype]
        self.need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar(10)
        self.need(n)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.scalar(10)
        self.need(n)
        self.pos += n

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar(4)
            count = self.scalar(10)
            if etype == _STRING:
                if count <= 64:
                    return [self.string() for _ in range(count)]
                for _ in range(count):
                    self.skip_string()
                return StringArray(count)
            if etype in _NP:
                size = _SCALARS[etype][1] * count
                self.need(size)
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=count, offset=self.pos)
                self.pos += size
                return arr
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        if vtype in _SCALARS:
            return self.scalar(vtype)
        raise ModelLoadError(f"{self.path}: corrupt GGUF metadata (value type {vtype})")


def read_gguf(path: Path) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    mm = map_readonly(path)
    buf = memoryview(mm)
    cur = _Cursor(buf, path)
    cur.need(24)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.scalar(4)
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
    n_tensors = cur.scalar(10)
    n_kv = cur.scalar(10)
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar(4)
        dims = [cur.scalar(10) for _ in range(n_dims)]
        qtype = cur.scalar(4)
        offset = cur.scalar(10)
        infos.append((name, dims, qtype, offset))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{path}: tensor {name!r} has unknown type {qtype}") from None
        n_el = int(np.prod(dims)) if dims else 1
        nbytes = n_el // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ModelLoadError(
                f"{path}: truncated file: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                f"file has {len(buf)}"
            )
        # Rows of raw bytes, as gguf.quants.dequantize expects: [..., row bytes].
        row_bytes = dims[0] // block * type_size
        raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
        shape = tuple(int(d) for d in reversed(dims))
        tensors[name] = GGUFTensor(name, shape, qtype, raw.reshape(*shape[:-1], row_bytes))
    return GGUFFile(path, meta, tensors)
