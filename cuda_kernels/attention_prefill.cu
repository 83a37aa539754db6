// Causal prefill attention on tensor cores (flash-attention-2 style) over the paged KV cache.
//
// Inputs as for paged_attention_d{D} (attention.cu), with the rows' sequences and positions
// given per query tile by a table the host builds (shapes.prefill_tiles): tile i = int4
// (first row t0, rows n, sequence, position of row t0); its rows are consecutive rows of ONE
// sequence at consecutive positions (a prefill chunk, possibly after a cached prefix, or a
// single decode row). One block serves one (tile, kv head): its PF_BM = 64 matrix rows are
// the n x G (token, query head) pairs of that kv head's group, token-major (GQA packing: each
// K/V tile is loaded once for the whole group; the host keeps n <= PF_BM / G).
//
// 4 row warps of 16 rows x KG key warps (KG = 2 or 4). Keys go in stages of KG x PF_BN: key
// group g takes keys [64 g, 64 g + 64) of each stage, with its own online softmax; the
// groups' (m, l, O) are merged through shared memory at the end. So a long context costs KG
// times fewer serial steps, which is what bounds a prefill of a small model (few blocks, each
// walking every key up to its rows' positions). Stages are gathered from the paged cache
// ([num_blocks, block_size, KVH, D] bf16) with cp.async into XOR-swizzled shared memory,
// PF_STAGES deep, with the block-table lookups one stage ahead of the copies. Per tile:
// S = Q K^T with mma.sync m16n8k16 bf16 (Q fragments stay in registers, K fragments via
// ldmatrix), an online softmax in the accumulator registers (exp2, the log2(e) / sqrt(D) scale
// folded into its argument), then O += P V with P re-packed from the S accumulators as A
// fragments and V fragments via ldmatrix.trans; fp32 accumulation. Only tiles reaching past
// the tile's first position are masked; keys past its last position are never loaded, and a
// warp skips a tile that starts after all its rows.
#include "common.cuh"

#define PF_RGROUPS 4  // warps along the rows: 16 rows each
#define PF_BM (16 * PF_RGROUPS)  // (token, head) rows per block
#define PF_BN 64                 // keys per tile (one warp's share of a stage)
// K/V stages in flight: 3 where shared memory allows (D x key groups <= 128), else 2.
#define PF_STAGES(D, KG) ((D) * (KG) <= 128 ? 3 : 2)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled (no global read) when !valid.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c[4] += a[4] (16x16 bf16, row) * b[2] (16x8 bf16, col), fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the SFU, flushing denormal results to 0 (they are negligible next to the row's 1).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of 16-byte chunk c of row r in a [rows, D] bf16 tile: chunks are XOR-swizzled
// by the row so the 8 rows one ldmatrix phase reads hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
    return r * D + ((c ^ (r & 7)) << 3);
}

template <int D, int KG>
__device__ __forceinline__ void prefill_impl(
    const bf16* __restrict__ q, int q_stride, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int bt_stride,
    bf16* __restrict__ out, int out_stride, const int* __restrict__ tiles, int H, int KVH,
    int block_size, float scale) {
    constexpr int THREADS = 32 * PF_RGROUPS * KG;
    constexpr int C = D / 8;                       // 16-byte chunks per row
    constexpr int KT = D / 16;                     // k steps of Q K^T
    constexpr int NT = PF_BN / 8;                  // score n-tiles per warp
    constexpr int DT = D / 8;                      // output n-tiles per warp
    constexpr int SUPER = KG * PF_BN;              // keys per stage: one tile per key group
    constexpr int STAGES = PF_STAGES(D, KG);
    constexpr int ROWS_PER_PASS = THREADS / C;     // K/V rows one pass of the block copies
    constexpr int RPT = SUPER / ROWS_PER_PASS;     // K/V rows per thread per stage
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* qs = reinterpret_cast<bf16*>(smem_raw);  // [PF_BM, D]
    bf16* ks = qs + PF_BM * D;                     // [STAGES][SUPER, D]
    bf16* vs = ks + STAGES * SUPER * D;            // [STAGES][SUPER, D]

    pdl_trigger();
    pdl_wait();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rw = warp % PF_RGROUPS, kg = warp / PF_RGROUPS;  // row group, key group
    const int4 tile = reinterpret_cast<const int4*>(tiles)[blockIdx.x];
    const int t0 = tile.x, n = tile.y, p0 = tile.w;  // rows t0 .. t0+n-1 at positions p0 ..
    const int kvh = blockIdx.y, G = H / KVH;
    const int last = p0 + n - 1;  // the tile's largest position: keys [0, last] are needed
    const int nstages = last / SUPER + 1;
    const int* bt = block_tables + (size_t)tile.z * bt_stride;  // tile.z: its sequence
    const size_t row_stride = (size_t)KVH * D;

    // Q rows: matrix row m = (token m / G, head m % G); rows past n * G repeat the last token
    // (computed, never stored) so every row sees at least key 0 and the softmax stays finite.
    for (int i = tid; i < PF_BM * C; i += THREADS) {
        const int m = i / C, c = i % C;
        const int tok = min(m / G, n - 1), g = m % G;
        const bf16* src = q + (size_t)(t0 + tok) * q_stride + (size_t)(kvh * G + g) * D + c * 8;
        cp_async16(smem_u32(qs + swz<D>(m, c)), src, true);
    }
    // Thread tid copies chunk tid % C of rows tid / C + k * ROWS_PER_PASS of each stage. The
    // cache slots of a stage are looked up one stage ahead of its copy (slots[]), so the block
    // table read is off the copy's critical path; -1 = past `last`, zero-filled.
    const int cc = tid % C;
    auto lookup = [&](int s, int* sl) {
#pragma unroll
        for (int k = 0; k < RPT; ++k) {
            const int pos = s * SUPER + tid / C + k * ROWS_PER_PASS;
            sl[k] = pos <= last ? bt[pos / block_size] * block_size + pos % block_size : -1;
        }
    };
    auto copy = [&](int buf, const int* sl) {
#pragma unroll
        for (int k = 0; k < RPT; ++k) {
            const int r = tid / C + k * ROWS_PER_PASS;
            const size_t off = sl[k] < 0 ? 0 : (size_t)sl[k] * row_stride + (size_t)kvh * D + cc * 8;
            const int o = buf * SUPER * D + swz<D>(r, cc);
            cp_async16(smem_u32(ks + o), k_cache + off, sl[k] >= 0);
            cp_async16(smem_u32(vs + o), v_cache + off, sl[k] >= 0);
        }
    };
    int slots[RPT];
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {  // prologue: stages 0 .. STAGES-2 (Q with stage 0)
        if (s < nstages) {
            lookup(s, slots);
            copy(s, slots);
        }
        cp_async_commit();
    }
    lookup(STAGES - 1, slots);

    // This thread's two accumulator rows (lane / 4 and lane / 4 + 8 of its warp's 16).
    const int r0 = rw * 16 + (lane >> 2), r1 = r0 + 8;
    const int pos0 = p0 + min(r0 / G, n - 1), pos1 = p0 + min(r1 / G, n - 1);
    const int warp_last = p0 + min((rw * 16 + 15) / G, n - 1);
    const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units: exp2 below

    uint32_t qf[KT][4];
    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    for (int s = 0; s < nstages; ++s) {
        cp_async_wait<STAGES - 2>();  // stage s landed (this thread's copies) ...
        __syncthreads();  // ... everyone's; and every warp is done with stage s - 1's buffer
        {
            const int next = s + STAGES - 1;  // refill the buffer stage s - 1 used
            if (next < nstages) copy(next % STAGES, slots);
            cp_async_commit();  // possibly empty: keeps the group count per stage uniform
            if (next + 1 < nstages) lookup(next + 1, slots);
        }
        if (s == 0) {
#pragma unroll
            for (int kk = 0; kk < KT; ++kk) {
                const int r = rw * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                ldsm_x4(smem_u32(qs + swz<D>(r, 2 * kk + (lane >> 4))), qf[kk]);
            }
        }
        const int kp0 = s * SUPER + kg * PF_BN;  // this warp's first key
        // A warp whose rows all precede its first key has nothing to add.
        if (kp0 <= warp_last) {
            const bf16* kb = ks + (s % STAGES) * SUPER * D + kg * PF_BN * D;
            const bf16* vb = vs + (s % STAGES) * SUPER * D + kg * PF_BN * D;
            float sc[NT][4];
#pragma unroll
            for (int t = 0; t < NT; ++t) sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
                for (int nb = 0; nb < NT / 2; ++nb) {
                    uint32_t b[4];
                    const int r = nb * 16 + (lane & 7) + ((lane >> 4) << 3);
                    ldsm_x4(smem_u32(kb + swz<D>(r, 2 * kk + ((lane >> 3) & 1))), b);
                    mma_bf16(sc[2 * nb], qf[kk], b[0], b[1]);
                    mma_bf16(sc[2 * nb + 1], qf[kk], b[2], b[3]);
                }
            }
            // Mask (only where some key is past some row's position), row max of the raw
            // scores (the scale is positive, so it is folded into the exponent below).
            const bool mask = kp0 + PF_BN - 1 > p0;
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (mask) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = kp0 + t * 8 + (lane & 3) * 2 + (e & 1);
                        if (key > (e < 2 ? pos0 : pos1)) sc[t][e] = -INFINITY;
                    }
                }
                mx0 = fmaxf(mx0, fmaxf(sc[t][0], sc[t][1]));
                mx1 = fmaxf(mx1, fmaxf(sc[t][2], sc[t][3]));
            }
            const float m0_old = m0, m1_old = m1;
            // The 4 lanes of a quad share a row.
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            // A row may have seen no key yet (a key group past key 0 whose row ends before its
            // keys): its max stays -inf and it adds nothing, so subtract 0 there instead of
            // -inf (exp2(-inf - -inf) would be NaN; exp2(-inf - 0) = 0).
            m0 = fmaxf(m0, mx0);
            m1 = fmaxf(m1, mx1);
            const float mn0 = m0 == -INFINITY ? 0.f : m0 * sl2;  // in log2 units
            const float mn1 = m1 == -INFINITY ? 0.f : m1 * sl2;
            const float a0 = fast_exp2(m0_old * sl2 - mn0), a1 = fast_exp2(m1_old * sl2 - mn1);
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                sc[t][0] = fast_exp2(fmaf(sc[t][0], sl2, -mn0));
                sc[t][1] = fast_exp2(fmaf(sc[t][1], sl2, -mn0));
                sc[t][2] = fast_exp2(fmaf(sc[t][2], sl2, -mn1));
                sc[t][3] = fast_exp2(fmaf(sc[t][3], sl2, -mn1));
                sum0 += sc[t][0] + sc[t][1];
                sum1 += sc[t][2] + sc[t][3];
            }
            l0 = l0 * a0 + sum0;  // per-lane partial sums; the quad is summed at the end
            l1 = l1 * a1 + sum1;
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                o[d][0] *= a0;
                o[d][1] *= a0;
                o[d][2] *= a1;
                o[d][3] *= a1;
            }
            // O += P V: the S accumulators of key n-tiles 2kk, 2kk+1 are the A fragment of
            // key k-step kk.
#pragma unroll
            for (int kk = 0; kk < PF_BN / 16; ++kk) {
                uint32_t a[4];
                a[0] = pack_bf16x2(sc[2 * kk][0], sc[2 * kk][1]);
                a[1] = pack_bf16x2(sc[2 * kk][2], sc[2 * kk][3]);
                a[2] = pack_bf16x2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
                a[3] = pack_bf16x2(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
                const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
                for (int dp = 0; dp < DT / 2; ++dp) {
                    uint32_t b[4];
                    ldsm_x4_trans(smem_u32(vb + swz<D>(r, 2 * dp + (lane >> 4))), b);
                    mma_bf16(o[2 * dp], a, b[0], b[1]);
                    mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
                }
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // Merge key groups 1 .. KG-1 into key group 0 through shared memory (the K/V buffers are
    // free once every copy has landed and every warp has left the loop). Index
    // [group][value][thread] keeps consecutive lanes on consecutive words.
    cp_async_wait<0>();
    __syncthreads();
    constexpr int RT = 32 * PF_RGROUPS;  // threads of one key group
    constexpr int XS = (DT * 4 + 4) * RT;  // floats per key group: o, then m0, m1, l0, l1
    float* xch = reinterpret_cast<float*>(ks);
    const int rt = rw * 32 + lane;
    if (kg > 0) {
        float* x = xch + (kg - 1) * XS;
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) x[(d * 4 + e) * RT + rt] = o[d][e];
        x[(DT * 4 + 0) * RT + rt] = m0;
        x[(DT * 4 + 1) * RT + rt] = m1;
        x[(DT * 4 + 2) * RT + rt] = l0;
        x[(DT * 4 + 3) * RT + rt] = l1;
    }
    __syncthreads();
    if (kg > 0) return;
#pragma unroll 1
    for (int g = 1; g < KG; ++g) {
        const float* x = xch + (g - 1) * XS;
        const float om0 = x[(DT * 4 + 0) * RT + rt], om1 = x[(DT * 4 + 1) * RT + rt];
        const float mn0 = fmaxf(m0, om0), mn1 = fmaxf(m1, om1);  // finite: group 0 saw key 0
        const float a0 = fast_exp2((m0 - mn0) * sl2), b0 = fast_exp2((om0 - mn0) * sl2);
        const float a1 = fast_exp2((m1 - mn1) * sl2), b1 = fast_exp2((om1 - mn1) * sl2);
        m0 = mn0;
        m1 = mn1;
        l0 = l0 * a0 + x[(DT * 4 + 2) * RT + rt] * b0;
        l1 = l1 * a1 + x[(DT * 4 + 3) * RT + rt] * b1;
#pragma unroll
        for (int d = 0; d < DT; ++d) {
            o[d][0] = o[d][0] * a0 + x[(d * 4 + 0) * RT + rt] * b0;
            o[d][1] = o[d][1] * a0 + x[(d * 4 + 1) * RT + rt] * b0;
            o[d][2] = o[d][2] * a1 + x[(d * 4 + 2) * RT + rt] * b1;
            o[d][3] = o[d][3] * a1 + x[(d * 4 + 3) * RT + rt] * b1;
        }
    }
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    const int col = (lane & 3) * 2;
    if (r0 < n * G) {
        bf16* dst = out + (size_t)(t0 + r0 / G) * out_stride + (size_t)(kvh * G + r0 % G) * D + col;
#pragma unroll
        for (int d = 0; d < DT; ++d)
            *reinterpret_cast<uint32_t*>(dst + d * 8) = pack_bf16x2(o[d][0] * inv0, o[d][1] * inv0);
    }
    if (r1 < n * G) {
        bf16* dst = out + (size_t)(t0 + r1 / G) * out_stride + (size_t)(kvh * G + r1 % G) * D + col;
#pragma unroll
        for (int d = 0; d < DT; ++d)
            *reinterpret_cast<uint32_t*>(dst + d * 8) = pack_bf16x2(o[d][2] * inv1, o[d][3] * inv1);
    }
}

// prefill_attention_d{D}_k{KG}: KG key groups (256 or 512 threads). Dynamic shared memory:
// (PF_BM + 2 * PF_STAGES(D, KG) * KG * PF_BN) * D * 2 bytes (shapes.prefill_smem): k2 keeps
// two blocks per SM for D = 64 (104 KiB); k4 (one block per SM, 136 KiB) halves the serial
// stages again for launches with no more blocks than SMs.
#define PF_INST(DIM, KG)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * PF_RGROUPS * KG, (DIM) * (KG) <= 128 ? 2 : 1) \
        prefill_attention_d##DIM##_k##KG(                                                       \
            const bf16* __restrict__ q, int q_stride, const bf16* __restrict__ k_cache,         \
            const bf16* __restrict__ v_cache, const int* __restrict__ block_tables,             \
            int bt_stride, bf16* __restrict__ out, int out_stride,                              \
            const int* __restrict__ tiles, int H, int KVH, int block_size, float scale) {       \
        prefill_impl<DIM, KG>(q, q_stride, k_cache, v_cache, block_tables, bt_stride, out,      \
                              out_stride, tiles, H, KVH, block_size, scale);                    \
    }
PF_INST(64, 2)
PF_INST(64, 4)
PF_INST(128, 2)
