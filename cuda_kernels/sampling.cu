// Sampling on the device.
//   argmax_rows: greedy ids of fp32 logits rows (ties -> lowest id, as np.argmax).
//   argmax_finish: turn the packed keys of the lm_head GEMV's fused argmax into ids.
// Temperature / top-k / top-p / min-p / repetition penalty / logprobs run in the host sampler
// (inference_service/engine/sampler.py) on the logits rows that need them.
#include "common.cuh"

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// grid: R blocks; block: 1024 threads.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int stride,
                                       int* __restrict__ out_ids) {
    pdl_trigger();
    pdl_wait();
    __shared__ unsigned long long red[32];
    const float* row = logits + (size_t)blockIdx.x * stride;
    unsigned long long best = 0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const unsigned long long k = argmax_key(row[i], i);
        best = k > best ? k : best;
    }
    best = warp_max_u64(best);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0ull;
        best = warp_max_u64(best);
        if (threadIdx.x == 0) out_ids[blockIdx.x] = (int)(0xffffffffu - (uint32_t)(best & 0xffffffffull));
    }
}

// grid: 1; block: >= R.
extern "C" __global__ void argmax_finish(const unsigned long long* __restrict__ keys, int R,
                                         int* __restrict__ out_ids) {
    pdl_trigger();
    pdl_wait();
    for (int i = threadIdx.x; i < R; i += blockDim.x)
        out_ids[i] = (int)(0xffffffffu - (uint32_t)(keys[i] & 0xffffffffull));
}
