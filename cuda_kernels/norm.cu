// RMSNorm over fp32 residual rows, optionally fused with the residual add:
//   if add != null: resid[t] += add[t]   (add is fp32 or bf16 per add_bf16)
//   out[t] = bf16(resid[t] * rsqrt(mean(resid[t]^2) + eps) * weight)
#include "common.cuh"

// grid: T blocks; block: 256 threads.
extern "C" __global__ void add_rmsnorm(float* __restrict__ resid, const void* __restrict__ add,
                                       int add_bf16, const float* __restrict__ weight,
                                       bf16* __restrict__ out, int hidden, float eps) {
    pdl_trigger();
    pdl_wait();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    float* r = resid + (size_t)t * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i];
        if (add != nullptr) {
            v += add_bf16 ? bf2f(reinterpret_cast<const bf16*>(add)[(size_t)t * hidden + i])
                          : reinterpret_cast<const float*>(add)[(size_t)t * hidden + i];
            r[i] = v;
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    bf16* o = out + (size_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f2bf(r[i] * inv * weight[i]);
}
