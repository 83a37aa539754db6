"""The fused-weight layout every backend uses: which canonical tensors are stacked into one
matrix, in what order, with what shape. Written once here; the numpy backend builds its fp32
`FusedWeights` from it, the CUDA backend its bf16 weight arena.

Per layer i (names are the backends' keys):
  L{i}.attn_norm  [hidden]                  input_layernorm
  L{i}.wqkv       [q_dim + 2*kv_dim, hidden] q_proj | k_proj | v_proj   (rows stacked)
  L{i}.bqkv       [q_dim + 2*kv_dim]        q | k | v biases            (Qwen2 only)
  L{i}.wo         [hidden, q_dim]           o_proj
  L{i}.mlp_norm   [hidden]                  post_attention_layernorm
  L{i}.wgu        [2*intermediate, hidden]  gate_proj | up_proj         (rows stacked)
  L{i}.wd         [hidden, intermediate]    down_proj
and around the layers: embed [vocab, hidden], final_norm [hidden], lm_head [vocab, hidden]
(absent with tied embeddings: the lm_head is then the embed table, see `lm_head_name`).
`model_tensors` lists them in that order (the CUDA arena's upload order). Matrices are
[out, in] as in the canonical weights (models/__init__.py): y = x @ W.T.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference_service.models.config import ModelConfig
from inference_service.models.weights import expected_shapes

_Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class FusedTensor:
    """One tensor of the layout: the canonical `sources` stacked along axis 0."""

    name: str  # "embed", "L{i}.wqkv", ..., "final_norm", "lm_head"
    sources: tuple[str, ...]  # canonical weight names, in stacking order
    shape: tuple[int, ...]  # [out, in] for matrices, [n] for norms and biases

    @property
    def is_matrix(self) -> bool:
        """Matrices (the GEMM/GEMV operands); the rest are 1-D norm weights and biases."""
        return len(self.shape) == 2


def qkv_sizes(c: ModelConfig) -> tuple[int, int]:
    """(q_dim, kv_dim): wqkv rows [0, q_dim) are q, then kv_dim rows of k, then of v."""
    return c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim


def layer_tensors(c: ModelConfig, i: int) -> list[FusedTensor]:
    """Layer i's tensors, in upload order."""
    return _layer_tensors(expected_shapes(c), c, i)


def _layer_tensors(shapes: _Shapes, c: ModelConfig, i: int) -> list[FusedTensor]:
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    parts: list[tuple[str, tuple[str, ...]]] = [
        ("attn_norm", (p + "input_layernorm.weight",)),
        ("wqkv", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")),
    ]
    if c.attention_bias:
        parts.append(("bqkv", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")))
    parts += [
        ("wo", (a + "o_proj.weight",)),
        ("mlp_norm", (p + "post_attention_layernorm.weight",)),
        ("wgu", (m + "gate_proj.weight", m + "up_proj.weight")),
        ("wd", (m + "down_proj.weight",)),
    ]
    return [_fused(shapes, f"L{i}.{name}", sources) for name, sources in parts]


def model_tensors(c: ModelConfig) -> list[FusedTensor]:
    """Every tensor of the layout, in upload order."""
    shapes = expected_shapes(c)
    out = [_fused(shapes, "embed", ("model.embed_tokens.weight",))]
    for i in range(c.num_layers):
        out += _layer_tensors(shapes, c, i)
    out.append(_fused(shapes, "final_norm", ("model.norm.weight",)))
    if not c.tie_word_embeddings:
        out.append(_fused(shapes, "lm_head", ("lm_head.weight",)))
    return out


def lm_head_name(c: ModelConfig) -> str:
    """The tensor the logits are computed with: the embed table when embeddings are tied."""
    return "embed" if c.tie_word_embeddings else "lm_head"


def _fused(shapes: _Shapes, name: str, sources: tuple[str, ...]) -> FusedTensor:
    rows = sum(shapes[s][0] for s in sources)
    return FusedTensor(name, sources, (rows, *shapes[sources[0]][1:]))


def fuse(
    t: FusedTensor,
    weights: Mapping[str, np.ndarray],
    convert: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """t's host array: each source converted (e.g. to float32 or bf16 bits), then stacked."""
    if len(t.sources) == 1:
        return convert(weights[t.sources[0]])
    return np.concatenate([convert(weights[s]) for s in t.sources], axis=0)


@dataclass
class LayerWeights:
    """One decoder layer's fused tensors (see the module docstring for shapes)."""

    attn_norm: np.ndarray
    wqkv: np.ndarray
    bqkv: np.ndarray | None  # None without attention bias
    wo: np.ndarray
    mlp_norm: np.ndarray
    wgu: np.ndarray
    wd: np.ndarray


@dataclass
class FusedWeights:
    """A whole model in the fused layout, as host arrays (the reference forward reads this)."""

    embed: np.ndarray
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: np.ndarray  # the embed array itself when embeddings are tied


def fused_weights(
    c: ModelConfig,
    weights: Mapping[str, Any],
    convert: Callable[[Any], np.ndarray],
    build: Callable[[FusedTensor, Mapping[str, Any]], Any] | None = None,
) -> FusedWeights:
    """Build every tensor of the layout with `convert` applied to each canonical source.
    `build(t, weights)`, when given, may return a tensor itself (e.g. a quantized matrix that
    stays quantized: backends/cpu_kernels.QuantMatrix); None falls back to `convert`."""

    def make(t: FusedTensor) -> Any:
        own = build(t, weights) if build is not None else None
        return own if own is not None else fuse(t, weights, convert)

    built = {t.name: make(t) for t in model_tensors(c)}
    layers = [
        LayerWeights(
            attn_norm=built[f"L{i}.attn_norm"],
            wqkv=built[f"L{i}.wqkv"],
            bqkv=built.get(f"L{i}.bqkv"),
            wo=built[f"L{i}.wo"],
            mlp_norm=built[f"L{i}.mlp_norm"],
            wgu=built[f"L{i}.wgu"],
            wd=built[f"L{i}.wd"],
        )
        for i in range(c.num_layers)
    ]
    return FusedWeights(built["embed"], layers, built["final_norm"], built[lm_head_name(c)])
