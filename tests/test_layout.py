"""The fused-weight layout (models/layout.py) and the reference forward (models/forward.py)
used on their own, without a backend."""

from __future__ import annotations

import numpy as np
import pytest
from models_util import build_qwen2, hf_logits

from inference_service.models import load_model
from inference_service.models.attention import SeqSpan
from inference_service.models.config import ModelConfig
from inference_service.models.forward import KVCache, StepInputs, forward
from inference_service.models.layout import (
    fused_weights,
    lm_head_name,
    model_tensors,
    qkv_sizes,
)
from inference_service.models.rope import rope_inv_freq
from inference_service.models.weights import expected_shapes


def config(**kw) -> ModelConfig:
    base = dict(architecture="qwen2", vocab_size=300, hidden_size=64, intermediate_size=136,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                attention_bias=True)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def test_layout_shapes_and_order_by_hand():
    c = config()
    shapes = {t.name: t.shape for t in model_tensors(c)}
    # q: 4 heads x 16, k and v: 2 heads x 16 each.
    assert qkv_sizes(c) == (64, 32)
    assert shapes["L1.wqkv"] == (64 + 32 + 32, 64)
    assert shapes["L1.bqkv"] == (128,)
    assert shapes["L0.wgu"] == (2 * 136, 64)
    assert shapes["L0.wd"] == (64, 136)
    assert shapes["L0.wo"] == (64, 64)
    names = [t.name for t in model_tensors(c)]
    layer = ["attn_norm", "wqkv", "bqkv", "wo", "mlp_norm", "wgu", "wd"]
    assert names == ["embed", *(f"L{i}.{n}" for i in range(2) for n in layer),
                     "final_norm", "lm_head"]  # fmt: skip
    assert [t.is_matrix for t in model_tensors(c)][:3] == [True, False, True]


def test_tied_embeddings_have_no_lm_head_tensor():
    c = config(tie_word_embeddings=True, attention_bias=False)
    names = [t.name for t in model_tensors(c)]
    assert "lm_head" not in names and "L0.bqkv" not in names
    assert lm_head_name(c) == "embed"
    w = {k: np.full(s, 0.5, np.float32) for k, s in expected_shapes(c).items()}
    fw = fused_weights(c, w, np.asarray)
    assert fw.lm_head is fw.embed and fw.layers[0].bqkv is None


def test_fused_weights_stack_sources_in_order():
    c = config()
    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal(s).astype(np.float16) for k, s in expected_shapes(c).items()}
    fw = fused_weights(c, w, lambda a: np.asarray(a, np.float32))
    a, m = "model.layers.1.self_attn.", "model.layers.1.mlp."
    q, kv = qkv_sizes(c)
    layer = fw.layers[1]
    assert layer.wqkv.dtype == np.float32
    np.testing.assert_array_equal(layer.wqkv[:q], w[a + "q_proj.weight"])
    np.testing.assert_array_equal(layer.wqkv[q : q + kv], w[a + "k_proj.weight"])
    np.testing.assert_array_equal(layer.wqkv[q + kv :], w[a + "v_proj.weight"])
    np.testing.assert_array_equal(layer.bqkv[q + kv :], w[a + "v_proj.bias"])
    np.testing.assert_array_equal(layer.wgu[: c.intermediate_size], w[m + "gate_proj.weight"])
    np.testing.assert_array_equal(layer.wgu[c.intermediate_size :], w[m + "up_proj.weight"])
    np.testing.assert_array_equal(fw.lm_head, w["lm_head.weight"])


@pytest.mark.parametrize("split", [0, 5])
def test_reference_forward_matches_transformers(tmp_path, split):
    """The forward alone (no backend): one sequence, in one chunk or two, in scattered blocks."""
    folder, hf = build_qwen2(tmp_path / "qwen2")
    model = load_model(folder)
    c = model.config
    w = fused_weights(c, model.weights, lambda a: np.asarray(a, np.float32))
    kv = KVCache.allocate(c, num_blocks=8, block_size=4)
    ids = np.random.default_rng(3).integers(3, c.vocab_size, 11)
    table = [6, 1, 4]
    bounds = [0, split, len(ids)] if split else [0, len(ids)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        pos = np.arange(lo, hi)
        slots = np.asarray(table)[pos // 4] * 4 + pos % 4
        step = StepInputs(ids[lo:hi], pos, slots, [SeqSpan(0, hi - lo, lo, table)])
        logits = forward(c, w, kv, rope_inv_freq(c), step, np.arange(hi - lo))
    ref = hf_logits(hf, ids.tolist())[-logits.shape[0] :]
    np.testing.assert_allclose(logits, ref, atol=1e-4 * np.abs(ref).max())
