"""Read model files written by the ancestor framework's exporters (KuiperLLama,
tools/export.py and tools/export_qwen2.py), so its users can serve what they already have.

Two layouts, both a bare little-endian header followed by raw tensors (no magic, no names):

* float32 ("version 0", what `legacy_export` writes): header of 7 int32
  (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len; a negative
  vocab_size means the classifier is not shared with the embedding), then
  embedding, attention norms, wq, wk, wv (Qwen2: each layer's matrix followed by its bias),
  wo, ffn norms, w1 (gate), w2 (down), w3 (up), final norm, the rope tables
  freqs_cos and freqs_sin ([max_seq_len, head_dim / 2] each, ignored here: we compute rope),
  and the classifier when not shared.
* int8 ("version 3", what `legacy_export_quant` writes): the same 7 int32 plus group_size,
  then for wq, wk, wv, wo, w1, w2, w3 (each over all layers) and the unshared classifier:
  int8 values followed by float32 scales, one per group_size consecutive values (symmetric:
  value = q * scale); then the embedding in float32, attention norms, ffn norms and the final
  norm. The Qwen2 exporter writes no q/k/v biases in this layout; the ancestor runs such a file
  without them, and so do we.

The file does not say which model family it holds; the ancestor's build flags did. `arch`:
  llama2: interleaved rope (Meta / llama2.c order, un-permuted to HF order on load), theta 1e4;
  llama3: rotate-half rope, theta 5e5;  qwen2: rotate-half rope, theta 1e6, rms eps 1e-6.
With arch=None a float32 file whose size only fits q/k/v biases is qwen2, else llama2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference_service.models.config import ModelConfig, ModelLoadError
from inference_service.models.mapped_file import map_readonly

ARCHES = {
    # arch: (architecture, rope_theta, rms_norm_eps, interleaved rope)
    "llama2": ("llama", 10000.0, 1e-5, True),
    "llama3": ("llama", 500000.0, 1e-5, False),
    "qwen2": ("qwen2", 1000000.0, 1e-6, False),
}
_HEADER = struct.Struct("<7i")
_GROUP = struct.Struct("<i")


@dataclass(frozen=True)
class AncestorHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # absolute value
    max_seq_len: int
    shared_classifier: bool

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads

    def matrices(self) -> list[tuple[str, int, int]]:
        """(HF name suffix, rows, cols) of the per-layer matrices in file order (each repeated
        for every layer)."""
        d, kv, h = self.dim, self.kv_dim, self.hidden_dim
        return [
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", kv, d),
            ("self_attn.v_proj", kv, d),
            ("self_attn.o_proj", d, d),
            ("mlp.gate_proj", h, d),
            ("mlp.down_proj", d, h),
            ("mlp.up_proj", h, d),
        ]

    def fp32_size(self, biases: bool) -> int:
        d, n = self.dim, self.n_layers
        floats = self.vocab_size * d + 2 * n * d + d  # embedding, norms
        floats += n * sum(r * c for _, r, c in self.matrices())
        floats += self.max_seq_len * (d // self.n_heads)  # freqs_cos + freqs_sin
        if biases:
            floats += n * (d + 2 * self.kv_dim)
        if not self.shared_classifier:
            floats += self.vocab_size * d
        return _HEADER.size + 4 * floats

    def int8_size(self, group: int) -> int:
        d, n = self.dim, self.n_layers
        quantized = n * sum(r * c for _, r, c in self.matrices())
        if not self.shared_classifier:
            quantized += self.vocab_size * d
        floats = self.vocab_size * d + 2 * n * d + d
        return _HEADER.size + _GROUP.size + quantized + 4 * (quantized // group) + 4 * floats


def read_header(buf: memoryview | bytes) -> AncestorHeader | None:
    if len(buf) < _HEADER.size:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, seq = _HEADER.unpack_from(buf, 0)
    if min(dim, hidden, layers, heads, kv_heads, seq) <= 0 or vocab == 0:
        return None
    if dim % heads or heads % kv_heads or (dim // heads) % 2:
        return None
    return AncestorHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq, vocab > 0)


def _layout(path: Path, buf: memoryview) -> tuple[AncestorHeader, str, int]:
    """(header, "fp32" | "fp32+bias" | "int8", group size) that fits the file's size exactly."""
    header = read_header(buf)
    if header is None:
        raise ModelLoadError(f"{path}: not a KuiperLLama model file (implausible header)")
    size = len(buf)
    if size == header.fp32_size(biases=False):
        return header, "fp32", 0
    if size == header.fp32_size(biases=True):
        return header, "fp32+bias", 0
    if size >= _HEADER.size + _GROUP.size:
        (group,) = _GROUP.unpack_from(buf, _HEADER.size)
        if group > 0 and header.dim % group == 0 and size == header.int8_size(group):
            return header, "int8", group
    raise ModelLoadError(
        f"{path}: {size} bytes fit neither KuiperLLama layout for its header "
        f"(dim {header.dim}, {header.n_layers} layers, vocab {header.vocab_size}): "
        f"float32 needs {header.fp32_size(False)} (or {header.fp32_size(True)} with q/k/v "
        "biases); int8 needs a group size dividing dim in its 8th header field"
    )


def is_ancestor_file(path: Path) -> bool:
    try:
        buf = memoryview(map_readonly(path))
        _layout(path, buf)
        return True
    except ModelLoadError:
        return False


class _Reader:
    def __init__(self, buf: memoryview, start: int) -> None:
        self.buf = buf
        self.pos = start

    def take(self, dtype: type, count: int) -> np.ndarray:
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += arr.nbytes
        return arr

    def f32(self, *shape: int) -> np.ndarray:
        return self.take(np.float32, int(np.prod(shape))).reshape(shape)


def load_ancestor(path: Path, arch: str | None = None, keep_quantized: bool = False):
    """A LoadedModel from a KuiperLLama export (see the module docstring)."""
    from inference_service.models.loader import LoadedModel, unpermute_qk
    from inference_service.models.quantized import Int8Weight
    from inference_service.models.weights import check_weights

    buf = memoryview(map_readonly(path))
    h, layout, group = _layout(path, buf)
    if arch is None:
        arch = "qwen2" if layout == "fp32+bias" else "llama2"
    if arch not in ARCHES:
        raise ModelLoadError(f"unknown KuiperLLama model family {arch!r} (use {', '.join(ARCHES)})")
    architecture, theta, eps, interleaved = ARCHES[arch]
    if layout == "fp32+bias" and arch != "qwen2":
        raise ModelLoadError(f"{path}: the file holds q/k/v biases, so it is qwen2, not {arch}")
    head_dim = h.dim // h.n_heads
    config = ModelConfig(
        architecture=architecture,
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_layers=h.n_layers,
        num_heads=h.n_heads,
        num_kv_heads=h.n_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=theta,
        max_position_embeddings=h.max_seq_len,
        tie_word_embeddings=h.shared_classifier,
        attention_bias=architecture == "qwen2",
    )
    w: dict = {}
    layers = [f"model.layers.{i}." for i in range(h.n_layers)]
    if layout == "int8":
        r = _Reader(buf, _HEADER.size + _GROUP.size)

        def quantized(rows: int, cols: int) -> Int8Weight:
            q = r.take(np.int8, rows * cols).reshape(rows, cols)
            scales = r.f32(rows, cols // group)
            return Int8Weight(q, scales, group)

        for suffix, rows, cols in h.matrices():
            for p in layers:
                w[p + suffix + ".weight"] = quantized(rows, cols)
        if not h.shared_classifier:
            w["lm_head.weight"] = quantized(h.vocab_size, h.dim)
        w["model.embed_tokens.weight"] = r.f32(h.vocab_size, h.dim)
        for p in layers:
            w[p + "input_layernorm.weight"] = r.f32(h.dim)
        for p in layers:
            w[p + "post_attention_layernorm.weight"] = r.f32(h.dim)
        w["model.norm.weight"] = r.f32(h.dim)
        if architecture == "qwen2":  # not in this layout; the ancestor runs without them
            for p in layers:
                for n, size in (("q", h.dim), ("k", h.kv_dim), ("v", h.kv_dim)):
                    w[p + f"self_attn.{n}_proj.bias"] = np.zeros(size, np.float32)
    else:
        r = _Reader(buf, _HEADER.size)
        w["model.embed_tokens.weight"] = r.f32(h.vocab_size, h.dim)
        for p in layers:
            w[p + "input_layernorm.weight"] = r.f32(h.dim)
        mats = h.matrices()
        for suffix, rows, cols in mats[:4]:
            for p in layers:
                w[p + suffix + ".weight"] = r.f32(rows, cols)
                if layout == "fp32+bias" and suffix != "self_attn.o_proj":
                    w[p + suffix + ".bias"] = r.f32(rows)
        for p in layers:
            w[p + "post_attention_layernorm.weight"] = r.f32(h.dim)
        for suffix, rows, cols in mats[4:]:
            for p in layers:
                w[p + suffix + ".weight"] = r.f32(rows, cols)
        w["model.norm.weight"] = r.f32(h.dim)
        r.f32(h.max_seq_len * head_dim)  # freqs_cos and freqs_sin: we compute rope
        if not h.shared_classifier:
            w["lm_head.weight"] = r.f32(h.vocab_size, h.dim)
    if interleaved:  # Meta order → HF rotate-half order, as for GGUF Llama files
        for p in layers:
            for n, heads in (("q", h.n_heads), ("k", h.n_kv_heads)):
                name = p + f"self_attn.{n}_proj.weight"
                m = w[name]
                if isinstance(m, Int8Weight):
                    w[name] = m.take_rows(unpermute_qk(np.arange(m.shape[0]), heads))
                else:
                    w[name] = unpermute_qk(m, heads)
    if not keep_quantized:
        w = {k: (v.dequantize() if isinstance(v, Int8Weight) else v) for k, v in w.items()}
    check_weights(config, w, str(path))
    return LoadedModel(config, w, str(path), "int8" if layout == "int8" else "float32")
