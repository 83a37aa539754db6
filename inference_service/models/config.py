"""One model config type for every source (HF config.json, GGUF metadata, our int8 format)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ModelLoadError(ValueError):
    """A model file or folder that cannot be loaded; the message says what is wrong and where."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style ("llama3") rope frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Per-frequency divisors of the rope inverse frequencies, length head_dim // 2 (GGUF files
    # of Llama 3.1+ store llama3 scaling this way, as the `rope_freqs.weight` tensor). When
    # set it replaces rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None


SUPPORTED_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
INT8_QUANT_METHOD = "kuiper-int8"  # quantization_config.quant_method of `kuiper export`
FREQ_FACTORS_KEY = "kuiper_rope_freq_factors"  # config.json key for rope_freq_factors
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either the transformers 5 `rope_parameters` dict or the
    older top-level `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(
            f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)"
        )
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF config.json dict (Llama 2/3.x, Mistral-like, Qwen2/2.5)."""
    model_type = d.get("model_type")
    arch = SUPPORTED_HF_MODEL_TYPES.get(model_type or "")
    if arch is None:
        raise ModelLoadError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={d.get('architectures')}); supported: "
            + ", ".join(sorted(SUPPORTED_HF_MODEL_TYPES))
        )
    quant = d.get("quantization_config")
    if quant and not (isinstance(quant, dict) and quant.get("quant_method") == INT8_QUANT_METHOD):
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelLoadError(
            f"unsupported: quantized checkpoint (quant_method={method!r}); use an "
            "fp32/fp16/bf16 folder or a GGUF file"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"unsupported hidden_act {act!r} (only silu)")
    if d.get("mlp_bias"):
        raise ModelLoadError("unsupported: mlp_bias=true")
    if arch == "llama" and d.get("attention_bias"):
        raise ModelLoadError("unsupported: Llama attention_bias=true (bias on o_proj)")
    max_pos = int(d.get("max_position_embeddings", 4096))
    window = d.get("sliding_window")
    if window and (model_type == "mistral" or d.get("use_sliding_window")):
        # Sliding-window attention only differs from full attention past the window, so
        # we stay exact by not going past it.
        max_pos = min(max_pos, int(window))
    try:
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        theta, scaling = _rope_from_hf(d)
        return ModelConfig(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2",
            rope_scaling=scaling,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
            rope_freq_factors=(
                tuple(float(f) for f in d[FREQ_FACTORS_KEY]) if d.get(FREQ_FACTORS_KEY) else None
            ),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks the required key {exc.args[0]!r}") from None


def config_from_gguf(meta: Mapping[str, Any], has_output: bool) -> ModelConfig:
    """ModelConfig from GGUF metadata (already decoded to Python values).

    has_output: whether the file has an `output.weight` tensor (else the lm_head is tied)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}"
        )

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ModelLoadError(f"GGUF metadata lacks the required key {full!r}")
        return default

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    vocab = key("vocab_size", None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"GGUF metadata has neither {arch}.vocab_size nor a token list")
        vocab = len(tokens)
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    scaling = None
    if key("rope.scaling.type", "none") not in ("none", None):
        raise ModelLoadError(f"unsupported GGUF rope scaling {key('rope.scaling.type')!r}")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(key("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings=not has_output,
        attention_bias=arch == "qwen2",
        rope_scaling=scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
    )
