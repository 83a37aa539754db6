"""The canonical weight set of a Llama/Qwen2 model: HF Llama names, [out, in] layout."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from inference_service.models.config import ModelConfig, ModelLoadError


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with this config needs, with its shape."""
    c = config
    q_out = c.num_heads * c.head_dim
    kv_out = c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, c.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, c.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, c.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, q_out)
        if c.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


def check_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], source: str) -> None:
    """Raise ModelLoadError naming the first missing or mis-shaped tensor."""
    for name, shape in expected_shapes(config).items():
        arr = weights.get(name)
        if arr is None:
            raise ModelLoadError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        if tuple(arr.shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}"
            )
