// Tensor-core GEMM for prefill: C[M, N] (op)= A[M, K] . W[N, K]^T, bf16 operands (A row-major
// activations, W the HF [out, in] weight), fp32 accumulation.
//
// Core: mma.sync m16n8k16 (bf16 in, fp32 accumulate) fed by ldmatrix.x4 from XOR-swizzled
// shared memory (BK = 64: a tile row is 128 bytes = 8 chunks of 16 bytes, chunk c of row r is
// stored at chunk c ^ (r & 7), so the 8 rows an ldmatrix phase reads hit 8 distinct bank groups
// and no padding is needed), an S-stage cp.async pipeline, fragments double-buffered in
// registers across the k-steps of a tile, and the epilogue straight from the accumulators
// (bf16x2 / float2 stores).
//
// mode 0: C bf16 = acc + bias[n] (bias may be null); 1: C fp32 += acc (residual add);
// mode 2: C fp32 = acc; `locks`: see split-K below (null when gridDim.z == 1);
// mode 3 (SwiGLU): W has 2N rows (gate rows 0..N-1, then up rows N..2N-1); a block loads BN/2
//   gate rows and the matching BN/2 up rows, interleaved by 8 (smem row group 2g = gate rows,
//   2g+1 = the same up rows), so n-tiles 2p and 2p+1 of a warp hold gate and up of the same
//   output columns in the same registers; C bf16 [M, N] = bf16(silu(bf16(g)) * bf16(u)) (the
//   rounding of the swiglu kernel and the GEMV pair mode). The grid covers N / (BN / 2) blocks.
// M, N arbitrary (guarded); K a multiple of 8 (16-byte rows, zero-filled past K).
//
// Grid: (M tiles, N tiles, splits). M tiles run fastest, so the blocks resident at once share
// a few weight tiles (read from HBM about once) and stream the activations, which fit in L2.
// Serial split-K (modes 1 and 2 only: shapes.gemm_plan never splits modes 0 and 3, whose epilogues
// are not additive; gridDim.z = splits > 1): split z sums k-tiles
// [z * per, (z + 1) * per) and adds them to C after split z - 1 has (a turnstile per output
// tile in `locks`, all zero between launches: the last split resets its lock). The order of the
// additions is fixed, so results are deterministic. Blocks start in linear order (z slowest),
// so a block only ever waits on a block that started before it: no deadlock.
// Dynamic shared memory: STAGES * (BM + BN) * 64 * 2 bytes (shapes.GemmTile.smem).
#pragma once
#include "common.cuh"

#define GEMM_BK 64

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release(int* p, int v) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Byte offset of (row, 16-byte chunk) in a swizzled [rows][64] bf16 tile.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
    return (uint32_t)(row * (GEMM_BK * 2) + ((chunk ^ (row & 7)) << 4));
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__device__ __forceinline__ void gemm_impl(const bf16* __restrict__ A, int lda,
                                          const bf16* __restrict__ W, int ldw, int M, int N,
                                          int K, void* __restrict__ C, int ldc, int mode,
                                          const float* __restrict__ bias,
                                          int* __restrict__ locks) {
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    constexpr int MI = WTM / 16, NI = WTN / 8;  // mma tiles per warp
    constexpr int CHUNKS = GEMM_BK / 8;          // 16-byte chunks per tile row
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS;
    constexpr int A_PASSES = BM / ROWS_PER_PASS, W_PASSES = BN / ROWS_PER_PASS;
    constexpr uint32_t A_STAGE = BM * GEMM_BK * 2, W_STAGE = BN * GEMM_BK * 2;  // bytes
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile: 16-row, 16-column multiples");
    static_assert(BM % ROWS_PER_PASS == 0 && BN % ROWS_PER_PASS == 0, "loader passes");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    const uint32_t sA = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t sW = sA + STAGES * A_STAGE;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const bool swiglu = mode == 3;
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * (swiglu ? BN / 2 : BN);  // first output column of the block
    const int splits = gridDim.z, split = blockIdx.z;
    const int kt_all = (K + GEMM_BK - 1) / GEMM_BK, kt_per = (kt_all + splits - 1) / splits;
    const int kt0 = split * kt_per;  // this split's first k-tile
    const int ktiles = max(0, min(kt_all, kt0 + kt_per) - kt0);

    // Loader: a thread copies chunk `lc` of tile rows lr + i * ROWS_PER_PASS. Their source rows
    // are evenly spaced (ROWS_PER_PASS is a multiple of 16, so in SwiGLU mode a thread's rows
    // are all gate or all up rows, ROWS_PER_PASS / 2 columns apart): a base pointer, a stride
    // and a bit mask of in-range rows (zero-filled otherwise) cover the whole K loop.
    static_assert(ROWS_PER_PASS % 16 == 0, "SwiGLU row groups");
    const int lc = tid % CHUNKS, lr = tid / CHUNKS;
    const bf16* a_ptr = A + (size_t)(m0 + lr) * lda + lc * 8;
    const size_t a_step = (size_t)ROWS_PER_PASS * lda;
    uint32_t a_ok = 0, w_ok = 0;
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) a_ok |= (m0 + lr + i * ROWS_PER_PASS < M ? 1u : 0u) << i;
    int col0 = n0 + lr, wrow0 = col0, col_step = ROWS_PER_PASS;
    if (swiglu) {  // tile row group g = r / 8: even = gate rows, odd = the same up rows
        col0 = n0 + (lr >> 4) * 8 + (lr & 7);
        wrow0 = ((lr >> 3) & 1) ? N + col0 : col0;
        col_step = ROWS_PER_PASS / 2;
    }
#pragma unroll
    for (int i = 0; i < W_PASSES; ++i) w_ok |= (col0 + i * col_step < N ? 1u : 0u) << i;
    const bf16* w_ptr = W + (size_t)wrow0 * ldw + lc * 8;
    const size_t w_step = (size_t)col_step * ldw;
    auto load_a = [&](int stage, int kt) {
        kt += kt0;
        const bool kin = kt * GEMM_BK + lc * 8 < K;
        const uint32_t base = sA + stage * A_STAGE + swz(lr, lc);
#pragma unroll
        for (int i = 0; i < A_PASSES; ++i) {
            const bool ok = kin && ((a_ok >> i) & 1);
            cp_async16(base + i * ROWS_PER_PASS * GEMM_BK * 2,
                       ok ? a_ptr + i * a_step + kt * GEMM_BK : A, ok ? 16 : 0);
        }
    };
    auto load_w = [&](int stage, int kt) {
        kt += kt0;
        const bool kin = kt * GEMM_BK + lc * 8 < K;
        const uint32_t base = sW + stage * W_STAGE + swz(lr, lc);
#pragma unroll
        for (int i = 0; i < W_PASSES; ++i) {
            const bool ok = kin && ((w_ok >> i) & 1);
            cp_async16(base + i * ROWS_PER_PASS * GEMM_BK * 2,
                       ok ? w_ptr + i * w_step + kt * GEMM_BK : W, ok ? 16 : 0);
        }
    };

    // ldmatrix lane roles. A (16x16 per x4): lanes 0-15 rows 0-15 at k-chunk 0, lanes 16-31
    // the same rows at k-chunk 1 -> a0..a3. W (two n8 tiles x k16 per x4): lane l reads row
    // (l & 7) + 8 * (l >> 4) at k-chunk (l >> 3) & 1 -> b0, b1 of tile j, b0, b1 of tile j+1.
    const int a_row = wm * WTM + (lane & 15), a_chunk = lane >> 4;
    const int b_row = wn * WTN + (lane & 7) + ((lane >> 4) << 3), b_chunk = (lane >> 3) & 1;
    uint32_t fa[2][MI][4], fb[2][NI][2];
    auto load_frags = [&](int buf, int stage, int kk) {
        const uint32_t as = sA + stage * A_STAGE, ws = sW + stage * W_STAGE;
#pragma unroll
        for (int i = 0; i < MI; ++i)
            ldmatrix_x4(fa[buf][i], as + swz(a_row + i * 16, kk * 2 + a_chunk));
#pragma unroll
        for (int j = 0; j < NI; j += 2) {
            uint32_t r[4];
            ldmatrix_x4(r, ws + swz(b_row + j * 8, kk * 2 + b_chunk));
            fb[buf][j][0] = r[0];
            fb[buf][j][1] = r[1];
            fb[buf][j + 1][0] = r[2];
            fb[buf][j + 1][1] = r[3];
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    pdl_trigger();
    // Weights are never written by an earlier kernel: start streaming them before the wait.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
        if (s < ktiles) load_w(s, s);
    pdl_wait();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_a(s, s);
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_frags(0, 0, 0);

    constexpr int KSTEPS = GEMM_BK / 16;
    int stage = 0;
    for (int kt = 0; kt < ktiles; ++kt) {
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            if (kk == 0) {  // refill the stage every warp finished reading (barrier below)
                const int nk = kt + STAGES - 1;
                if (nk < ktiles) {
                    const int ns = stage == 0 ? STAGES - 1 : stage - 1;
                    load_a(ns, nk);
                    load_w(ns, nk);
                }
                cp_async_commit();
            }
            if (kk == KSTEPS - 1) {  // next tile's first fragments: wait for its stage
                cp_async_wait<STAGES - 2>();
                __syncthreads();
                if (kt + 1 < ktiles)
                    load_frags((kk + 1) & 1, stage == STAGES - 1 ? 0 : stage + 1, 0);
            } else {
                load_frags((kk + 1) & 1, stage, kk + 1);
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_bf16(acc[i][j], fa[kk & 1][i], fb[kk & 1][j]);
        }
        stage = stage == STAGES - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();

    int* lock = nullptr;
    if (splits > 1) {  // wait for the previous split's additions; later splits add to C
        lock = locks + blockIdx.y * gridDim.x + blockIdx.x;
        if (tid == 0)
            while (ld_acquire(lock) != split) __nanosleep(64);
        __syncthreads();
        if (split > 0) mode = 1;
    }

    // Epilogue from the accumulators: element e of tile (i, j) is row (lane >> 2) + 8 * (e >> 1),
    // columns (lane & 3) * 2 + {0, 1}.
    const bool vec = (ldc & 1) == 0;  // 2-element stores stay aligned
    const int r_base = m0 + wm * WTM + (lane >> 2);
    if (swiglu) {
#pragma unroll
        for (int j = 0; j < NI; j += 2) {
            const int gn = n0 + (wn * WTN + j * 8) / 2 + (lane & 3) * 2;
            if (gn >= N) continue;
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int gm = r_base + i * 16 + h * 8;
                    if (gm >= M) continue;
                    float o[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float g = bf2f(f2bf(acc[i][j][2 * h + e]));
                        const float u = bf2f(f2bf(acc[i][j + 1][2 * h + e]));
                        o[e] = silu(g) * u;
                    }
                    bf16* dst = reinterpret_cast<bf16*>(C) + (size_t)gm * ldc + gn;
                    if (vec && gn + 1 < N)
                        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(o[0], o[1]);
                    else {
                        dst[0] = f2bf(o[0]);
                        if (gn + 1 < N) dst[1] = f2bf(o[1]);
                    }
                }
        }
        return;
    }
    const int c_base = n0 + wn * WTN + (lane & 3) * 2;
    float2 bv[NI];  // bias of the thread's column pairs, loaded once
#pragma unroll
    for (int j = 0; j < NI; ++j) {
        const int gn = c_base + j * 8;
        bv[j] = make_float2(0.f, 0.f);
        if (mode == 0 && bias != nullptr && gn < N) {
            bv[j].x = bias[gn];
            if (gn + 1 < N) bv[j].y = bias[gn + 1];
        }
    }
#pragma unroll
    for (int i = 0; i < MI; ++i) {
        // Residual add: load this 16-row slice's C values first (all in flight at once: one
        // memory round trip per slice, not one per element pair), then add and store.
        float2 prev[NI][2];
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int gm = r_base + i * 16 + h * 8, gn = c_base + j * 8;
                prev[j][h] = make_float2(0.f, 0.f);
                if (mode == 1 && gm < M && gn < N) {
                    const float* src = reinterpret_cast<const float*>(C) + (size_t)gm * ldc + gn;
                    if (vec && gn + 1 < N) {
                        prev[j][h] = __ldcg(reinterpret_cast<const float2*>(src));
                    } else {
                        prev[j][h].x = __ldcg(src);
                        if (gn + 1 < N) prev[j][h].y = __ldcg(src + 1);
                    }
                }
            }
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int gm = r_base + i * 16 + h * 8, gn = c_base + j * 8;
                if (gm >= M || gn >= N) continue;
                const bool two = gn + 1 < N;
                const size_t o = (size_t)gm * ldc + gn;
                const float v0 = acc[i][j][2 * h] + prev[j][h].x + bv[j].x;
                const float v1 = acc[i][j][2 * h + 1] + prev[j][h].y + bv[j].y;
                if (mode == 0) {
                    bf16* dst = reinterpret_cast<bf16*>(C) + o;
                    if (vec && two) {
                        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
                    } else {
                        dst[0] = f2bf(v0);
                        if (two) dst[1] = f2bf(v1);
                    }
                } else {
                    float* dst = reinterpret_cast<float*>(C) + o;
                    if (vec && two) {
                        *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
                    } else {
                        dst[0] = v0;
                        if (two) dst[1] = v1;
                    }
                }
            }
    }
    if (lock != nullptr) {  // hand the tile to the next split (the last one resets the lock)
        __threadfence();
        __syncthreads();
        if (tid == 0) st_release(lock, split + 1 == splits ? 0 : split + 1);
    }
}

#define GEMM_ARGS                                                                            \
    const bf16 *__restrict__ A, int lda, const bf16 *__restrict__ W, int ldw, int M, int N, \
        int K, void *__restrict__ C, int ldc, int mode, const float *__restrict__ bias,       \
        int *__restrict__ locks
#define GEMM_PASS A, lda, W, ldw, M, N, K, C, ldc, mode, bias, locks

// name, BM, BN, WARPS_M, WARPS_N, STAGES, min blocks per SM (register budget). Mirrored by
// shapes.GEMM_TILES (threads, stages, shared memory).
#define GEMM_KERNEL(NAME, BM, BN, WM, WN, ST, MINB)                                   \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32, MINB) NAME(GEMM_ARGS) { \
        gemm_impl<BM, BN, WM, WN, ST>(GEMM_PASS);                                     \
    }
