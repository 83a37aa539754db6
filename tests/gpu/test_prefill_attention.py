"""prefill_attention_d* (cuda_kernels/attention_prefill.cu, the tensor-core causal prefill
attention) against a float64 numpy oracle, and through the CUDA backend against the numpy
backend.

The kernel runs bf16 operands on tensor cores with fp32 accumulation and rounds the softmax
probabilities to bf16 for P V (as flash-attention does), then writes bf16: relative L2 error
per row < 1e-2, over the whole output < 6e-3. Outputs are poisoned (NaN) before the launch, so a
row the tiles miss fails."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_util import kernel_context, rel_err

from inference_service.backends.cuda.arena import bf16_bits_to_f32, to_bf16_bits
from inference_service.backends.cuda.shapes import (
    PF_BM,
    PF_KGROUPS,
    prefill_attention_kernel,
    prefill_kgroups,
    prefill_smem,
    prefill_threads,
    prefill_tiles,
)

TOL_ROW, TOL_ALL = 1e-2, 6e-3
SIG = "PiPPPiPiPiiif"
# (start_pos, tokens) per item: fresh prompts, chunks after a cached prefix of any length (also
# not a multiple of the key tile), odd lengths around the 64-row / 64-key tiles, decode rows.
ITEMS = [(0, 200), (37, 1), (0, 17), (100, 64), (3, 65), (250, 63), (0, 1), (129, 1), (64, 64),
         (5, 2), (0, 64), (511, 1)]  # fmt: skip
SHAPES = [(32, 8, 64), (9, 3, 64), (14, 2, 64), (8, 1, 128), (4, 4, 128)]


@pytest.fixture(scope="module")
def K():
    with kernel_context() as k:
        yield k


def bf(a: np.ndarray) -> np.ndarray:
    return to_bf16_bits(np.asarray(a, np.float32))


def unbf(bits: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(bits).astype(np.float64)


def prefill_ref(q, kc, vc, tables, items, bs, G):
    """q [T, H, D] (rows of item i after those of items < i); caches [nb, bs, KVH, D]. Row j of
    item (start, n) attends keys [0, start + j] of its sequence. float64."""
    T, H, D = q.shape
    kf, vf = kc.reshape(-1, kc.shape[2], D), vc.reshape(-1, vc.shape[2], D)
    out = np.zeros((T, H, D))
    t = 0
    for s, (start, n) in enumerate(items):
        L = start + n
        p = np.arange(L)
        slots = tables[s][p // bs] * bs + p % bs
        k = np.repeat(kf[slots], G, axis=1)  # [L, H, D]: query head h reads kv head h // G
        v = np.repeat(vf[slots], G, axis=1)
        sc = np.einsum("nhd,lhd->hnl", q[t : t + n], k) / np.sqrt(D)
        sc[:, p[None, :] > start + np.arange(n)[:, None]] = -np.inf
        w = np.exp(sc - sc.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[t : t + n] = np.einsum("hnl,lhd->nhd", w, v)
        t += n
    return out


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 8])
def test_prefill_tiles_cover_every_row_once(group):
    items = ITEMS + [(9, 300)]
    lengths, starts = [n for _, n in items], [s for s, _ in items]
    tiles = prefill_tiles(lengths, starts, group)
    covered = np.zeros(sum(lengths), int)
    item_of = np.repeat(np.arange(len(items)), lengths)
    first_row = np.cumsum([0] + lengths)
    for t0, n, s, p0 in tiles:
        assert 1 <= n <= PF_BM // group
        assert (item_of[t0 : t0 + n] == s).all()  # one sequence per tile
        assert p0 == starts[s] + t0 - first_row[s]
        covered[t0 : t0 + n] += 1
    assert (covered == 1).all()
    ends = [p0 + n for _, n, _, p0 in tiles]
    assert ends == sorted(ends, reverse=True)  # most keys first


def test_prefill_kgroups():
    assert prefill_kgroups(64, 75, 132) == 4  # fewer blocks than SMs: more key warps
    assert prefill_kgroups(64, 256, 132) == 2
    assert prefill_kgroups(128, 10, 132) == 2  # the only one compiled (shared memory)
    assert prefill_threads(4) == 512


@pytest.mark.gpu
@pytest.mark.parametrize("kg", [2, 4])
@pytest.mark.parametrize("bs", [16, 4])
@pytest.mark.parametrize("H,KVH,D", SHAPES)
def test_prefill_attention_matches_float64(K, H, KVH, D, bs, kg):
    if kg not in PF_KGROUPS[D]:
        pytest.skip(f"no prefill_attention_d{D}_k{kg} (shared memory)")
    cuda, kernels = K
    rng = np.random.default_rng(H * 1000 + KVH * 10 + D + bs)
    G, S = H // KVH, len(ITEMS)
    lengths, starts = [n for _, n in ITEMS], [s for s, _ in ITEMS]
    W = -(-max(s + n for s, n in ITEMS) // bs) + 2  # wider than needed: unused entries
    nb = S * W + 3
    kc = bf(rng.standard_normal((nb, bs, KVH, D)))
    vc = bf(rng.standard_normal((nb, bs, KVH, D)))
    tables = rng.permutation(nb)[: S * W].reshape(S, W).astype(np.int32)
    tok_seq = np.repeat(np.arange(S), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(s, s + n) for s, n in ITEMS]).astype(np.int32)
    T = len(pos)
    qkv_dim = (H + 2 * KVH) * D
    qkv = bf(2 * rng.standard_normal((T, qkv_dim)))  # peaked softmax: a wrong max shows
    out_stride = H * D + 24  # a padded output row: the kernel must honour the stride
    out = cuda.to_device(np.full((T, out_stride), 0x7FC0, np.uint16))
    tiles = np.asarray(prefill_tiles(lengths, starts, G), np.int32)
    f = kernels.kernel(prefill_attention_kernel(D, kg), SIG)
    f.launch((len(tiles), KVH, 1), (prefill_threads(kg), 1, 1), cuda.to_device(qkv), qkv_dim,
             cuda.to_device(kc), cuda.to_device(vc), cuda.to_device(tables), W, out, out_stride,
             cuda.to_device(tiles), H, KVH, bs, float(1 / np.sqrt(D)),
             shared=prefill_smem(D, kg))  # fmt: skip
    cuda.Context.synchronize()
    q = unbf(qkv)[:, : H * D].reshape(T, H, D)
    ref = prefill_ref(q, unbf(kc), unbf(vc), tables, ITEMS, bs, G)
    got_all = cuda.from_device(out, (T, out_stride), np.uint16)
    got = unbf(got_all[:, : H * D]).reshape(T, H, D)
    assert (got_all[:, H * D :] == 0x7FC0).all(), "wrote past the row's heads"
    errs = [rel_err(got[t], ref[t]) for t in range(T)]
    worst = int(np.argmax(errs))
    assert errs[worst] < TOL_ROW, (worst, pos[worst], tok_seq[worst], errs[worst])
    assert rel_err(got, ref) < TOL_ALL, rel_err(got, ref)


def tiny_model(H: int, KVH: int, D: int, arch: str):
    from inference_service.models.config import ModelConfig
    from inference_service.models.loader import LoadedModel
    from inference_service.models.weights import expected_shapes

    c = ModelConfig(architecture=arch, vocab_size=300, hidden_size=128, intermediate_size=136,
                    num_layers=2, num_heads=H, num_kv_heads=KVH, head_dim=D, rms_norm_eps=1e-5,
                    rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
                    attention_bias=arch == "qwen2")  # fmt: skip
    rng = np.random.default_rng(H + D)
    w = {}
    for k, s in expected_shapes(c).items():
        norm = k.endswith("norm.weight")
        w[k] = 1.0 + 0.1 * rng.standard_normal(s) if norm else 0.1 * rng.standard_normal(s)
        w[k] = w[k].astype(np.float32)
    return LoadedModel(config=c, weights=w, source="random", dtype="float32")


@pytest.mark.gpu
@pytest.mark.parametrize("H,KVH,D,arch", [(4, 1, 64, "llama"), (6, 2, 128, "qwen2")])
def test_backend_prefill_steps_match_numpy(H, KVH, D, arch):
    """Through CudaBackend (prefill_attention_d*_k* in the GEMM path): a fresh prompt with a
    second sequence, then one step mixing a continuation after the cached prefix, a fresh prompt
    and a decode row; logits against the numpy backend."""
    from inference_service.backends.base import BatchItem
    from inference_service.backends.cuda.backend import CudaBackend
    from inference_service.backends.numpy_backend import NumpyBackend

    model = tiny_model(H, KVH, D, arch)
    bs = 16
    ref_b = NumpyBackend(model, 32, bs)
    b = CudaBackend(model, num_blocks=32, block_size=bs)
    assert b._k.prefill_attention_name is not None  # the steps below run it
    rng = np.random.default_rng(7)
    ids = {s: rng.integers(3, 300, 80).astype(np.int32) for s in range(3)}
    tables = {0: [5, 17, 2, 30, 9], 1: [1, 22, 3], 2: [11, 0]}
    steps = [
        [BatchItem(0, ids[0][:40], 0, tables[0]), BatchItem(2, ids[2][:5], 0, tables[2])],
        [BatchItem(0, ids[0][40:63], 40, tables[0]), BatchItem(1, ids[1][:9], 0, tables[1]),
         BatchItem(2, ids[2][5:6], 5, tables[2])],
    ]  # fmt: skip
    for batch in steps:
        ref, got = ref_b.logits(batch), b.logits(batch)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        assert err < 3e-2, err  # bf16 weights and activations (test_cuda_backend.py)
