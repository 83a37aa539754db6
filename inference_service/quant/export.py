"""`kuiper export`: write a model as an HF-style folder, int8-quantized or bf16.

The folder holds config.json, model.safetensors (sharded with an index past SHARD_BYTES) and
the tokenizer files, so `kuiper up --model OUT` serves it and safetensors tools open it:

* `--quant int8`: every linear layer and the embedding / lm_head table (tied or not) as
  `NAME` (I8 [out, in]) + `NAME_scale` (F16 [out, in / group]), symmetric per group of
  `group_size` inputs (models.quantized.quantize_int8); norms and biases in F32. config.json
  carries `quantization_config = {"quant_method": "kuiper-int8", "bits": 8, "group_size": G}`
  (transformers refuses the folder by that name instead of misreading the int8 tensors).
* `--quant none`: every tensor as BF16, a plain HF checkpoint.

Sources: anything load_model reads (HF folder, GGUF file, KuiperLLama .bin export). A
folder's tokenizer files are copied; a GGUF's vocabulary is written as tokenizer.json +
tokenizer_config.json by the `gguf_tokenizer` hook (the tokenizer service's code, so the CLI
passes it: kuiper_serve.cli.export.write_gguf_tokenizer); a .bin holds no tokenizer, so one is
named with `tokenizer=`.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.models.config import FREQ_FACTORS_KEY, INT8_QUANT_METHOD, ModelConfig
from inference_service.models.loader import SCALE_SUFFIX, LoadedModel, load_model
from inference_service.models.quantized import dequantize
from inference_service.models.weights import expected_shapes
from inference_service.quant.int8 import GROUP_SIZES, choose_group, quantize_int8

SHARD_BYTES = 2 << 30
QUANT_CHOICES = ("int8", "none")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ExportSummary:
    out: Path
    quant: str
    group_size: int | None
    source_bytes: int  # the source's weights as float32 (what the CPU backend held before)
    written_bytes: int  # tensor bytes written
    tensors: int


def hf_config(c: ModelConfig, quant: str, group_size: int | None) -> dict[str, Any]:
    """config.json for a ModelConfig (what config_from_hf reads back to the same config)."""
    d: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if c.architecture == "qwen2" else "LlamaForCausalLM"],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": "bfloat16",
    }
    if c.architecture == "llama":
        d["attention_bias"] = False
        d["mlp_bias"] = False
    if c.rope_scaling is not None:
        s = c.rope_scaling
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    if c.rope_freq_factors is not None:  # GGUF Llama 3.1+: no HF spelling, our own key
        d[FREQ_FACTORS_KEY] = list(c.rope_freq_factors)
    if c.bos_token_id is not None:
        d["bos_token_id"] = c.bos_token_id
    if c.eos_token_ids:
        eos = list(c.eos_token_ids)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if quant == "int8":
        d["quantization_config"] = {
            "quant_method": INT8_QUANT_METHOD,
            "bits": 8,
            "group_size": group_size,
            "symmetric": True,
            "scale_dtype": "float16",
        }
    return d


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    from inference_service.backends.cuda.arena import to_bf16_bits

    return to_bf16_bits(np.asarray(a, dtype=np.float32))


def _tensors(
    model: LoadedModel, quant: str, group_size: int
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, safetensors dtype, array) in expected_shapes order, one weight at a time."""
    for name, shape in expected_shapes(model.config).items():
        w = dequantize(model.weights[name])
        if quant == "none":
            yield name, "bfloat16", _bf16_bits(w)
        elif len(shape) == 2:
            q, scales = quantize_int8(w, choose_group(shape[1], group_size))
            yield name, "int8", q
            yield name + SCALE_SUFFIX, "float16", scales
        else:
            yield name, "float32", np.ascontiguousarray(w, dtype=np.float32)


def _save(tensors: dict[str, tuple[str, np.ndarray]], path: Path, meta: dict[str, str]) -> None:
    """Write with the safetensors library (bf16 as raw bits: numpy has no bfloat16)."""
    import safetensors

    if hasattr(safetensors, "TensorSpec"):  # 0.8+: pointers, no copy into bytes
        specs = {
            n: safetensors.TensorSpec(
                dtype=dt, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
            )
            for n, (dt, a) in tensors.items()
        }
    else:
        specs = {
            n: {"dtype": dt, "shape": list(a.shape), "data": a.tobytes()}
            for n, (dt, a) in tensors.items()
        }
    safetensors.serialize_file(specs, str(path), metadata=meta)


GGUFTokenizerWriter = Callable[[Path, Path], None]  # (gguf file, out folder)


def _copy_tokenizer(
    model: LoadedModel,
    out: Path,
    tokenizer: str | Path | None,
    gguf_tokenizer: GGUFTokenizerWriter | None,
) -> None:
    src = Path(tokenizer) if tokenizer is not None else Path(model.source)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        return
    if src.suffix == ".json":
        shutil.copy2(src, out / "tokenizer.json")
        return
    if src.suffix == ".model":
        shutil.copy2(src, out / "tokenizer.model")
        return
    if gguf_tokenizer is None:
        raise ValueError(
            f"{src}: name a tokenizer file or folder (tokenizer=...); a GGUF's own vocabulary "
            "is written by `kuiper export` (kuiper_serve.cli.export.write_gguf_tokenizer)"
        )
    gguf_tokenizer(src, out)


def export_model(
    source: str | Path,
    out: str | Path,
    quant: str = "int8",
    group_size: int = 64,
    *,
    tokenizer: str | Path | None = None,
    ancestor_arch: str | None = None,
    gguf_tokenizer: GGUFTokenizerWriter | None = None,
    progress: bool = True,
) -> ExportSummary:
    """Write `source` to the folder `out` (created; must be empty or absent)."""
    from tqdm import tqdm

    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown --quant {quant!r} (use {' or '.join(QUANT_CHOICES)})")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder")
    src = Path(source).expanduser()
    tok_src = Path(tokenizer) if tokenizer is not None else src
    if not (tok_src.is_dir() or tok_src.suffix in (".json", ".model")) and gguf_tokenizer is None:
        raise ValueError(
            f"{tok_src} is no tokenizer file or folder: name one (--tokenizer); a GGUF's own "
            "vocabulary needs the gguf_tokenizer writer `kuiper export` passes"
        )
    if ancestor_arch is not None:
        from inference_service.models.ancestor import load_ancestor

        model = load_ancestor(src, ancestor_arch, keep_quantized=True)
    else:
        model = load_model(src, keep_quantized=True)
    out.mkdir(parents=True, exist_ok=True)

    shapes = expected_shapes(model.config)
    source_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    meta = {"format": "pt", "kuiper_quant": quant}
    if quant == "int8":
        meta["kuiper_group_size"] = str(group_size)
    # Shards are written as they fill (memory stays at one shard) and named -of-N at the end.
    shard: dict[str, tuple[str, np.ndarray]] = {}
    files: list[tuple[Path, list[str]]] = []
    shard_bytes, written, n_tensors = 0, 0, 0

    def flush() -> None:
        path = out / f"model-{len(files) + 1:05d}.safetensors.part"
        _save(shard, path, meta)
        files.append((path, list(shard)))
        shard.clear()

    bar = tqdm(total=len(shapes), desc=f"export {quant}", unit="tensor", disable=not progress,
               file=sys.stderr)  # fmt: skip
    for name, dtype, arr in _tensors(model, quant, group_size):
        if shard_bytes + arr.nbytes > SHARD_BYTES and shard:
            flush()
            shard_bytes = 0
        shard[name] = (dtype, arr)
        shard_bytes += arr.nbytes
        written += arr.nbytes
        n_tensors += 1
        if not name.endswith(SCALE_SUFFIX):
            bar.update(1)
    flush()
    bar.close()
    if len(files) == 1:
        files[0][0].rename(out / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(files):
            fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            path.rename(out / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": written}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config(model.config, quant, group_size if quant == "int8" else None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(model, out, tokenizer, gguf_tokenizer)
    return ExportSummary(out, quant, group_size if quant == "int8" else None, source_bytes,
                         written, n_tensors)  # fmt: skip
