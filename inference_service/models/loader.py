"""load_model(path): an HF folder (config.json + safetensors) or a GGUF file → LoadedModel."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference_service.models.config import (
    ModelConfig,
    ModelLoadError,
    config_from_gguf,
    config_from_hf,
)
from inference_service.models.quantized import (
    GGUF_KEPT_TYPES,
    QuantizedWeight,
    from_gguf_blocks,
    int8_weight,
)
from inference_service.models.safetensors_io import bf16_to_f32, read_safetensors
from inference_service.models.weights import check_weights, expected_shapes
from kuiper_serve.common.gguf import GGUFError, GGUFTensor, read_gguf

Weight = np.ndarray | QuantizedWeight
SCALE_SUFFIX = "_scale"  # int8 export: `X.weight` (I8) + `X.weight_scale` (F16, per group)


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: Mapping[str, Weight]  # canonical HF names; [out, in]; see models/__init__.py
    source: str  # the path it came from
    dtype: str  # the source's main weight type, e.g. "float32", "bfloat16", "Q4_1", "int8"


def load_model(path: str | os.PathLike[str], keep_quantized: bool = False) -> LoadedModel:
    """Load a model; every failure is a ModelLoadError whose message names the problem.

    keep_quantized: int8 (our export, the ancestor's int8 files) and GGUF Q8_0/Q4_0/Q4_1
    matrices stay quantized (models.quantized.Int8Weight / Q4Weight) instead of being expanded
    to float32; for backends that run quantized weights (the CPU backend)."""
    from inference_service.models.ancestor import is_ancestor_file, load_ancestor

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model not found: {p} (give a GGUF file or an HF model folder)")
    if p.is_dir():
        return load_hf_folder(p, keep_quantized)
    if p.suffix == ".gguf" or _is_gguf(p):
        return load_gguf(p, keep_quantized)
    if p.name == "config.json":
        return load_hf_folder(p.parent, keep_quantized)
    if is_ancestor_file(p):
        return load_ancestor(p, keep_quantized=keep_quantized)
    raise ModelLoadError(f"{p}: not a GGUF file, an HF model folder or a KuiperLLama .bin export")


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------------------- HF folder

_HF_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def load_hf_folder(folder: Path, keep_quantized: bool = False) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not an HF model folder)")
    try:
        config = config_from_hf(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_path}: invalid JSON: {exc}") from None

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors files (only safetensors are supported)")

    wanted = expected_shapes(config)
    weights: dict[str, Weight] = {}
    dtypes: Counter[str] = Counter()
    tensors: dict[str, np.ndarray] = {}
    tdtypes: dict[str, str] = {}
    for name in files:
        f = folder / name
        if not f.is_file():
            raise ModelLoadError(f"{folder}: the index names {name}, which is missing")
        file_tensors, file_dtypes = read_safetensors(f)
        tensors.update(file_tensors)
        tdtypes.update(file_dtypes)
    for tname, arr in tensors.items():
        if tname not in wanted:
            continue
        if arr.dtype == np.int8 and tname + SCALE_SUFFIX in tensors:
            try:
                w = int8_weight(arr, tensors[tname + SCALE_SUFFIX])
            except ValueError as exc:
                raise ModelLoadError(f"{folder}: tensor {tname!r}: {exc}") from None
            weights[tname] = w if keep_quantized else w.dequantize()
            dtypes["int8"] += arr.size
            continue
        if arr.dtype.kind != "f":
            raise ModelLoadError(
                f"{folder}: tensor {tname!r} is {tdtypes[tname]}; only float weights "
                "(F32/F16/BF16) and int8 with a per-group `_scale` tensor are supported"
            )
        weights[tname] = _float_weights(arr)
        dtypes[tdtypes[tname]] += arr.size
    check_weights(config, weights, str(folder))
    main = dtypes.most_common(1)[0][0]
    return LoadedModel(config, weights, str(folder), _HF_DTYPE_NAMES.get(main, main.lower()))


def _float_weights(arr: np.ndarray) -> np.ndarray:
    if arr.dtype in (np.float32, np.float16):
        return arr
    return arr.astype(np.float32)


# ---------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def canonical_gguf_name(name: str) -> str | None:
    """HF name of a GGUF tensor, or None for tensors we do not use."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        hf = _GGUF_LAYER_NAMES.get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope → HF rotate-half order).

    llama.cpp's converter writes rows of each head as (half, pair) → (pair, half); this
    is its inverse. Works for weights [rows, in] and biases [rows]."""
    rows = w.shape[0]
    per_head = rows // n_heads
    return w.reshape(n_heads, per_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, keep_quantized: bool = False) -> LoadedModel:
    try:
        gf = read_gguf(path)
    except GGUFError as exc:
        raise ModelLoadError(str(exc)) from None
    config = config_from_gguf(gf.metadata, has_output="output.weight" in gf.tensors)
    weights: dict[str, Weight] = {}
    types: Counter[str] = Counter()
    for name, t in gf.tensors.items():
        if name == "rope_freqs.weight":
            factors = tuple(float(x) for x in _dequantize(t, path).reshape(-1))
            config = _with_freq_factors(config, factors)
            continue
        hf = canonical_gguf_name(name)
        if hf is None:
            continue
        heads = None
        if config.architecture == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_heads
        elif config.architecture == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_kv_heads
        if keep_quantized and len(t.shape) == 2 and _type_name(t.qtype) in GGUF_KEPT_TYPES:
            qw = from_gguf_blocks(t.data, _type_name(t.qtype), t.shape)
            if heads is not None:  # blocks run along rows, so the permutation moves whole rows
                qw = qw.take_rows(unpermute_qk(np.arange(t.shape[0]), heads))
            weights[hf] = qw
        else:
            arr = _dequantize(t, path)
            weights[hf] = unpermute_qk(arr, heads) if heads is not None else arr
        types[_type_name(t.qtype)] += int(np.prod(t.shape))
    check_weights(config, weights, str(path))
    main = types.most_common(1)[0][0] if types else "unknown"
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(main, main)
    return LoadedModel(config, weights, str(path), dtype)


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name


def _with_freq_factors(config: ModelConfig, factors: tuple[float, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(config, rope_freq_factors=factors, rope_scaling=None)


def _dequantize(t: GGUFTensor, path: Path) -> np.ndarray:
    """float32 (or float16 for F16, kept as a view of the mmap) in numpy [out, in] order."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(t.qtype)
    try:
        if qtype == GGMLQuantizationType.F32:
            arr = t.data.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            arr = t.data.view(np.float16)
        elif qtype == GGMLQuantizationType.BF16:
            arr = bf16_to_f32(t.data.view(np.uint16))
        else:
            arr = quants.dequantize(t.data, qtype)
        return arr.reshape(t.shape)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {t.name!r} has type {qtype.name}, which cannot be dequantized"
        ) from None
    except ValueError as exc:
        raise ModelLoadError(f"{path}: tensor {t.name!r} is corrupt: {exc}") from None
