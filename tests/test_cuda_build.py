"""CI checks of the CUDA backend that need no GPU: every kernel compiles for sm_90, the cubin
cache works (keys, warm start), and the host-side arithmetic (bf16 conversion, weight arena,
launch shapes, input packing) is right."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cuda_kernels import loader
from inference_service.backends.cuda import shapes as plan
from inference_service.backends.cuda.arena import (
    ALIGN,
    bf16_bits_to_f32,
    plan_arena,
    to_bf16_bits,
    weight_bytes_read_per_token,
)
from inference_service.models.config import ModelConfig
from inference_service.models.weights import expected_shapes


def config(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=136,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------- nvcc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if loader.find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA toolkit is needed to compile the kernels")
    out = tmp_path_factory.mktemp("cubins")
    t0 = time.perf_counter()
    cold = loader.build_all("sm_90", out_dir=out)
    return out, cold, time.perf_counter() - t0


def test_every_kernel_file_compiles_for_sm90(built):
    out, cold, _ = built
    assert sorted(cold.compiled) == sorted(m.name for m in loader.kernel_modules())
    for name, path in cold.cubins.items():
        data = path.read_bytes()
        assert data[:4] == b"\x7fELF", name  # a cubin is an ELF image
        assert len(data) > 1000


def test_warm_start_compiles_nothing_and_is_fast(built):
    out, cold, _ = built
    t0 = time.perf_counter()
    warm = loader.build_all("sm_90", out_dir=out)
    assert warm.compiled == []
    assert warm.cubins == cold.cubins
    assert time.perf_counter() - t0 < 1.0


def test_kernel_names_the_backend_launches_exist(built):
    _, cold, _ = built
    text = b"".join(p.read_bytes() for p in cold.cubins.values())
    names = ["embedding_gather", "add_rmsnorm", "swiglu", "rope_kv_write", "argmax_rows"]
    names += [f"gemv_t{t}" for t in range(1, 9)] + [f"gemv_pair_t{t}" for t in range(1, 9)]
    names += [t.name for t in plan.GEMM_TILES]
    names += [f"paged_attention_d{d}" for d in plan.ATT_HEAD_DIMS]
    names += [
        plan.decode_attention_kernel(d, u) for d in plan.ATT_HEAD_DIMS for u in plan.DEC_UNROLLS
    ]
    names += [f"gemv_qkv_rope_t{t}" for t in range(1, 9)]
    names += [f"gemv_i8_t{t}" for t in (1, 2, 4, 8)]  # int8 weight-only decode GEMV
    names += [plan.prefill_attention_kernel(d, kg) for d in (64, 128) for kg in (2, 4)]
    names += ["sample_rows", "argmax_finish", "spin_wait"]
    for n in [n for n in names if n is not None]:
        assert n.encode() + b"\x00" in text, n


def test_variant_files_build_one_module_per_define(built):
    """gemv.cu and attention_decode.cu build once per -D value; each module holds only its
    own instantiations (the define reached the names)."""
    _, cold, _ = built
    names = {m.name: m for m in loader.kernel_modules()}
    for t in loader.GEMV_ROWS:
        assert names[f"gemv_t{t}"].flags == (f"-DGEMV_ROWS={t}",)
        image = cold.cubins[f"gemv_t{t}"].read_bytes()
        assert f"gemv_qkv_rope_t{t}".encode() + b"\x00" in image
        other = 1 + t % len(loader.GEMV_ROWS)
        assert f"gemv_t{other}".encode() + b"\x00" not in image
    for i, u in enumerate(loader.DECODE_UNROLLS):
        image = cold.cubins[f"attention_decode_u{u}"].read_bytes()
        assert all(f"paged_decode_d{d}_u{u}".encode() in image for d in plan.ATT_HEAD_DIMS)
        other = loader.DECODE_UNROLLS[(i + 1) % len(loader.DECODE_UNROLLS)]
        assert f"paged_decode_d64_u{other}".encode() not in image
    assert "gemv" not in cold.cubins and "attention_decode" not in cold.cubins


def test_a_variant_file_without_its_define_fails_naming_it(tmp_path):
    if loader.find_nvcc() is None:
        pytest.skip("nvcc not found")
    nvcc = loader.find_nvcc()
    src = loader.KERNEL_DIR / "gemv.cu"
    with pytest.raises(loader.KernelBuildError, match="compile with -DGEMV_ROWS"):
        loader.compile_cubin(src, "sm_90", tmp_path / "x.cubin", nvcc)


def test_nvcc_errors_are_reported(tmp_path):
    if loader.find_nvcc() is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k() { undefined_thing(); }\n')
    with pytest.raises(loader.KernelBuildError, match="bad.cu"):
        loader.build_all("sm_90", kernel_dir=tmp_path, out_dir=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.cubin"))


# ---------------------------------------------------------------------------- cache keys


def test_cache_key_changes_with_every_input():
    base = loader.cache_key(b"src", [b"hdr"], "13.0.88", "sm_90", ("-O3",))
    assert base == loader.cache_key(b"src", [b"hdr"], "13.0.88", "sm_90", ("-O3",))
    variants = [
        loader.cache_key(b"src2", [b"hdr"], "13.0.88", "sm_90", ("-O3",)),
        loader.cache_key(b"src", [b"hdr2"], "13.0.88", "sm_90", ("-O3",)),
        loader.cache_key(b"src", [b"hdr"], "13.0.89", "sm_90", ("-O3",)),
        loader.cache_key(b"src", [b"hdr"], "13.0.88", "sm_89", ("-O3",)),
        loader.cache_key(b"src", [b"hdr"], "13.0.88", "sm_90", ("-O2",)),
        loader.cache_key(
            b"sr", [b"chdr"], "13.0.88", "sm_90", ("-O3",)
        ),  # no concatenation aliasing
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_parse_nvcc_version_and_arch():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert loader.parse_nvcc_version(text) == "13.0.88"
    with pytest.raises(loader.KernelBuildError):
        loader.parse_nvcc_version("garbage")
    assert loader.arch_for((9, 0)) == "sm_90"
    assert loader.arch_for((8, 6)) == "sm_86"


def test_cache_dir_follows_kuiper_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KUIPER_HOME", str(tmp_path))
    assert loader.cache_dir() == tmp_path / "cuda-kernels"


# ---------------------------------------------------------------------------- bf16 + arena


def test_bf16_conversion_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, 1e-40, 3.0e38, -1.5, np.inf, -np.inf], np.float32)])  # fmt: skip
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(x), ref)
    assert to_bf16_bits(np.array([np.nan], np.float32))[0] & 0x7FFF > 0x7F80  # still NaN
    back = bf16_bits_to_f32(ref)
    np.testing.assert_array_equal(
        back, torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy()
    )
    bits = np.array([1, 2, 3], np.uint16)
    assert to_bf16_bits(bits) is not None and (to_bf16_bits(bits) == bits).all()


@pytest.mark.parametrize("bias,tied", [(False, False), (True, True)])
def test_arena_layout(bias, tied):
    c = config(attention_bias=bias, tie_word_embeddings=tied)
    rng = np.random.default_rng(1)
    w = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(c).items()}
    entries, total = plan_arena(c, w)
    names = [e.name for e in entries]
    assert ("L0.bqkv" in names) == bias and ("lm_head" in names) == (not tied)
    end = 0
    for e in entries:
        assert e.offset % ALIGN == 0 and e.offset >= end
        end = e.offset + e.nbytes
        assert e.build().nbytes == e.nbytes, e.name
    assert end <= total < end + ALIGN
    by = {e.name: e for e in entries}
    qkv = bf16_bits_to_f32(by["L1.wqkv"].build())
    p = "model.layers.1.self_attn."
    ref = np.concatenate([w[p + "q_proj.weight"], w[p + "k_proj.weight"], w[p + "v_proj.weight"]])
    np.testing.assert_allclose(qkv, ref, rtol=2**-8)
    gu = bf16_bits_to_f32(by["L0.wgu"].build())
    np.testing.assert_allclose(
        gu[c.intermediate_size :], w["model.layers.0.mlp.up_proj.weight"], rtol=2**-8
    )
    np.testing.assert_array_equal(by["final_norm"].build(), w["model.norm.weight"])


def test_arena_takes_bf16_bits_for_every_tensor():
    """A model given as bf16 bit patterns (uint16, what the GPU benchmark exports from torch):
    norms and biases are converted from the bits, not from the integer values."""
    c = config(attention_bias=True)
    rng = np.random.default_rng(2)
    w32 = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(c).items()}
    bits = {k: to_bf16_bits(v) for k, v in w32.items()}
    by = {e.name: e.build() for e in plan_arena(c, bits)[0]}
    ref = {
        e.name: e.build()
        for e in plan_arena(c, {k: bf16_bits_to_f32(v) for k, v in bits.items()})[0]
    }
    for name, arr in by.items():
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    np.testing.assert_allclose(by["final_norm"], w32["model.norm.weight"], rtol=2**-8)


def test_weight_bytes_per_token_counts_matrices_and_lm_head():
    c = config()
    shapes = expected_shapes(c)
    mats = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith("proj.weight"))
    assert weight_bytes_read_per_token(c) == 2 * (mats + c.vocab_size * c.hidden_size)


# ---------------------------------------------------------------------------- launch shapes


def test_check_supported():
    plan.check_supported(config())
    with pytest.raises(ValueError, match="head_dim"):
        plan.check_supported(config(head_dim=24))
    with pytest.raises(ValueError, match="query heads per kv head"):
        plan.check_supported(config(num_heads=18, num_kv_heads=1))
    with pytest.raises(ValueError, match="intermediate_size"):
        plan.check_supported(config(intermediate_size=100))


def test_gemv_grid_fills_but_does_not_exceed_the_chip():
    assert plan.gemv_grid(576, 132) == 144  # one warp per row, 4 rows per block
    assert plan.gemv_grid(1, 132) == 1
    assert plan.gemv_grid(128256, 132, 5) == 132 * 5  # one resident wave, then rows stride
    assert plan.resident_blocks(regs=96, threads=128, smem=4096) == 5  # register bound
    assert plan.resident_blocks(regs=32, threads=128, smem=0) == 16  # warp bound
    assert plan.resident_blocks(regs=32, threads=128, smem=100_000) == 2  # shared-memory bound
    assert plan.gemv_smem(8, 8192) == 8 * 8192 * 2


def test_gemm_plan():
    # Llama-3.2-1B at 512 tokens on 132 SMs: the fewest rounds of blocks per SM, big tiles
    # where the rounds tie, split-K where K is long and the output tiles few
    # (bench/prefill_gemm.py).
    tile, splits = plan.gemm_plan(512, 8192, 2048, 132, plan.GEMM_SWIGLU)
    assert (tile.name, splits) == ("gemm_128x256", 1)  # 256 blocks
    assert plan.gemm_plan(512, 2048, 8192, 132, 1)[1] > 1  # down: 128 k-tiles
    assert plan.gemm_plan(512, 3072, 2048, 132, 0)[1] == 1  # bf16 output: never split
    assert plan.gemm_plan(16, 64, 64, 132, 1) == (plan.GEMM_TILES[-1], 1)  # one k-tile
    t = plan.GEMM_TILES[1]
    assert t.grid(130, 260) == (plan.ceil_div(130, t.bm), plan.ceil_div(260, t.bn), 1)
    half = plan.ceil_div(260, t.bn // 2)  # a SwiGLU block covers bn / 2 output columns
    assert t.grid(130, 260, swiglu=True, splits=1) == (plan.ceil_div(130, t.bm), half, 1)
    assert t.grid(130, 260, splits=4)[2] == 4
    assert plan.GEMM_TILES[0].smem == 4 * (128 + 256) * 64 * 2
    for tile in plan.GEMM_TILES:  # gemm.cuh's 64-wide k stages fit the opt-in shared memory
        assert tile.smem <= 200 * 1024
    for m, n, k, mode in ((2048, 2048, 8192, 1), (9, 896, 4864, 1), (300, 576, 576, 2)):
        tile, splits = plan.gemm_plan(m, n, k, 132, mode)
        gx, gy, _ = tile.grid(m, n)
        assert splits == 1 or gx * gy <= plan.GEMM_LOCKS
        kt = plan.ceil_div(k, plan.GEMM_BK)
        assert plan.ceil_div(kt, splits) * (splits - 1) < kt  # no empty split


def test_attention_kernel_and_splits():
    assert plan.attention_kernel(16) == "paged_attention_d16"
    assert plan.attention_kernel(128) == "paged_attention_d128"
    with pytest.raises(ValueError):
        plan.attention_kernel(96)
    assert plan.attention_splits(512, 8, 512, 132, 32) == 1  # prefill: enough blocks already
    assert plan.attention_splits(1, 8, 8192, 132, 32) == 32  # batch-1 decode, long context
    assert plan.attention_splits(1, 8, 100, 132, 32) == 4  # >= 32 keys per split
    assert plan.attention_splits(1, 1, 10**6, 132, 8) == 8  # partials buffer bound


def test_decode_attention_chunks_and_splits():
    assert plan.decode_attention_kernel(64, 2) == "paged_decode_d64_u2"
    with pytest.raises(ValueError):
        plan.decode_attention_kernel(80, 2)
    with pytest.raises(ValueError):
        plan.decode_attention_kernel(64, 3)
    # 8 warps x (32 lanes / (D/8) lanes per key) x U keys per lane group in flight
    assert [plan.decode_chunk(d, 8) for d in (16, 32, 64, 128, 256)] == [1024, 512, 256, 128, 64]
    assert [plan.decode_chunk(64, u) for u in (1, 2, 4)] == [32, 64, 128]
    assert plan.decode_splits(256, 64, 32, 8) == 1  # within one chunk: one pass, no combine
    assert plan.decode_splits(257, 64, 32, 8) == 2
    assert plan.decode_splits(145, 64, 32, 1) == 5
    assert plan.decode_splits(4096, 128, 32, 8) == 32
    assert plan.decode_splits(10**6, 64, 32, 8) == 32  # capped: each split loops over chunks
    assert plan.decode_splits(1, 256, 32, 1) == 1


def test_decode_unroll_grows_with_the_work_of_a_launch():
    # The H100 sweep's best unroll per (kv heads, graph context): SmolLM2 (3 kv heads),
    # Qwen2.5-0.5B (2), Llama-3.2-1B (8) at 145 / 1025 / 4001 cached tokens, whose graphs are
    # captured for 256 / 2048 / 4096 keys (block-table width buckets).
    best = {(3, 256): 1, (2, 256): 1, (8, 256): 1, (3, 2048): 2, (2, 2048): 2, (8, 2048): 4,
            (3, 4096): 4, (2, 4096): 4, (8, 4096): 8}  # fmt: skip
    for (kvh, ctx), u in best.items():
        assert plan.decode_unroll_for(ctx, kvh, 1) == u, (kvh, ctx)
    assert plan.decode_unroll_for(1, 1, 1) == 1
    assert plan.decode_unroll_for(4096, 8, 8) == plan.DEC_UNROLLS[-1]
    us = [plan.decode_unroll_for(ctx, 4, 2) for ctx in range(1, 20000, 97)]
    assert us == sorted(us) and set(us) <= set(plan.DEC_UNROLLS)


def test_input_layout_and_buckets():
    lay = plan.InputLayout(tokens=5, seqs=2, rows=2, width=3)
    spans = [(lay.ids, 5), (lay.positions, 5), (lay.slots, 5), (lay.tok_seq, 5),
             (lay.out_rows, 2), (lay.block_tables, 6)]  # fmt: skip
    end = 0
    for start, n in spans:
        assert start == end
        end = start + n
    assert lay.total == end
    assert plan.bucket_for(3, (1, 2, 4, 8)) == 4
    assert plan.bucket_for(9, (1, 2, 4, 8)) is None
    assert plan.width_bucket(1, 512) == 16
    assert plan.width_bucket(17, 512) == 32
    assert plan.width_bucket(600, 512) == 512
    c = config()
    assert plan.kv_block_bytes(c, 16) == 2 * 2 * 16 * 2 * 16 * 2
    assert plan.blocks_for_memory(plan.kv_block_bytes(c, 16) * 5 + 1, c, 16) == 5
