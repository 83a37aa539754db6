"""Every kernel against a numpy reference (float64 on the bf16-rounded inputs), on random data
with odd sizes. Tolerances, as relative L2 error ||got - ref|| / ||ref||:
  fp32 outputs of bf16 operands with fp32 accumulation: 2e-3 (operands are exact; the error is
  fp32 summation order, plus the odd bf16 flip where the kernel rounds a normalized input);
  bf16 outputs: 6e-3 (one bf16 rounding, 2^-9 relative, plus the above);
  copies (embedding, V into the cache) and argmax: exact.
Outputs are poisoned (NaN / sentinel) before each launch so unwritten elements fail."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_util import bf16_round, kernel_context, rel_err

from inference_service.backends.cuda.arena import bf16_bits_to_f32, to_bf16_bits

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def K():
    with kernel_context() as k:
        yield k


TOL_F32, TOL_BF16 = 2e-3, 6e-3


def launch(K, name, sig, grid, block, *args, shared=0):
    cuda, kernels = K
    kernels.kernel(name, sig).launch(grid, block, *args, shared=shared)
    cuda.Context.synchronize()


def dev(K, a):
    return K[0].to_device(np.ascontiguousarray(a))


def get(K, d, shape, dtype):
    return K[0].from_device(d, shape, dtype)


def bf(a):
    return to_bf16_bits(np.asarray(a, np.float32))


def unbf(bits):
    return bf16_bits_to_f32(bits)


def nan_bf16(shape):
    return np.full(shape, 0x7FC0, np.uint16)


# ---------------------------------------------------------------------------- embedding


def test_embedding_gather_and_argmax_clear(K):
    rng = np.random.default_rng(0)
    V, hid, T = 1000, 72, 7
    table = bf(rng.standard_normal((V, hid)))
    ids = np.array([0, V - 1, 5, 5, 999, 123, 1], np.int32)
    out = dev(K, np.full((T, hid), np.nan, np.float32))
    am = dev(K, np.full(10, 7, np.uint64))
    launch(K, "embedding_gather", "PPPiiPi", (T, 1, 1), (128, 1, 1),
           dev(K, table), dev(K, ids), out, hid, V, am, 6)  # fmt: skip
    np.testing.assert_array_equal(get(K, out, (T, hid), np.float32), unbf(table)[ids])
    np.testing.assert_array_equal(get(K, am, 10, np.uint64), [0] * 6 + [7] * 4)


# ---------------------------------------------------------------------------- rmsnorm, swiglu


@pytest.mark.parametrize("add_kind", ["none", "f32", "bf16"])
def test_add_rmsnorm(K, add_kind):
    rng = np.random.default_rng(1)
    T, hid, eps = 5, 200, 1e-5
    resid = rng.standard_normal((T, hid)).astype(np.float32)
    w = rng.standard_normal(hid).astype(np.float32)
    add = rng.standard_normal((T, hid)).astype(np.float32)
    d_resid = dev(K, resid)
    out = dev(K, nan_bf16((T, hid)))
    if add_kind == "none":
        d_add, is_bf, ref_resid = 0, 0, resid.astype(np.float64)
    elif add_kind == "f32":
        d_add, is_bf, ref_resid = dev(K, add), 0, resid.astype(np.float64) + add
    else:
        d_add, is_bf, ref_resid = dev(K, bf(add)), 1, resid.astype(np.float64) + bf16_round(add)
    launch(K, "add_rmsnorm", "PPiPPif", (T, 1, 1), (256, 1, 1),
           d_resid, d_add, is_bf, dev(K, w), out, hid, eps)  # fmt: skip
    ref = ref_resid / np.sqrt(np.mean(ref_resid**2, axis=1, keepdims=True) + eps) * w
    assert rel_err(get(K, d_resid, (T, hid), np.float32), ref_resid) < 1e-6
    assert rel_err(unbf(get(K, out, (T, hid), np.uint16)), ref) < TOL_BF16


def test_swiglu(K):
    rng = np.random.default_rng(2)
    T, inter = 3, 200
    gu = bf(rng.standard_normal((T, 2 * inter)) * 3)
    out = dev(K, nan_bf16((T, inter)))
    launch(K, "swiglu", "PPi", (1, T, 1), (256, 1, 1), dev(K, gu), out, inter)
    g, u = unbf(gu)[:, :inter].astype(np.float64), unbf(gu)[:, inter:]
    ref = g / (1 + np.exp(-g)) * u
    assert rel_err(unbf(get(K, out, (T, inter), np.uint16)), ref) < TOL_BF16


# ---------------------------------------------------------------------------- rope + kv write


def rope_ref(x, pos, inv_freq, mode):
    """x [T, heads, D] float64 rotated at positions pos."""
    D = x.shape[-1]
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)  # [T, D/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    if mode == 0:
        a, b = x[..., : D // 2], x[..., D // 2 :]
        out[..., : D // 2], out[..., D // 2 :] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
    return out


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("D", [16, 64, 128])
def test_rope_kv_write(K, mode, D):
    rng = np.random.default_rng(3 + D + mode)
    T, H, KVH, nslots = 6, 4, 2, 200
    qkv_dim = (H + 2 * KVH) * D
    qkv = bf(rng.standard_normal((T, qkv_dim)))
    pos = rng.integers(0, 5000, T).astype(np.int32)
    slots = rng.choice(nslots, T, replace=False).astype(np.int32)
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, D, 2) / D))).astype(np.float32)
    kc = dev(K, nan_bf16((nslots, KVH, D)))
    vc = dev(K, nan_bf16((nslots, KVH, D)))
    d_qkv = dev(K, qkv)
    launch(K, "rope_kv_write", "PiPPPPPiiii", (T, 1, 1), (128, 1, 1), d_qkv, qkv_dim,
           dev(K, pos), dev(K, slots), dev(K, inv_freq), kc, vc, H, KVH, D, mode)  # fmt: skip
    x = unbf(qkv).astype(np.float64)
    q_ref = rope_ref(x[:, : H * D].reshape(T, H, D), pos, inv_freq, mode)
    k_ref = rope_ref(x[:, H * D : (H + KVH) * D].reshape(T, KVH, D), pos, inv_freq, mode)
    got = unbf(get(K, d_qkv, (T, qkv_dim), np.uint16))
    assert rel_err(got[:, : H * D].reshape(T, H, D), q_ref) < TOL_BF16
    np.testing.assert_array_equal(got[:, H * D :], unbf(qkv)[:, H * D :])  # k, v untouched
    kg = unbf(get(K, kc, (nslots, KVH, D), np.uint16))
    vg = unbf(get(K, vc, (nslots, KVH, D), np.uint16))
    assert rel_err(kg[slots], k_ref) < TOL_BF16
    np.testing.assert_array_equal(vg[slots], unbf(qkv)[:, (H + KVH) * D :].reshape(T, KVH, D))
    untouched = np.setdiff1d(np.arange(nslots), slots)
    assert np.isnan(kg[untouched]).all() and np.isnan(vg[untouched]).all()


# ---------------------------------------------------------------------------- GEMV


def gemv_call(K, nt, W_bits, x_dev, xmode, x_stride, x_rows, norm_w, y, ymode, y_stride, bias,
              argmax, pair=False, grid=None):  # fmt: skip
    n_rows = W_bits.shape[0] // (2 if pair else 1)
    k = W_bits.shape[1]
    grid = grid or max(1, min(-(-n_rows // 4), 132 * 8))
    launch(K, f"{'gemv_pair' if pair else 'gemv'}_t{nt}", "PiiPiiPPfPiiPP", (grid, 1, 1),
           (128, 1, 1), dev(K, W_bits), n_rows, k, x_dev, xmode, x_stride, x_rows, norm_w,
           1e-5, y, ymode, y_stride, bias, argmax, shared=nt * k * 2)  # fmt: skip


@pytest.mark.parametrize("nt", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(333, 136), (1000, 576), (64, 2048)])
def test_gemv_bf16_input_modes(K, nt, shape):
    N, Kd = shape
    rng = np.random.default_rng(nt * 1000 + N)
    W = bf(rng.standard_normal((N, Kd)))
    x = bf(rng.standard_normal((nt + 2, Kd)))
    rows = rng.permutation(nt + 2)[:nt].astype(np.int32)
    bias = rng.standard_normal(N).astype(np.float32)
    ref = unbf(x)[rows].astype(np.float64) @ unbf(W).T.astype(np.float64)  # [nt, N]
    # ymode 0: bf16 out + bias, rows gathered through x_rows
    y = dev(K, nan_bf16((nt, N)))
    gemv_call(K, nt, W, dev(K, x), 0, Kd, dev(K, rows), 0, y, 0, N, dev(K, bias), 0)
    assert rel_err(unbf(get(K, y, (nt, N), np.uint16)), ref + bias) < TOL_BF16
    # ymode 1: fp32 accumulate into an existing residual
    base = rng.standard_normal((nt, N)).astype(np.float32)
    y = dev(K, base)
    gemv_call(K, nt, W, dev(K, x), 0, Kd, dev(K, rows), 0, y, 1, N, 0, 0)
    assert rel_err(get(K, y, (nt, N), np.float32), base + ref) < TOL_F32
    # ymode 2: fp32 store + fused argmax
    y = dev(K, np.full((nt, N), np.nan, np.float32))
    am = dev(K, np.zeros(nt, np.uint64))
    gemv_call(K, nt, W, dev(K, x), 0, Kd, dev(K, rows), 0, y, 2, N, 0, am)
    got = get(K, y, (nt, N), np.float32)
    assert rel_err(got, ref) < TOL_F32
    keys = get(K, am, nt, np.uint64)
    ids = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
    np.testing.assert_array_equal(ids, np.argmax(got, axis=1))


@pytest.mark.parametrize("nt", [1, 5])
@pytest.mark.parametrize("shape,grid", [((1001, 576), 3), ((301, 8200), 2), ((77, 4104), 1)])
def test_gemv_warps_stream_many_rows_and_chunks(K, nt, shape, grid):
    """A small grid: every warp runs many rows, and long rows take several chunks (K = 8200
    is 1025 16-byte vectors, so the last chunk is partial): the software pipeline that loads the
    next chunk / row while the current one is summed must give every row its own sums."""
    N, Kd = shape
    rng = np.random.default_rng(7 * N + nt)
    W = bf(rng.standard_normal((N, Kd)))
    x = bf(rng.standard_normal((nt, Kd)))
    ref = unbf(x).astype(np.float64) @ unbf(W).T.astype(np.float64)
    y = dev(K, np.full((nt, N), np.nan, np.float32))
    am = dev(K, np.zeros(nt, np.uint64))
    gemv_call(K, nt, W, dev(K, x), 0, Kd, 0, 0, y, 2, N, 0, am, grid=grid)
    got = get(K, y, (nt, N), np.float32)
    assert rel_err(got, ref) < TOL_F32
    keys = get(K, am, nt, np.uint64)
    ids = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
    np.testing.assert_array_equal(ids, np.argmax(got, axis=1))
    # pair mode (SwiGLU) on the same shape: 2 * (N // 2) rows
    n2 = N // 2
    W2 = W[: 2 * n2]
    y2 = dev(K, nan_bf16((nt, n2)))
    gemv_call(K, nt, W2, dev(K, x), 0, Kd, 0, 0, y2, 0, n2, 0, 0, pair=True, grid=grid)
    g, u = bf16_round(ref[:, :n2]).astype(np.float64), bf16_round(ref[:, n2 : 2 * n2])
    assert rel_err(unbf(get(K, y2, (nt, n2), np.uint16)), g / (1 + np.exp(-g)) * u) < TOL_BF16


@pytest.mark.parametrize("nt", [1, 3, 8])
def test_gemv_fused_rmsnorm_and_swiglu_pair(K, nt):
    rng = np.random.default_rng(50 + nt)
    N, Kd, eps = 200, 96, 1e-5
    W = bf(rng.standard_normal((2 * N, Kd)) * 0.2)
    resid = rng.standard_normal((nt, Kd)).astype(np.float32)
    nw = rng.standard_normal(Kd).astype(np.float32)
    r64 = resid.astype(np.float64)
    xn = bf16_round(r64 / np.sqrt(np.mean(r64**2, axis=1, keepdims=True) + eps) * nw)
    # plain: normalized input, fp32 out
    y = dev(K, np.full((nt, 2 * N), np.nan, np.float32))
    gemv_call(K, nt, W, dev(K, resid), 1, Kd, 0, dev(K, nw), y, 2, 2 * N, 0, 0)
    ref = xn.astype(np.float64) @ unbf(W).T.astype(np.float64)
    assert rel_err(get(K, y, (nt, 2 * N), np.float32), ref) < TOL_F32
    # pair: silu(gate) * up, bf16 out
    y = dev(K, nan_bf16((nt, N)))
    gemv_call(K, nt, W, dev(K, resid), 1, Kd, 0, dev(K, nw), y, 0, N, 0, 0, pair=True)
    g, u = bf16_round(ref[:, :N]).astype(np.float64), bf16_round(ref[:, N:])
    assert rel_err(unbf(get(K, y, (nt, N), np.uint16)), g / (1 + np.exp(-g)) * u) < TOL_BF16


# ---------------------------------------------------------------------------- GEMM
# tests/gpu/test_gemm.py


# ---------------------------------------------------------------------------- attention


def attention_ref(q, kc, vc, tables, tok_seq, pos, bs, G):
    """q [T, H, D]; caches [nb, bs, KVH, D]; float64 causal softmax attention."""
    T, H, D = q.shape
    out = np.zeros((T, H, D))
    for t in range(T):
        n = pos[t] + 1
        tb = tables[tok_seq[t]]
        slots = [tb[p // bs] * bs + p % bs for p in range(n)]
        k = kc.reshape(-1, kc.shape[2], D)[slots]  # [n, KVH, D]
        v = vc.reshape(-1, vc.shape[2], D)[slots]
        for h in range(H):
            s = k[:, h // G] @ q[t, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:, h // G]
    return out


@pytest.mark.parametrize("H,KVH,D", [(8, 2, 16), (14, 2, 64), (8, 1, 128), (32, 8, 64), (6, 6, 32)])
@pytest.mark.parametrize("nsplit", [1, 3, 8])
def test_paged_attention(K, H, KVH, D, nsplit):
    from inference_service.backends.cuda.shapes import attention_kernel

    rng = np.random.default_rng(H * 100 + D + nsplit)
    bs, nb, G = 16, 64, H // KVH
    kc = bf(rng.standard_normal((nb, bs, KVH, D)))
    vc = bf(rng.standard_normal((nb, bs, KVH, D)))
    perm = rng.permutation(nb).astype(np.int32)
    W = 24
    tables = np.stack([perm[:W], perm[W : 2 * W], perm[2 * W :][:W].tolist() + [0] * 8])
    tables = tables.astype(np.int32)
    # seq 0: decode at pos 0; seq 1: a 7-token prefill chunk at 30..36; seq 2: decode at 299
    tok_seq = np.array([0] + [1] * 7 + [2], np.int32)
    pos = np.array([0, *range(30, 37), 299], np.int32)
    T = len(pos)
    qkv_dim = (H + 2 * KVH) * D
    qkv = bf(rng.standard_normal((T, qkv_dim)))
    out = dev(K, nan_bf16((T, H * D)))
    part_o = dev(K, np.zeros(T * H * nsplit * D, np.float32))
    part_ml = dev(K, np.zeros(T * H * nsplit * 2, np.float32))
    counters = dev(K, np.zeros(T * KVH, np.int32))
    for _ in range(2):  # twice: the counters must be reset by the first launch
        launch(K, attention_kernel(D), "PiPPPiPPPiPPPiiiif", (T, KVH, nsplit), (256, 1, 1),
               dev(K, qkv), qkv_dim, dev(K, kc), dev(K, vc), dev(K, tables), W, dev(K, tok_seq),
               dev(K, pos), out, H * D, part_o, part_ml, counters, H, KVH, D, bs,
               float(1 / np.sqrt(D)))  # fmt: skip
    q = unbf(qkv)[:, : H * D].reshape(T, H, D).astype(np.float64)
    ref = attention_ref(q, unbf(kc).astype(np.float64), unbf(vc).astype(np.float64), tables,
                        tok_seq, pos, bs, G)  # fmt: skip
    got = unbf(get(K, out, (T, H * D), np.uint16)).reshape(T, H, D)
    assert rel_err(got, ref) < TOL_BF16
    np.testing.assert_array_equal(get(K, counters, T * KVH, np.int32), 0)


@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (14, 2, 64), (32, 8, 64), (8, 1, 128),
                                     (8, 2, 16), (6, 6, 32), (4, 2, 256), (8, 1, 256)])  # fmt: skip
@pytest.mark.parametrize("nz", [1, 2, 32])
@pytest.mark.parametrize("U", [1, 2, 4, 8])
def test_paged_decode_attention(K, H, KVH, D, nz, U):
    """paged_decode_d*_u*: rows of lengths 1 .. ~5 chunks, under grids of 1 split (one block loops
    over every chunk), 2 (capped: splits longer than a chunk) and 32 (one split per chunk, the
    unused ones exit; short rows take the no-combine path)."""
    from inference_service.backends.cuda.shapes import decode_attention_kernel, decode_chunk

    rng = np.random.default_rng(H * 1000 + D * 10 + nz + 7 * U)
    bs, G, chunk = 16, H // KVH, decode_chunk(D, U)
    lengths = [1, 37, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, 5 * chunk - 3, 150]
    T = len(lengths)
    W = -(-max(lengths) // bs)
    nb = T * W + 3
    kc = bf(rng.standard_normal((nb, bs, KVH, D)))
    vc = bf(rng.standard_normal((nb, bs, KVH, D)))
    tables = rng.permutation(nb)[: T * W].reshape(T, W).astype(np.int32)
    tok_seq = np.arange(T, dtype=np.int32)[::-1].copy()  # row t reads sequence T-1-t
    pos = np.array([lengths[T - 1 - t] - 1 for t in range(T)], np.int32)
    qkv_dim = (H + 2 * KVH) * D
    qkv = bf(3 * rng.standard_normal((T, qkv_dim)))  # peaked softmax: a wrong merge shows
    out = dev(K, nan_bf16((T, H * D)))
    part_o = dev(K, np.full(T * H * nz * D, np.nan, np.float32))
    part_ml = dev(K, np.full(T * H * nz * 2, np.nan, np.float32))
    counters = dev(K, np.zeros(T * KVH, np.int32))
    for _ in range(2):  # twice: the counters must be reset by the first launch
        launch(K, decode_attention_kernel(D, U), "PiPPPiPPPiPPPiiiif", (T, KVH, nz), (256, 1, 1),
               dev(K, qkv), qkv_dim, dev(K, kc), dev(K, vc), dev(K, tables), W, dev(K, tok_seq),
               dev(K, pos), out, H * D, part_o, part_ml, counters, H, KVH, D, bs,
               float(1 / np.sqrt(D)))  # fmt: skip
    q = unbf(qkv)[:, : H * D].reshape(T, H, D).astype(np.float64)
    ref = attention_ref(q, unbf(kc).astype(np.float64), unbf(vc).astype(np.float64), tables,
                        tok_seq, pos, bs, G)  # fmt: skip
    got = unbf(get(K, out, (T, H * D), np.uint16)).reshape(T, H, D)
    for t in range(T):  # per row, so a short row's error is not hidden by the long ones
        assert rel_err(got[t], ref[t]) < TOL_BF16, (t, pos[t] + 1)
    np.testing.assert_array_equal(get(K, counters, T * KVH, np.int32), 0)


# ---------------------------------------------------------------------------- sampling


def test_argmax_rows_ties_pick_lowest_id(K):
    rng = np.random.default_rng(9)
    R, V = 3, 50001
    logits = rng.standard_normal((R, V)).astype(np.float32)
    logits[0, [7, 40000]] = 100.0  # tie: lowest id wins
    logits[1, V - 1] = 50.0
    logits[2] = -np.abs(logits[2]) - 1  # all negative
    out = dev(K, np.full(R, -1, np.int32))
    launch(K, "argmax_rows", "PiiP", (R, 1, 1), (1024, 1, 1), dev(K, logits), V, V, out)
    np.testing.assert_array_equal(get(K, out, R, np.int32), np.argmax(logits, axis=1))
    assert get(K, out, R, np.int32)[0] == 7


@pytest.mark.parametrize("nt", [1, 4, 8])
@pytest.mark.parametrize("H,KVH,D", [(4, 2, 16), (14, 2, 64), (3, 1, 32)])
def test_gemv_qkv_rope_writes_q_and_cache(K, nt, H, KVH, D):
    """The decode q|k|v GEMV with fused RMSNorm, bias, RoPE (neox) and KV-cache write."""
    rng = np.random.default_rng(nt * 10 + D)
    hid, eps, nslots = 96, 1e-5, 50
    qkv_dim = (H + 2 * KVH) * D
    W = bf(rng.standard_normal((qkv_dim, hid)) * 0.2)
    bias = rng.standard_normal(qkv_dim).astype(np.float32)
    resid = rng.standard_normal((nt, hid)).astype(np.float32)
    nw = rng.standard_normal(hid).astype(np.float32)
    pos = rng.integers(0, 3000, nt).astype(np.int32)
    slots = rng.choice(nslots, nt, replace=False).astype(np.int32)
    inv_freq = (1.0 / (500000.0 ** (np.arange(0, D, 2) / D))).astype(np.float32)
    y = dev(K, nan_bf16((nt, qkv_dim)))
    kc, vc = dev(K, nan_bf16((nslots, KVH, D))), dev(K, nan_bf16((nslots, KVH, D)))
    n_pairs = qkv_dim // 2
    grid = max(1, min(-(-n_pairs // 4), 132 * 8))
    launch(K, f"gemv_qkv_rope_t{nt}", "PiiPiiPPfPiiPP" + "PPPPPiii", (grid, 1, 1), (128, 1, 1),
           dev(K, W), n_pairs, hid, dev(K, resid), 1, hid, 0, dev(K, nw), eps, y, 0, qkv_dim,
           dev(K, bias), 0, dev(K, pos), dev(K, slots), dev(K, inv_freq), kc, vc, H, KVH, D,
           shared=nt * hid * 2)  # fmt: skip
    r64 = resid.astype(np.float64)
    xn = bf16_round(r64 / np.sqrt(np.mean(r64**2, axis=1, keepdims=True) + eps) * nw)
    qkv = bf16_round(xn.astype(np.float64) @ unbf(W).T.astype(np.float64) + bias).astype(np.float64)
    q_ref = rope_ref(qkv[:, : H * D].reshape(nt, H, D), pos, inv_freq, 0)
    k_ref = rope_ref(qkv[:, H * D : (H + KVH) * D].reshape(nt, KVH, D), pos, inv_freq, 0)
    v_ref = qkv[:, (H + KVH) * D :].reshape(nt, KVH, D)
    got_q = unbf(get(K, y, (nt, qkv_dim), np.uint16))[:, : H * D].reshape(nt, H, D)
    assert rel_err(got_q, q_ref) < TOL_BF16
    kg = unbf(get(K, kc, (nslots, KVH, D), np.uint16))
    vg = unbf(get(K, vc, (nslots, KVH, D), np.uint16))
    assert rel_err(kg[slots], k_ref) < TOL_BF16
    assert rel_err(vg[slots], v_ref) < TOL_BF16
    untouched = np.setdiff1d(np.arange(nslots), slots)
    assert np.isnan(kg[untouched]).all() and np.isnan(vg[untouched]).all()
