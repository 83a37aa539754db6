// Embedding gather: residual[t, :] = float(embed[ids[t], :]).
#include "common.cuh"

// grid: T blocks; block: 128 threads. `hidden` is a multiple of 8.
// Also clears argmax slots [0, n_clear) for the fused argmax of this step's lm_head GEMV.
extern "C" __global__ void embedding_gather(const bf16* __restrict__ embed, const int* __restrict__ ids,
                                            float* __restrict__ out, int hidden, int vocab,
                                            unsigned long long* __restrict__ argmax_clear,
                                            int n_clear) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    int id = ids[t];
    id = (id < 0 || id >= vocab) ? 0 : id;  // the host validates ids; never read out of bounds
    const uint4* src = reinterpret_cast<const uint4*>(embed + (size_t)id * hidden);
    float4* dst = reinterpret_cast<float4*>(out + (size_t)t * hidden);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
        float f[8];
        unpack8(src[i], f);
        dst[2 * i] = make_float4(f[0], f[1], f[2], f[3]);
        dst[2 * i + 1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    if (t == 0 && argmax_clear != nullptr)
        for (int i = threadIdx.x; i < n_clear; i += blockDim.x) argmax_clear[i] = 0ull;
}
