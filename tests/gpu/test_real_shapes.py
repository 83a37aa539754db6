"""The CUDA backend in the real models' shapes (SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B
widths, heads, head dims, GQA groups, rope and bias settings; random weights, fewer layers
and a smaller vocabulary to keep the fp32 numpy oracle quick) against the numpy backend:
a 512-token prefill in one step, the same prompt as a cached prefix plus a chunk, and decode
steps. The tiny test models use head dims 16/32 and groups of 2, so only these shapes reach
the tensor-core prefill attention (head dim 64) and the large-GEMM tiles. The weights are
rounded to bf16 first, so both backends run the same model.

Tolerance: max |cuda - numpy| / max |numpy| < 4e-2 (bf16 activations; the tiny models of
test_cuda_backend.py pass 3e-2, the 2048-wide Llama-3.2-1B shape measured 3.1e-2 on one decode
row on an H200: wider sums carry more bf16 rounding); never a NaN."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_util import bf16_round

from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.models.config import ModelConfig, RopeScaling
from inference_service.models.loader import LoadedModel
from inference_service.models.weights import expected_shapes

pytestmark = pytest.mark.gpu

TOL = 4e-2
VOCAB = 8192
SHAPES = {  # name: hidden, intermediate, heads, kv heads, arch, bias, rope theta, llama3 scaling
    "smollm2": (576, 1536, 9, 3, "llama", False, 100000.0, False),
    "qwen05": (896, 4864, 14, 2, "qwen2", True, 1000000.0, False),
    "llama1b": (2048, 8192, 32, 8, "llama", False, 500000.0, True),
}


def random_model(name: str, layers: int = 2, seed: int = 0) -> LoadedModel:
    hid, inter, heads, kvh, arch, bias, theta, llama3 = SHAPES[name]
    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192) if llama3 else None  # fmt: skip
    cfg = ModelConfig(
        architecture=arch, vocab_size=VOCAB, hidden_size=hid, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kvh, head_dim=hid // heads,
        rms_norm_eps=1e-5, rope_theta=theta, max_position_embeddings=4096,
        tie_word_embeddings=True, attention_bias=bias, rope_scaling=scaling,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    weights = {}
    for wname, shape in expected_shapes(cfg).items():
        if wname.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # std 0.05: logits spread out, activations stay in range through the layers
            w = 0.05 * rng.standard_normal(shape)
        weights[wname] = bf16_round(w.astype(np.float32))
    return LoadedModel(cfg, weights, f"random {name}", "float32")


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert not np.isnan(got).any(), "NaN in the CUDA logits"
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("gemm", ["auto", "ours"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_real_shape_prefill_chunk_and_decode_match_numpy(name, gemm):
    from inference_service.backends.cuda.backend import CudaBackend

    model = random_model(name)
    ids = np.random.default_rng(1).integers(0, VOCAB, 520).astype(np.int32)
    table = list(range(40, 73))  # 33 blocks of 16 = 528 positions
    ref_b = NumpyBackend(model, 80, 16)
    got_b = CudaBackend(model, num_blocks=80, block_size=16, gemm=gemm)
    # one 512-token prefill step
    first = BatchItem(0, ids[:512], 0, table)
    assert rel_err(got_b.logits([first]), ref_b.logits([first])) < TOL
    # the first 300 tokens as a cached prefix, the rest of the 512 as a chunk
    head, rest = BatchItem(1, ids[:300], 0, table), BatchItem(1, ids[300:512], 300, table)
    for b in (ref_b, got_b):
        b.logits([head])
    assert rel_err(got_b.logits([rest]), ref_b.logits([rest])) < TOL
    # decode steps (GEMV path, split decode attention) after the 512 cached positions
    for pos in range(512, 520):
        item = BatchItem(1, ids[pos : pos + 1], pos, table)
        assert rel_err(got_b.logits([item]), ref_b.logits([item])) < TOL, pos
