// Rotary position embedding on q and k, fused with the write of k and v into the paged KV cache.
//   qkv [T, qkv_stride] bf16 holds q (H*D) | k (KVH*D) | v (KVH*D) per token; q is rotated in place.
//   k_cache, v_cache [num_blocks, block_size, KVH, D] bf16; slots[t] = block * block_size + offset.
//   mode 0: neox / rotate-half pairs (i, i + D/2) -- HF Llama order.
//   mode 1: interleaved pairs (2i, 2i + 1) -- GGUF / original Meta order.
// inv_freq [D/2] fp32 already carries any llama3 scaling (computed on the host).
#include "common.cuh"

__device__ __forceinline__ void pair_index(int i, int D, int mode, int& a, int& b) {
    if (mode == 0) { a = i; b = i + D / 2; }
    else { a = 2 * i; b = 2 * i + 1; }
}

// grid: T blocks; block: 128 threads.
extern "C" __global__ void rope_kv_write(bf16* __restrict__ qkv, int qkv_stride,
                                         const int* __restrict__ positions,
                                         const int* __restrict__ slots,
                                         const float* __restrict__ inv_freq,
                                         bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                         int H, int KVH, int D, int mode) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const float pos = (float)positions[t];
    const long long slot = slots[t];
    bf16* row = qkv + (size_t)t * qkv_stride;
    const int half = D / 2;
    const int n_rot = (H + KVH) * half;  // rotation pairs over q heads then k heads
    for (int w = threadIdx.x; w < n_rot; w += blockDim.x) {
        const int head = w / half, i = w - head * half;
        int a, b;
        pair_index(i, D, mode, a, b);
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        bf16* base = row + head * D;
        const float x1 = bf2f(base[a]), x2 = bf2f(base[b]);
        const bf16 y1 = f2bf(x1 * c - x2 * s), y2 = f2bf(x2 * c + x1 * s);
        if (head < H) {
            base[a] = y1;
            base[b] = y2;
        } else {
            bf16* dst = k_cache + slot * KVH * D + (size_t)(head - H) * D;
            dst[a] = y1;
            dst[b] = y2;
        }
    }
    const bf16* v = row + (H + KVH) * D;
    bf16* vdst = v_cache + slot * KVH * D;
    for (int j = threadIdx.x; j < KVH * D; j += blockDim.x) vdst[j] = v[j];
}
