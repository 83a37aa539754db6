"""A few eager decode steps of a random-weight model in a real shape, for Nsight Compute:

    ncu --kernel-name regex:paged_attention --launch-skip 30 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy python bench/gpu_ncu_step.py smollm2

(eager launches, so every kernel is its own profiled launch)."""

from __future__ import annotations

import sys

import numpy as np

from bench.gpu_decode import SHAPES, model_config
from inference_service.backends.base import BatchItem
from inference_service.backends.cuda.backend import CudaBackend
from inference_service.models.loader import LoadedModel
from inference_service.models.weights import expected_shapes
from inference_service.sampling.params import SamplingParams


def main() -> None:
    cfg = model_config(SHAPES[sys.argv[1] if len(sys.argv) > 1 else "smollm2"])
    rng = np.random.default_rng(0)
    # random bf16 bit patterns of magnitude ~2^-6 (no float32 detour: fast for big shapes)
    w = {
        k: (np.uint16(0x3C80) ^ rng.integers(0, 0x7F, s, dtype=np.uint16))
        | (rng.integers(0, 2, s, dtype=np.uint16) << np.uint16(15))
        for k, s in expected_shapes(cfg).items()
    }
    for k in w:
        if k.endswith("norm.weight"):
            w[k] = np.ones(w[k].shape, np.float32)
    b = CudaBackend(LoadedModel(cfg, w, "random", "bf16"), num_blocks=64, block_size=16)
    b.use_graphs = False
    g = SamplingParams(temperature=0.0)
    table = list(range(32))
    tok = b.step([BatchItem(0, np.arange(150, dtype=np.int32), 0, table, g)])[0].token_id
    for i in range(3):
        tok = b.step([BatchItem(0, np.array([tok], np.int32), 150 + i, table, g)])[0].token_id
    b.stream.synchronize()
    print("done")


if __name__ == "__main__":
    main()
