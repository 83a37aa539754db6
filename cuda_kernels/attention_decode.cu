// Low-latency paged attention for decode (short contexts): one block of 8 warps per
// (token, kv head); warp w takes keys [32 w, 32 w + 32), then every 256th chunk after. Inside a
// chunk each lane owns one key for the scores (its whole K row in one round trip), the warp
// runs the online softmax with shuffles, then the lanes switch to head dims for P.V (each
// key's V row is one coalesced warp load). The 8 warps' (m, l, o) merge once in shared memory:
// no global partials, no atomics, a single barrier after the q load. Same signature as
// paged_attention_d{D} (the partials / counters arguments are unused); attends to positions
// [0, positions[t]] of the token's sequence, so it is also correct for prefill tokens.
#include "common.cuh"

#define DEC_WARPS 8
#define DEC_GMAX 8

template <int D>
__device__ __forceinline__ void attention_decode_impl(
    const bf16* __restrict__ q, int q_stride, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const int* __restrict__ block_tables, int bt_stride,
    const int* __restrict__ tok_seq, const int* __restrict__ positions, bf16* __restrict__ out,
    int out_stride, int H, int KVH, int block_size, float scale) {
    constexpr int C = D / 8;          // 16-byte chunks per K row
    constexpr int DPL = (D + 31) / 32;  // head dims per lane in P.V
    __shared__ __align__(16) float qs[DEC_GMAX * D];
    __shared__ float m_s[DEC_WARPS][DEC_GMAX], l_s[DEC_WARPS][DEC_GMAX];
    __shared__ float o_s[DEC_WARPS][DEC_GMAX * D];

    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, kvh = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int G = H / KVH, h0 = kvh * G;
    const int ctx = positions[t] + 1;
    const int* bt = block_tables + (size_t)tok_seq[t] * bt_stride;
    const size_t row_stride = (size_t)KVH * D;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x)
        qs[i] = bf2f(q[(size_t)t * q_stride + (size_t)h0 * D + i]) * scale;
    __syncthreads();

    float m[DEC_GMAX], l[DEC_GMAX], o[DEC_GMAX][DPL];
#pragma unroll
    for (int g = 0; g < DEC_GMAX; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < DPL; ++j) o[g][j] = 0.f;
    }
    for (int base = warp * 32; base < ctx; base += DEC_WARPS * 32) {
        const int pos = base + lane;
        const bool valid = pos < ctx;
        const int slot = valid ? bt[pos / block_size] * block_size + pos % block_size : 0;
        float s[DEC_GMAX];
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) s[g] = 0.f;
        if (valid) {
            const uint4* kr = reinterpret_cast<const uint4*>(k_cache + slot * row_stride + (size_t)kvh * D);
            uint4 kv[C];
#pragma unroll
            for (int c = 0; c < C; ++c) kv[c] = kr[c];
#pragma unroll
            for (int c = 0; c < C; ++c) {
                float kf[8];
                unpack8(kv[c], kf);
#pragma unroll
                for (int g = 0; g < DEC_GMAX; ++g) {
                    if (g < G) {
                        const float4 qa = *reinterpret_cast<const float4*>(qs + g * D + c * 8);
                        const float4 qb = *reinterpret_cast<const float4*>(qs + g * D + c * 8 + 4);
                        s[g] += kf[0] * qa.x + kf[1] * qa.y + kf[2] * qa.z + kf[3] * qa.w +
                                kf[4] * qb.x + kf[5] * qb.y + kf[6] * qb.z + kf[7] * qb.w;
                    }
                }
            }
        }
        // Online softmax over this chunk; s[g] becomes p = exp(s - m_new).
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) {
            if (g < G) {
                const float mx = warp_max(valid ? s[g] : -INFINITY);
                const float m_new = fmaxf(m[g], mx);
                const float alpha = __expf(m[g] - m_new);
                const float p = valid ? __expf(s[g] - m_new) : 0.f;
                l[g] = l[g] * alpha + warp_sum(p);
                m[g] = m_new;
                s[g] = p;
#pragma unroll
                for (int j = 0; j < DPL; ++j) o[g][j] *= alpha;
            }
        }
        // P.V: lanes over head dims, keys of the chunk one after another.
        const int n = min(32, ctx - base);
#pragma unroll 4
        for (int j = 0; j < n; ++j) {
            const int sj = __shfl_sync(0xffffffffu, slot, j);
            const bf16* vr = v_cache + sj * row_stride + (size_t)kvh * D;
            float v[DPL];
#pragma unroll
            for (int dd = 0; dd < DPL; ++dd) {
                const int d = lane + 32 * dd;
                v[dd] = d < D ? bf2f(vr[d]) : 0.f;
            }
#pragma unroll
            for (int g = 0; g < DEC_GMAX; ++g) {
                if (g < G) {
                    const float pj = __shfl_sync(0xffffffffu, s[g], j);
#pragma unroll
                    for (int dd = 0; dd < DPL; ++dd) o[g][dd] = fmaf(pj, v[dd], o[g][dd]);
                }
            }
        }
    }
    // Merge the warps.
    if (lane == 0)
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g) {
            m_s[warp][g] = m[g];
            l_s[warp][g] = l[g];
        }
#pragma unroll
    for (int g = 0; g < DEC_GMAX; ++g)
        if (g < G)
#pragma unroll
            for (int dd = 0; dd < DPL; ++dd) {
                const int d = lane + 32 * dd;
                if (d < D) o_s[warp][g * D + d] = o[g][dd];
            }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int g = i / D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, m_s[w][g]);
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float e = __expf(m_s[w][g] - M);  // warps that saw no key: exp(-inf) = 0
            L += e * l_s[w][g];
            O += e * o_s[w][i];
        }
        out[(size_t)t * out_stride + (size_t)h0 * D + i] = f2bf(O / L);
    }
}

#define DEC_ARGS                                                                                 \
    const bf16 *__restrict__ q, int q_stride, const bf16 *__restrict__ k_cache,                 \
        const bf16 *__restrict__ v_cache, const int *__restrict__ block_tables, int bt_stride,  \
        const int *__restrict__ tok_seq, const int *__restrict__ positions,                     \
        bf16 *__restrict__ out, int out_stride, float *__restrict__ part_o,                     \
        float *__restrict__ part_ml, int *__restrict__ counters, int H, int KVH, int D,         \
        int block_size, float scale
#define DEC_PASS                                                                             \
    q, q_stride, k_cache, v_cache, block_tables, bt_stride, tok_seq, positions, out,         \
        out_stride, H, KVH, block_size, scale

#define DEC_INST(DIM)                                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) attention_decode_d##DIM(DEC_ARGS) { \
        attention_decode_impl<DIM>(DEC_PASS);                                                   \
    }
DEC_INST(16)
DEC_INST(32)
DEC_INST(64)
DEC_INST(128)
