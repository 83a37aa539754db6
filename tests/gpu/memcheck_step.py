"""One prefill and one full decode step (eager and graph) of a tiny random Llama on the CUDA
backend; run under `compute-sanitizer --tool memcheck` by test_memcheck.py."""

from __future__ import annotations

import numpy as np

from inference_service.backends.base import BatchItem
from inference_service.backends.cuda.backend import CudaBackend
from inference_service.models.config import ModelConfig
from inference_service.models.loader import LoadedModel
from inference_service.models.weights import expected_shapes
from inference_service.sampling.params import SamplingParams


def tiny_model() -> LoadedModel:
    c = ModelConfig(architecture="qwen2", vocab_size=300, hidden_size=64, intermediate_size=136,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True,
                    attention_bias=True)  # fmt: skip
    rng = np.random.default_rng(0)
    w = {
        k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in expected_shapes(c).items()
    }
    return LoadedModel(config=c, weights=w, source="random", dtype="float32")


def main() -> None:
    b = CudaBackend(tiny_model(), num_blocks=16, block_size=4)
    g = SamplingParams(temperature=0.0)
    ids = np.arange(3, 22, dtype=np.int32)  # 19 tokens: GEMM path
    first = b.step([BatchItem(0, ids, 0, [3, 1, 4, 0, 5, 9], g)])[0].token_id
    b.step([BatchItem(0, np.array([first], np.int32), 19, [3, 1, 4, 0, 5, 9], g)])  # graph
    b.use_graphs = False
    b.step([BatchItem(0, np.array([first], np.int32), 19, [3, 1, 4, 0, 5, 9], g)])  # eager
    b.stream.synchronize()
    print("memcheck step done")


if __name__ == "__main__":
    main()
