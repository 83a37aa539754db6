"""Launch-shape and memory-layout arithmetic of the CUDA backend: pure functions, no device,
so CI can test them. The constants mirror the kernels in cuda_kernels/*.cu."""

from __future__ import annotations

from dataclasses import dataclass

from inference_service.models.config import ModelConfig

GEMV_WARPS = 4  # rows per GEMV block (one warp per row); gemv.cuh GEMV_WARPS
GEMV_MAX_TOKENS = 8  # gemv_t1 .. gemv_t8
GEMV_THREADS = 128
# Hopper (sm_90) per-SM limits, for occupancy.
SM_REGS, SM_SMEM, SM_MAX_BLOCKS, SM_MAX_WARPS, SMEM_PER_BLOCK_RESERVED = 65536, 233472, 32, 64, 1024
GEMM_BK, GEMM_SKEW, GEMM_STAGES = 64, 8, 3  # gemm.cu
ATT_GMAX = 8  # attention.cu: query heads per kv head
ATT_THREADS = 256  # attention.cu: threads per block = keys per tile
ATT_HEAD_DIMS = (16, 32, 64, 128, 256)  # paged_attention_d{D}
ATT_MIN_KEYS_PER_SPLIT = 32  # a block's work is latency-bound: spread keys over SMs
KV_DTYPE_BYTES = 2  # bf16 cache
# attention_decode.cuh: 8 warps per block; each lane group of D / 8 lanes keeps U keys in
# flight (U in DEC_UNROLLS, one kernel each), so one block covers decode_chunk(D, U) keys.
DEC_WARPS = 8
DEC_THREADS = 32 * DEC_WARPS
DEC_UNROLLS = (1, 2, 4, 8)
DEC_U = 2  # default unroll of the helpers below
# Split decode kernel unroll picked per launch from the work it covers (context x kv heads x
# rows): few keys favour small chunks spread over more blocks, many keys fewer, fuller blocks.
# Thresholds fit every point of the H100 / H200 sweeps in bench/README.md ("Decode attention").
DEC_UNROLL_BY_WORK = ((1200, 1), (4096, 2), (16384, 4))  # work <= limit -> unroll; else 8


def check_supported(c: ModelConfig) -> None:
    """Raise ValueError naming the first shape the kernels cannot run."""
    if c.num_heads % c.num_kv_heads:
        raise ValueError(
            f"num_heads {c.num_heads} is not a multiple of num_kv_heads {c.num_kv_heads}"
        )
    group = c.num_heads // c.num_kv_heads
    if group > ATT_GMAX:
        raise ValueError(
            f"the CUDA backend supports up to {ATT_GMAX} query heads per kv head, got {group}"
        )
    if c.head_dim not in ATT_HEAD_DIMS:
        raise ValueError(f"the CUDA backend supports head_dim in {ATT_HEAD_DIMS}, got {c.head_dim}")
    for name in ("hidden_size", "intermediate_size"):
        if getattr(c, name) % 8:
            raise ValueError(
                f"the CUDA backend needs {name} a multiple of 8, got {getattr(c, name)}"
            )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def resident_blocks(regs: int, threads: int, smem: int) -> int:
    """Blocks of one kernel that fit on one SM at once (registers, shared memory, warps)."""
    warps = ceil_div(threads, 32)
    regs_per_warp = ceil_div(max(regs, 1) * 32, 256) * 256
    by_regs = SM_REGS // (warps * regs_per_warp)
    by_smem = SM_SMEM // (smem + SMEM_PER_BLOCK_RESERVED)
    return max(1, min(SM_MAX_BLOCKS, SM_MAX_WARPS // warps, by_regs, by_smem))


def gemv_grid(n_rows: int, sm_count: int, per_sm: int = 8) -> int:
    """Blocks of a GEMV over n_rows outputs: one warp per row, at most one wave of resident
    blocks (the kernel strides over the remaining rows, so no block waits for a second wave)."""
    return max(1, min(ceil_div(n_rows, GEMV_WARPS), sm_count * per_sm))


def gemv_smem(tokens: int, k: int) -> int:
    """Dynamic shared memory of a GEMV: the token rows staged as bf16."""
    return tokens * k * 2


@dataclass(frozen=True)
class GemmTile:
    name: str
    bm: int
    bn: int
    threads: int

    @property
    def smem(self) -> int:
        return GEMM_STAGES * (self.bm + self.bn) * (GEMM_BK + GEMM_SKEW) * 2

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return (ceil_div(n, self.bn), ceil_div(m, self.bm), 1)


GEMM_TILES = (
    GemmTile("gemm_128x128", 128, 128, 256),
    GemmTile("gemm_64x128", 64, 128, 128),
    GemmTile("gemm_64x64", 64, 64, 128),
)


def gemm_tile(m: int, n: int, sm_count: int) -> GemmTile:
    """The largest tile that still gives every SM a block; else the smallest tile."""
    for tile in GEMM_TILES:
        gx, gy, _ = tile.grid(m, n)
        if gx * gy >= sm_count:
            return tile
    return GEMM_TILES[-1]


def attention_kernel(head_dim: int) -> str:
    """The paged attention kernel compiled for this head dim."""
    if head_dim not in ATT_HEAD_DIMS:
        raise ValueError(f"no attention kernel for head_dim {head_dim} (have {ATT_HEAD_DIMS})")
    return f"paged_attention_d{head_dim}"


def attention_splits(
    tokens: int, kv_heads: int, max_ctx: int, sm_count: int, max_splits: int
) -> int:
    """Flash-decoding splits per (token, kv head): enough blocks for two waves over the SMs,
    each split keeping at least ATT_MIN_KEYS_PER_SPLIT keys, within the partials buffer."""
    want = ceil_div(2 * sm_count, tokens * kv_heads)
    by_ctx = ceil_div(max_ctx, ATT_MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_ctx, max_splits))


def decode_attention_kernel(head_dim: int, unroll: int = DEC_U) -> str:
    """The decode (<= GEMV_MAX_TOKENS rows) attention kernel for this head dim and unroll."""
    if head_dim not in ATT_HEAD_DIMS:
        raise ValueError(f"no attention kernel for head_dim {head_dim} (have {ATT_HEAD_DIMS})")
    if unroll not in DEC_UNROLLS:
        raise ValueError(f"no decode attention kernel with unroll {unroll} (have {DEC_UNROLLS})")
    return f"paged_decode_d{head_dim}_u{unroll}"


def decode_unroll_for(max_ctx: int, kv_heads: int, rows: int) -> int:
    """The paged_decode unroll for a launch over `rows` rows of up to max_ctx keys."""
    work = max_ctx * kv_heads * rows
    for limit, unroll in DEC_UNROLL_BY_WORK:
        if work <= limit:
            return unroll
    return DEC_UNROLLS[-1]


def decode_chunk(head_dim: int, unroll: int = DEC_U) -> int:
    """Keys one paged_decode block loads in one round trip: warps x keys per warp x unroll."""
    return DEC_WARPS * (32 // (head_dim // 8)) * unroll


def decode_splits(max_ctx: int, head_dim: int, max_splits: int, unroll: int = DEC_U) -> int:
    """Split blocks launched per (row, kv head) for contexts up to max_ctx: one per chunk of
    keys, capped by the partials buffer. The kernel uses only ceil(ctx / chunk) of them for a
    shorter row (the others exit at once), so a graph captured for its bucket's longest context
    stays valid for every shorter one, and a row within one chunk runs with no combine."""
    return max(1, min(max_splits, ceil_div(max_ctx, decode_chunk(head_dim, unroll))))


@dataclass(frozen=True)
class InputLayout:
    """Offsets (in int32 elements) of one step's inputs packed into one buffer, so one copy
    moves them all: ids, positions, slots, tok_seq [T]; out_rows [R]; block tables [S, W]."""

    tokens: int
    seqs: int
    rows: int
    width: int

    @property
    def ids(self) -> int:
        return 0

    @property
    def positions(self) -> int:
        return self.tokens

    @property
    def slots(self) -> int:
        return 2 * self.tokens

    @property
    def tok_seq(self) -> int:
        return 3 * self.tokens

    @property
    def out_rows(self) -> int:
        return 4 * self.tokens

    @property
    def block_tables(self) -> int:
        return 4 * self.tokens + self.rows

    @property
    def total(self) -> int:
        return self.block_tables + self.seqs * self.width


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket >= n, or None when n exceeds them all."""
    for b in buckets:
        if b >= n:
            return b
    return None


def width_bucket(needed: int, max_width: int) -> int:
    """Block-table width for a captured graph: the next power of two >= needed (>= 16),
    capped at max_width, so few graphs cover every context length."""
    w = 16
    while w < needed:
        w *= 2
    return min(w, max_width)


def kv_block_bytes(c: ModelConfig, block_size: int) -> int:
    """Device bytes of one KV block over all layers (K and V, bf16)."""
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * KV_DTYPE_BYTES


def blocks_for_memory(nbytes: int, c: ModelConfig, block_size: int) -> int:
    return max(0, nbytes // kv_block_bytes(c, block_size))
