"""Read safetensors files as numpy arrays backed by a read-only mmap (no copy for F32/F16)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from inference_service.models.config import ModelLoadError
from inference_service.models.mapped_file import map_readonly

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) → float32: bf16 is the upper half of an fp32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, source dtype names) of one file. F32/F16 arrays are views of the mmap;
    BF16 is widened to float32 (numpy has no bfloat16)."""
    mm = map_readonly(path)
    size = len(mm)
    if size < 8:
        raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", mm[:8])
    if 8 + header_len > size:
        raise ModelLoadError(f"{path}: truncated safetensors file (header runs past the end)")
    try:
        header = json.loads(bytes(mm[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a safetensors file (bad header: {exc})") from None
    base = 8 + header_len
    buf = memoryview(mm)
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info["dtype"]
        start, end = (base + int(o) for o in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
        if end > size:
            raise ModelLoadError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end}, file has {size}"
            )
        itemsize = (
            2 if dtype_name == "BF16" else np.dtype(_DTYPES.get(dtype_name, np.uint8)).itemsize
        )
        if end - start != int(np.prod(shape)) * itemsize:
            raise ModelLoadError(
                f"{path}: tensor {name!r}: {end - start} bytes do not hold shape {shape} {dtype_name}"
            )
        if dtype_name == "BF16":
            raw = np.frombuffer(buf[start:end], dtype=np.uint16).reshape(shape)
            arr = bf16_to_f32(raw)
        elif dtype_name in _DTYPES:
            arr = np.frombuffer(buf[start:end], dtype=_DTYPES[dtype_name]).reshape(shape)
        else:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        tensors[name] = arr
        dtypes[name] = dtype_name
    return tensors, dtypes
