"""The one GGUF reader: header, metadata and tensor views over one read-only mmap.

Both services read GGUF files: the tokenizer service its vocabulary (every string of
tokenizer.ggml.tokens and .merges), the model loader its config and tensors (where the 49k
vocabulary strings are only counted). gguf.GGUFReader builds a numpy object for every element
of every metadata array, which takes seconds; here the header is walked with struct. Quantized
blocks are still decoded by the gguf library (gguf.quants.dequantize).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF's scalar value types (gguf.GGUFValueType numbering): struct format, numpy dtype.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A file this reader cannot read; the message names the file and what is wrong."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGUF dims reversed
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # raw uint8 bytes, a view of the mmap


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # long string arrays appear as a StringArray (length only)
    tensors: dict[str, GGUFTensor]


class StringArray:
    """Placeholder for a metadata string array we did not decode: only its length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _Cursor:
    """Reads values at `pos`. `all_strings`: decode every string array (else arrays longer
    than 64 strings become a StringArray); `lists`: numeric arrays as Python lists (else numpy
    views of the mmap)."""

    def __init__(self, buf: memoryview, path: Path, all_strings: bool, lists: bool) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.all_strings = all_strings
        self.lists = lists

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file (header ends early)")

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype][0]
        size = struct.calcsize(fmt)
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
                if self.all_strings or count <= 64:
                    return [self.string() for _ in range(count)]
                for _ in range(count):
                    self.skip_string()
                return StringArray(count)
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1])
                self.need(dtype.itemsize * count)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return arr.tolist() if self.lists else arr
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        if vtype in _SCALARS:
            return self.scalar(vtype)
        raise GGUFError(f"{self.path}: corrupt GGUF metadata (value type {vtype})")


def _map(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # missing, unreadable, empty
        raise GGUFError(f"{path}: cannot open: {exc}") from None


def _header(cur: _Cursor) -> tuple[int, dict[str, Any]]:
    """Reads magic, version and all metadata; returns (tensor count, metadata)."""
    cur.need(24)
    if bytes(cur.buf[:4]) != b"GGUF":
        raise GGUFError(f"{cur.path}: not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.scalar(4)
    if version not in (2, 3):
        raise GGUFError(f"{cur.path}: unsupported GGUF version {version}")
    n_tensors = cur.scalar(10)
    n_kv = cur.scalar(10)
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar(4))
    return n_tensors, meta


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """All key/value metadata of a little-endian GGUF file (v2/v3) as plain Python values
    (every string decoded, arrays as lists), tensors left unread. GGUFError on anything
    unexpected (e.g. a big-endian file: gguf.GGUFReader reads those)."""
    # Nothing refers to the mapping afterwards: it closes when the cursor goes.
    return _header(_Cursor(memoryview(_map(path)), path, all_strings=True, lists=True))[1]


def read_gguf(path: Path) -> GGUFFile:
    """Metadata (long string arrays only counted, numeric arrays as numpy views) and every
    tensor as raw bytes over the mmap, which stays open as long as a tensor refers to it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = memoryview(_map(path))
    cur = _Cursor(buf, path, all_strings=False, lists=False)
    n_tensors, meta = _header(cur)
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
            raise GGUFError(f"{path}: tensor {name!r} has unknown type {qtype}") from None
        n_el = int(np.prod(dims)) if dims else 1
        nbytes = n_el // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise GGUFError(
                f"{path}: truncated file: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                f"file has {len(buf)}"
            )
        # Rows of raw bytes, as gguf.quants.dequantize expects: [..., row bytes].
        row_bytes = dims[0] // block * type_size
        raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
        shape = tuple(int(d) for d in reversed(dims))
        tensors[name] = GGUFTensor(name, shape, qtype, raw.reshape(*shape[:-1], row_bytes))
    return GGUFFile(path, meta, tensors)
