"""Launch shapes and memory layouts of the CUDA backend, in one place: grids, blocks, shared
memory, splits, occupancy, GEMM tile choice, the packed step-input layout, KV sizes. Pure
functions, no device, so CI can test them. The constants mirror the kernels in
cuda_kernels/*.cu."""

from __future__ import annotations

from dataclasses import dataclass

from cuda_kernels.loader import DECODE_UNROLLS, GEMV_ROWS
from inference_service.models.config import ModelConfig

GEMV_WARPS = 4  # rows per GEMV block (one warp per row); gemv.cuh GEMV_WARPS
GEMV_MAX_TOKENS = max(GEMV_ROWS)  # gemv_t1 .. gemv_t8
GEMV_THREADS = 128
# Hopper (sm_90) per-SM limits, for occupancy.
SM_REGS, SM_SMEM, SM_MAX_BLOCKS, SM_MAX_WARPS, SMEM_PER_BLOCK_RESERVED = 65536, 233472, 32, 64, 1024
GEMM_BK = 64  # gemm.cuh: k per pipeline stage (a 128-byte swizzled smem row)
GEMM_SWIGLU = 3  # gemm.cuh mode: W = gate|up rows, C = silu(gate) * up
ATT_GMAX = 8  # attention.cu: query heads per kv head
ATT_THREADS = 256  # attention.cu: threads per block = keys per tile
ATT_HEAD_DIMS = (16, 32, 64, 128, 256)  # paged_attention_d{D}
ATT_MIN_KEYS_PER_SPLIT = 32  # a block's work is latency-bound: spread keys over SMs
# attention_prefill.cu: one block per (query tile, kv head); its PF_BM rows are (token, query
# head) pairs of one kv head's group; 4 row warps x KG key warps, KG in PF_KGROUPS (kernel
# prefill_attention_d{D}_k{KG}); keys in tiles of PF_BN per warp.
PF_BM, PF_BN = 64, 64
PF_KGROUPS = {64: (2, 4), 128: (2,)}  # head dim -> key groups compiled (shared memory bound)
KV_DTYPE_BYTES = 2  # bf16 cache
# attention_decode.cuh: 8 warps per block; each lane group of D / 8 lanes keeps U keys in
# flight (U in DEC_UNROLLS, one kernel each), so one block covers decode_chunk(D, U) keys.
DEC_WARPS = 8
DEC_THREADS = 32 * DEC_WARPS
DEC_UNROLLS = DECODE_UNROLLS  # attention_decode.cu built once per U
# Split decode kernel unroll picked per launch from the work it covers (context x kv heads x
# rows; a graph's context is its block-table width bucket, up to 2x the rows' own): few keys
# favour small chunks spread over more blocks, many keys fewer, fuller blocks. Thresholds fit
# the best U at all nine points of the H100 sweep in bench/README.md (decode attention table).
DEC_UNROLL_BY_WORK = ((2400, 1), (6144, 2), (24576, 4))  # work <= limit -> unroll; else 8


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
    """One gemm.cuh kernel: block tile bm x bn, threads, cp.async stages, and its timing model
    (fit to bench/prefill_gemm.py on an H100, 3 models x M in 128 / 512 / 2048): t0
    microseconds plus a block's multiply-adds at r1 (MAC per microsecond, one block on an SM)
    or, where an SM runs c blocks, c blocks' work at rfull; plus split_us per k split (the
    splits take turns at the output tile)."""

    name: str
    bm: int
    bn: int
    threads: int
    stages: int
    t0: float
    r1: float
    rfull: float
    split_us: float

    @property
    def smem(self) -> int:
        return self.stages * (self.bm + self.bn) * GEMM_BK * 2

    def grid(self, m: int, n: int, swiglu: bool = False, splits: int = 1) -> tuple[int, int, int]:
        """(M tiles, N tiles, k splits) for n output columns (a SwiGLU block reads bn weight
        rows for bn / 2 output columns)."""
        return (ceil_div(m, self.bm), ceil_div(n, self.bn // 2 if swiglu else self.bn), splits)


GEMM_TILES = (
    GemmTile("gemm_128x256", 128, 256, 256, 4, 6.5, 1.83e6, 1.56e6, 6.0),
    GemmTile("gemm_128x128", 128, 128, 128, 3, 6.7, 1.15e6, 1.37e6, 5.0),
    GemmTile("gemm_128x128_w8", 128, 128, 256, 3, 5.7, 1.20e6, 1.21e6, 4.1),
    GemmTile("gemm_128x64", 128, 64, 128, 4, 4.4, 0.93e6, 1.15e6, 3.6),
    GemmTile("gemm_64x128", 64, 128, 128, 4, 4.4, 0.90e6, 1.10e6, 3.3),
    GemmTile("gemm_64x64", 64, 64, 128, 4, 4.1, 2.06e6, 0.98e6, 2.6),
)
GEMM_SPLITS = (1, 2, 4, 8)  # serial split-K (modes 1 and 2): blocks per output tile
GEMM_LOCKS = 1024  # split-K turnstiles, one int per output tile (zeroed once, kept zero)


def gemm_cost(tile: GemmTile, m: int, n: int, k: int, sm_count: int, swiglu: bool = False,
              splits: int = 1) -> float:  # fmt: skip
    """Modelled microseconds of a GEMM: the busiest SM runs c blocks (blocks spread evenly)."""
    gx, gy, _ = tile.grid(m, n, swiglu)
    c = ceil_div(gx * gy * splits, sm_count)
    work = tile.bm * tile.bn * ceil_div(ceil_div(k, GEMM_BK), splits) * GEMM_BK
    serial = tile.split_us * splits if splits > 1 else 0.0
    return tile.t0 + max(work / tile.r1, c * work / tile.rfull) + serial


def gemm_plan(m: int, n: int, k: int, sm_count: int, mode: int) -> tuple[GemmTile, int]:
    """(tile, k splits) with the lowest gemm_cost; split-K only in the fp32 modes 1 and 2,
    within the lock buffer, and never with an empty split."""
    swiglu = mode == GEMM_SWIGLU
    kt = ceil_div(k, GEMM_BK)
    best: tuple[float, GemmTile, int] | None = None
    for tile in GEMM_TILES:
        gx, gy, _ = tile.grid(m, n, swiglu)
        for s in GEMM_SPLITS:
            if s > 1 and (
                mode not in (1, 2) or gx * gy > GEMM_LOCKS or ceil_div(kt, s) * (s - 1) >= kt
            ):
                continue
            cost = gemm_cost(tile, m, n, k, sm_count, swiglu, s)
            if best is None or cost < best[0]:
                best = (cost, tile, s)
    assert best is not None
    return best[1], best[2]


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


def prefill_attention_kernel(head_dim: int, kgroups: int = 2) -> str | None:
    """The tensor-core prefill attention kernel for this head dim and key-group count, or None
    (the tiled paged_attention_d* serves the other head dims)."""
    if kgroups not in PF_KGROUPS.get(head_dim, ()):
        return None
    return f"prefill_attention_d{head_dim}_k{kgroups}"


def prefill_kgroups(head_dim: int, blocks: int, sm_count: int) -> int:
    """Key groups for a launch of `blocks` blocks: 4 (512 threads, one block per SM, half the
    serial key stages) while the launch has no more blocks than SMs, else 2 (two blocks per
    SM for D = 64)."""
    groups = PF_KGROUPS[head_dim]
    return max(groups) if blocks <= sm_count else min(groups)


def prefill_threads(kgroups: int) -> int:
    return 32 * (PF_BM // 16) * kgroups


def prefill_smem(head_dim: int, kgroups: int) -> int:
    """Dynamic shared memory of prefill_attention_d*_k*: the Q tile + PF_STAGES stages of K and
    V (3 where head_dim x kgroups <= 128, else 2), each kgroups tiles of PF_BN keys."""
    stages = 3 if head_dim * kgroups <= 128 else 2
    return (PF_BM + 2 * stages * kgroups * PF_BN) * head_dim * 2


def prefill_tiles(
    lengths: list[int], starts: list[int], group: int
) -> list[tuple[int, int, int, int]]:
    """Query tiles of prefill_attention_d*: (first row, rows, item, position of the first row),
    rows <= PF_BM // group consecutive rows of one item (the rows of item i follow those of
    items < i; their positions start at starts[i]). The tile with the most keys comes first:
    it runs longest, so it should start first."""
    per = max(1, PF_BM // group)
    tiles: list[tuple[int, int, int, int]] = []
    t = 0
    for s, (n, start) in enumerate(zip(lengths, starts, strict=True)):
        for i in range(0, n, per):
            tiles.append((t + i, min(per, n - i), s, start + i))
        t += n
    tiles.sort(key=lambda x: -(x[3] + x[1]))
    return tiles


def decode_attention_kernel(head_dim: int, unroll: int) -> str:
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


def decode_chunk(head_dim: int, unroll: int) -> int:
    """Keys one paged_decode block loads in one round trip: warps x keys per warp x unroll."""
    return DEC_WARPS * (32 // (head_dim // 8)) * unroll


def decode_splits(max_ctx: int, head_dim: int, max_splits: int, unroll: int) -> int:
    """Split blocks launched per (row, kv head) for contexts up to max_ctx: one per chunk of
    keys, capped by the partials buffer. The kernel uses only ceil(ctx / chunk) of them for a
    shorter row (the others exit at once), so a graph captured for its bucket's longest context
    stays valid for every shorter one, and a row within one chunk runs with no combine."""
    return max(1, min(max_splits, ceil_div(max_ctx, decode_chunk(head_dim, unroll))))


@dataclass(frozen=True)
class InputLayout:
    """Offsets (in int32 elements) of one step's inputs packed into one buffer, so one copy
    moves them all: ids, positions, slots, tok_seq [T]; out_rows [R]; block tables [S, W];
    prefill attention tiles [tiles, 4] at a 16-byte boundary (none: paged_attention_d*)."""

    tokens: int
    seqs: int
    rows: int
    width: int
    tiles: int = 0

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
    def prefill_tiles(self) -> int:
        return -(-(self.block_tables + self.seqs * self.width) // 4) * 4  # int4 loads

    @property
    def total(self) -> int:
        return self.prefill_tiles + 4 * self.tiles


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
