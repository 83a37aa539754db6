// Paged attention over the KV block tables, for decode and (causal) prefill alike: every query
// token t attends to positions [0, positions[t]] of its sequence, whose keys/values live in the
// paged cache [num_blocks, block_size, KVH, D] bf16 (rope_kv_write put this step's keys there
// first). One block (256 threads) serves one (token, kv head, split) and all G = H / KVH query heads of that
// kv head (GQA: each key/value is read once for the group). Keys are processed in tiles of 256
// with an online softmax, so a split can cover any length; each thread's V rows are loaded
// with its K row. With nsplit > 1 (flash-decoding),
// each split writes a partial (o, m, l); the last split block to finish (atomic counter per
// (token, kv head), reset after use) merges them, so no second launch is needed.
#include "common.cuh"
#include "attention_common.cuh"

#define ATT_THREADS 256
#define ATT_TILE 256  // keys per tile = threads
#define ATT_GMAX 8

template <int D>
__device__ __forceinline__ void attention_impl(
    const bf16* __restrict__ q, int q_stride, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int bt_stride,
    const int* __restrict__ tok_seq, const int* __restrict__ positions, bf16* __restrict__ out,
    int out_stride, float* __restrict__ part_o, float* __restrict__ part_ml,
    int* __restrict__ counters, int H, int KVH, int block_size, float scale) {
    constexpr int C = D / 8;              // 16-byte chunks per K/V row
    constexpr int KG = ATT_THREADS / C;   // keys processed side by side in the P.V phase
    __shared__ __align__(16) float qs[ATT_GMAX * D];  // later reused for the sum of o
    __shared__ float sc[ATT_GMAX][ATT_TILE];
    __shared__ int slot_s[ATT_TILE];
    __shared__ float m_s[ATT_GMAX], l_s[ATT_GMAX], alpha_s[ATT_GMAX];

    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int G = H / KVH, h0 = kvh * G;
    const int ctx = positions[t] + 1;
    const int per = (ctx + nsplit - 1) / nsplit;
    const int start = split * per, end = min(ctx, start + per);
    const int* bt = block_tables + (size_t)tok_seq[t] * bt_stride;
    const size_t row_stride = (size_t)KVH * D;  // elements between consecutive slots
    const int kg = threadIdx.x / C, ch = threadIdx.x % C;

    for (int i = threadIdx.x; i < G * D; i += blockDim.x)
        qs[i] = bf2f(q[(size_t)t * q_stride + (size_t)h0 * D + i]) * scale;
    if (threadIdx.x < ATT_GMAX) {
        m_s[threadIdx.x] = -INFINITY;
        l_s[threadIdx.x] = 0.f;
    }
    float acc[ATT_GMAX][8];
#pragma unroll
    for (int g = 0; g < ATT_GMAX; ++g)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    __syncthreads();

    // V rows of this thread's P.V keys are loaded together with its K row, so one memory
    // round trip serves both phases (VP 16-byte chunks in registers; none for D = 256).
    constexpr int VP = (C <= 16) ? ATT_TILE / KG : 1;
    for (int tile = start; tile < end; tile += ATT_TILE) {
        const int n = min(ATT_TILE, end - tile);
        uint4 vpre[VP];
        if (C <= 16) {
#pragma unroll
            for (int j = 0; j < VP; ++j) {
                const int i = kg + j * KG;
                if (i < n) {
                    const int pos = tile + i;
                    const int slot = bt[pos / block_size] * block_size + pos % block_size;
                    vpre[j] = *reinterpret_cast<const uint4*>(v_cache + slot * row_stride +
                                                              (size_t)kvh * D + ch * 8);
                }
            }
        }
        // Scores: one key per thread (its whole K row in flight at once).
        {
            const int i = threadIdx.x;
            float s[ATT_GMAX];
#pragma unroll
            for (int g = 0; g < ATT_GMAX; ++g) s[g] = 0.f;
            if (i < n) {
                const int pos = tile + i;
                const int slot = bt[pos / block_size] * block_size + pos % block_size;
                slot_s[i] = slot;
                const uint4* kr = reinterpret_cast<const uint4*>(k_cache + slot * row_stride + (size_t)kvh * D);
                uint4 kv[C];
#pragma unroll
                for (int c = 0; c < C; ++c) kv[c] = kr[c];
#pragma unroll
                for (int c = 0; c < C; ++c) {
                    float kf[8];
                    unpack8(kv[c], kf);
#pragma unroll
                    for (int g = 0; g < ATT_GMAX; ++g) {
                        if (g < G) {
                            const float4 qa = *reinterpret_cast<const float4*>(qs + g * D + c * 8);
                            const float4 qb = *reinterpret_cast<const float4*>(qs + g * D + c * 8 + 4);
                            s[g] += kf[0] * qa.x + kf[1] * qa.y + kf[2] * qa.z + kf[3] * qa.w +
                                    kf[4] * qb.x + kf[5] * qb.y + kf[6] * qb.z + kf[7] * qb.w;
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < ATT_GMAX; ++g)
                if (g < G) sc[g][i] = i < n ? s[g] : -INFINITY;
        }
        __syncthreads();
        // Online softmax update: one warp per head.
        for (int g = warp; g < G; g += ATT_THREADS / 32) {
            float mx = -INFINITY;
            for (int i = lane; i < ATT_TILE; i += 32) mx = fmaxf(mx, sc[g][i]);
            mx = warp_max(mx);
            const float m_old = m_s[g], m_new = fmaxf(m_old, mx);
            float sum = 0.f;
            for (int i = lane; i < ATT_TILE; i += 32) {
                const float p = __expf(sc[g][i] - m_new);
                sc[g][i] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float alpha = __expf(m_old - m_new);
                alpha_s[g] = alpha;
                l_s[g] = l_s[g] * alpha + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();
        // o = alpha * o + P V: thread (kg, ch) reads 16-byte chunk ch of keys kg, kg + KG, ...
#pragma unroll
        for (int g = 0; g < ATT_GMAX; ++g) {
            const float a = (g < G) ? alpha_s[g] : 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] *= a;
        }
        if (C <= 16) {
#pragma unroll
            for (int j = 0; j < VP; ++j) {
                const int i = kg + j * KG;
                if (i < n) {
                    float v[8];
                    unpack8(vpre[j], v);
#pragma unroll
                    for (int g = 0; g < ATT_GMAX; ++g) {
                        if (g < G) {
                            const float p = sc[g][i];
#pragma unroll
                            for (int jj = 0; jj < 8; ++jj) acc[g][jj] = fmaf(p, v[jj], acc[g][jj]);
                        }
                    }
                }
            }
        } else {
#pragma unroll 4
            for (int i = kg; i < n; i += KG) {
                const uint4 vv = *reinterpret_cast<const uint4*>(v_cache + slot_s[i] * row_stride +
                                                                  (size_t)kvh * D + ch * 8);
                float v[8];
                unpack8(vv, v);
#pragma unroll
                for (int g = 0; g < ATT_GMAX; ++g) {
                    if (g < G) {
                        const float p = sc[g][i];
#pragma unroll
                        for (int jj = 0; jj < 8; ++jj) acc[g][jj] = fmaf(p, v[jj], acc[g][jj]);
                    }
                }
            }
        }
        __syncthreads();
    }

    // Sum the KG key groups' partial outputs: first across the key groups inside each warp
    // (lanes ch, ch + C, ... hold the same dims) with shuffles, then the warps one at a time
    // into shared memory (qs is free: the tile loop ended with a barrier). No float atomics:
    // in shared memory they are compare-and-swap loops (see add8_shared).
    float* osum = qs;
#pragma unroll
    for (int g = 0; g < ATT_GMAX; ++g)
        if (g < G)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int o = C; o < 32; o <<= 1) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
    const bool writer = lane < C || C >= 32;
#pragma unroll 1
    for (int w = 0; w < ATT_THREADS / 32; ++w) {
        if (warp == w && writer) {
#pragma unroll
            for (int g = 0; g < ATT_GMAX; ++g)
                if (g < G) add8_shared(osum + g * D + ch * 8, acc[g], w == 0);
        }
        __syncthreads();
    }

    if (nsplit == 1) {
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
            const int g = i / D;
            out[(size_t)t * out_stride + (size_t)h0 * D + i] = f2bf(osum[i] / l_s[g]);
        }
        return;
    }
    auto sum_of = [&](int g) { return l_s[g]; };
    publish_and_merge_splits<D>(osum, m_s, sum_of, t, kvh, G, H, KVH, split, nsplit, nsplit, part_o,
                                part_ml, counters, out, out_stride);
}

// One kernel per head dim (the D argument is kept for a uniform signature).
#define ATT_INST(DIM)                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_attention_d##DIM(ATTN_ARGS) { \
        attention_impl<DIM>(ATTN_PASS);                                                  \
    }
ATT_INST(16)
ATT_INST(32)
ATT_INST(64)
ATT_INST(128)
ATT_INST(256)
