// Paged decode attention for few token rows (the GEMV path, <= 8 rows): every row t attends to
// positions [0, positions[t]] of its sequence in the paged cache [block][slot][KVH][D] bf16.
//
// Built for latency: at a few hundred cached tokens the data is tiny and a kernel's time is
// its longest chain of dependent instructions (Nsight showed ~12 cycles per issued
// instruction on the older kernel), so the work is spread thin over many warps and blocks.
//  * One block (8 warps) per (token row, kv head, split); all G = H / KVH query heads of the
//    kv head share each K/V load (GQA).
//  * A warp holds 32 / C keys side by side (C = D / 8 lanes per key, one 16-byte load each);
//    each lane group keeps U keys in flight, K and V loaded together: a block covers
//    CHUNK = 8 * (32 / C) * U keys with one memory round trip.
//  * Position and block-table entries are host-written inputs, read before
//    griddepcontrol.wait: under programmatic dependent launch those round trips overlap the
//    previous kernel. After the wait q and K/V load in parallel.
//  * Scores: shuffles sum a key's C lanes. Softmax max: block-wide per chunk (shuffles, one
//    shared-memory exchange, one barrier), so every lane shares the running max and the
//    partial outputs add up without rescaling: shuffles across a warp's lane groups, then the
//    warps one at a time into shared memory (no float atomics, see add8_shared).
//  * Splits: the launch has gridDim.z splits (fixed in a CUDA graph, sized for the longest
//    context of the graph's bucket); a row of length ctx uses eff = min(gridDim.z,
//    ceil(ctx / CHUNK)) of them and the rest exit at once. With eff == 1 the block writes the
//    output itself: no partials, no combine. Else each split writes (o, m, l) partials and
//    the last split block to finish (atomic counter per (row, kv head), reset after use)
//    merges them.
//
// Compiled once per U: loader.py builds module attention_decode_u{U} with -DDEC_UNROLL=U
// (loader.VARIANTS), so the four builds compile in parallel.
#include "common.cuh"
#include "attention_common.cuh"

#define DEC_THREADS 256
#define DEC_WARPS 8
#define DEC_GMAX 8
#define DEC_NEG (-1e30f)  // "no key yet": finite, so exp(m_old - m_new) never sees inf - inf

template <int D, int U>
__device__ __forceinline__ void decode_attention_impl(
    const bf16* __restrict__ q, int q_stride, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int bt_stride,
    const int* __restrict__ tok_seq, const int* __restrict__ positions, bf16* __restrict__ out,
    int out_stride, float* __restrict__ part_o, float* __restrict__ part_ml,
    int* __restrict__ counters, int H, int KVH, int block_size, float scale) {
    constexpr int C = D / 8;     // lanes per key (16-byte chunks of a K/V row)
    constexpr int KPW = 32 / C;  // keys side by side in one warp
    constexpr int CHUNK = DEC_WARPS * KPW * U;
    __shared__ __align__(16) float qs[DEC_GMAX * D];
    __shared__ __align__(16) float osum[DEC_GMAX * D];
    __shared__ float m_w[2][DEC_WARPS][DEC_GMAX];  // per-chunk warp maxima, double-buffered
    __shared__ float m_s[DEC_GMAX], l_w[DEC_WARPS][DEC_GMAX];

    pdl_trigger();
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, nz = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int grp = lane / C, ch = lane % C;
    const int G = H / KVH, h0 = kvh * G;
    // Inputs copied in by the host before the step: safe to read before the wait.
    const int ctx = positions[t] + 1;
    const int* bt = block_tables + (size_t)tok_seq[t] * bt_stride;
    const int eff = min(nz, (ctx + CHUNK - 1) / CHUNK);
    if (split >= eff) return;
    const int per = (ctx + eff - 1) / eff;
    const int start = split * per, end = min(ctx, start + per);
    const size_t row_stride = (size_t)KVH * D;
    const size_t head_off = (size_t)kvh * D + ch * 8;

    int slot[U];
    auto find_slots = [&](int c0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int pos = c0 + (u * DEC_WARPS + warp) * KPW + grp;
            slot[u] = pos < end ? bt[pos / block_size] * block_size + pos % block_size : -1;
        }
    };
    find_slots(start);

    // M: running max, the same in every thread; l, acc: this lane group's sums under M.
    float M[DEC_GMAX], l[DEC_GMAX], acc[DEC_GMAX][8];
#pragma unroll
    for (int g = 0; g < DEC_GMAX; ++g) {
        M[g] = DEC_NEG;
        l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    }

    pdl_wait();  // q and this step's K/V row come from the previous kernel
    int par = 0;
    for (int c0 = start; c0 < end; c0 += CHUNK, par ^= 1) {
        if (c0 != start) find_slots(c0);
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (slot[u] >= 0) {
                const size_t off = (size_t)slot[u] * row_stride + head_off;
                kr[u] = __ldcg(reinterpret_cast<const uint4*>(k_cache + off));
                vr[u] = __ldcg(reinterpret_cast<const uint4*>(v_cache + off));
            } else {
                kr[u] = make_uint4(0, 0, 0, 0);
                vr[u] = make_uint4(0, 0, 0, 0);
            }
        }
        if (c0 == start) {  // q of the group's heads, scaled, into shared memory
            for (int i = threadIdx.x; i < G * D; i += DEC_THREADS)
                qs[i] = bf2f(q[(size_t)t * q_stride + (size_t)h0 * D + i]) * scale;
            __syncthreads();
        }
        // Scores: lane ch of a key's group dots its 8 dims, shuffles sum the C lanes.
        float s[DEC_GMAX][U];
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) {
            if (g < G) {
                const float4 qa = *reinterpret_cast<const float4*>(qs + g * D + ch * 8);
                const float4 qb = *reinterpret_cast<const float4*>(qs + g * D + ch * 8 + 4);
                float mx = DEC_NEG;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float kf[8];
                    unpack8(kr[u], kf);
                    float d = kf[0] * qa.x + kf[1] * qa.y + kf[2] * qa.z + kf[3] * qa.w +
                              kf[4] * qb.x + kf[5] * qb.y + kf[6] * qb.z + kf[7] * qb.w;
#pragma unroll
                    for (int o = C / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                    s[g][u] = d;
                    if (slot[u] >= 0) mx = fmaxf(mx, d);
                }
#pragma unroll
                for (int o = C; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                if (lane == 0) m_w[par][warp][g] = mx;
            }
        }
        __syncthreads();
        // New running max (block-wide), rescale, p = exp(s - M), o += p v.
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) {
            if (g < G) {
                float mx = M[g];
#pragma unroll
                for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, m_w[par][w][g]);
                const float alpha = __expf(M[g] - mx);
                M[g] = mx;
                float sum = 0.f;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const float p = slot[u] >= 0 ? __expf(s[g][u] - mx) : 0.f;
                    s[g][u] = p;
                    sum += p;
                }
                l[g] = l[g] * alpha + sum;
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[g][j] *= alpha;
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float vf[8];
            unpack8(vr[u], vf);
#pragma unroll
            for (int g = 0; g < DEC_GMAX; ++g)
                if (g < G)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(s[g][u], vf[j], acc[g][j]);
        }
    }

    // Every lane's sums share M: add them up, across the warp's lane groups with shuffles,
    // then the warps one at a time into shared memory (no float atomics: add8_shared).
#pragma unroll
    for (int g = 0; g < DEC_GMAX; ++g) {
        if (g < G) {
#pragma unroll
            for (int o = C; o < 32; o <<= 1) {
                l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
            }
            if (lane == 0) l_w[warp][g] = l[g];
        }
    }
    if (threadIdx.x == 0) {
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g)
            if (g < G) m_s[g] = M[g];
    }
#pragma unroll 1
    for (int w = 0; w < DEC_WARPS; ++w) {
        if (warp == w && grp == 0) {
#pragma unroll
            for (int g = 0; g < DEC_GMAX; ++g)
                if (g < G) add8_shared(osum + g * D + ch * 8, acc[g], w == 0);
        }
        __syncthreads();
    }
    auto block_l = [&](int g) {
        float L = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) L += l_w[w][g];
        return L;
    };

    if (eff == 1) {
        for (int i = threadIdx.x; i < G * D; i += DEC_THREADS)
            out[(size_t)t * out_stride + (size_t)h0 * D + i] = f2bf(osum[i] / block_l(i / D));
        return;
    }
    publish_and_merge_splits<D>(osum, m_s, block_l, t, kvh, G, H, KVH, split, eff, nz,
                                part_o, part_ml, counters, out, out_stride);
}

// paged_decode_d{D}_u{U}: same signature as paged_attention_d* (D kept for uniformity).
#define DEC_INST(DIM, UNROLL)                                                                \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 1)                             \
        paged_decode_d##DIM##_u##UNROLL(ATTN_ARGS) {                                          \
        decode_attention_impl<DIM, UNROLL>(ATTN_PASS);                                        \
    }
#define DEC_INST_ALL_D(UNROLL) \
    DEC_INST(16, UNROLL)       \
    DEC_INST(32, UNROLL)       \
    DEC_INST(64, UNROLL)       \
    DEC_INST(128, UNROLL)      \
    DEC_INST(256, UNROLL)

#ifndef DEC_UNROLL
#error "compile with -DDEC_UNROLL=1, 2, 4 or 8 (cuda_kernels/loader.py VARIANTS)"
#endif
// One level of indirection so DEC_UNROLL expands before ## pastes it into the names.
#define DEC_INST_UNROLL(UNROLL) DEC_INST_ALL_D(UNROLL)
DEC_INST_UNROLL(DEC_UNROLL)
