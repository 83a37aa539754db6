// What the paged attention kernels (attention.cu, attention_decode.cuh) share: their launch
// signature (backends/cuda/kernels.py ATT_SIG) and the flash-decoding epilogue.
//
// Epilogue:
// A split block of (token row t, kv head kvh) publishes its partial for the G query heads of
// that kv head: unnormalized o [G][D] (osum, shared memory), running max m and sum l per head;
// the last of the `used` split blocks to finish (atomic counter per (t, kvh), reset after use
// so graph replays find it zeroed) merges all partials into out. Partials are laid out
// [t][head][stride][...] with stride >= used. Every thread of the block must call it.
#pragma once
#include "common.cuh"

// One signature for paged_attention_d* and paged_decode_d*_u*, so the backend launches either
// with the same arguments (D is kept for uniformity: each kernel is compiled for one head dim).
#define ATTN_ARGS                                                                                \
    const bf16 *__restrict__ q, int q_stride, const bf16 *__restrict__ k_cache,                 \
        const bf16 *__restrict__ v_cache, const int *__restrict__ block_tables, int bt_stride,  \
        const int *__restrict__ tok_seq, const int *__restrict__ positions,                     \
        bf16 *__restrict__ out, int out_stride, float *__restrict__ part_o,                     \
        float *__restrict__ part_ml, int *__restrict__ counters, int H, int KVH, int D,         \
        int block_size, float scale
#define ATTN_PASS                                                                            \
    q, q_stride, k_cache, v_cache, block_tables, bt_stride, tok_seq, positions, out,         \
        out_stride, part_o, part_ml, counters, H, KVH, block_size, scale

template <int D, typename SumOf>
__device__ __forceinline__ void publish_and_merge_splits(
    const float* osum, const float* m_s, SumOf l_of, int t, int kvh, int G, int H, int KVH,
    int split, int used, int stride, float* __restrict__ part_o, float* __restrict__ part_ml,
    int* __restrict__ counters, bf16* __restrict__ out, int out_stride) {
    __shared__ int last_s;
    const int h0 = kvh * G;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i - g * D;
        part_o[(((size_t)t * H + h0 + g) * stride + split) * D + d] = osum[i];
    }
    if (threadIdx.x < G) {
        const size_t ml = (((size_t)t * H + h0 + threadIdx.x) * stride + split) * 2;
        part_ml[ml] = m_s[threadIdx.x];
        part_ml[ml + 1] = l_of(threadIdx.x);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int done = atomicAdd(&counters[t * KVH + kvh], 1);
        last_s = (done == used - 1);
    }
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i - g * D;
        const size_t base = ((size_t)t * H + h0 + g) * stride;
        // Split 0 always holds keys (ctx >= 1), so the max is finite and a keyless split's
        // (-inf, 0) partial weighs exp(-inf) = 0.
        float M = -1e30f;
        for (int s = 0; s < used; ++s) M = fmaxf(M, __ldcg(part_ml + (base + s) * 2));
        float L = 0.f, O = 0.f;
        for (int s = 0; s < used; ++s) {
            const float w = __expf(__ldcg(part_ml + (base + s) * 2) - M);
            L += w * __ldcg(part_ml + (base + s) * 2 + 1);
            O += w * __ldcg(part_o + (base + s) * D + d);
        }
        out[(size_t)t * out_stride + (size_t)(h0 + g) * D + d] = f2bf(O / L);
    }
    if (threadIdx.x == 0) counters[t * KVH + kvh] = 0;
}
