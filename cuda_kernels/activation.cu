// SwiGLU: out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]  (gate rows first, then up).
#include "common.cuh"

// grid: (ceil(inter / 8 / 256), T); block: 256. `inter` is a multiple of 8.
extern "C" __global__ void swiglu(const bf16* __restrict__ gate_up, bf16* __restrict__ out, int inter) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // index of 8-wide vector
    if (i >= inter / 8) return;
    const uint4* g = reinterpret_cast<const uint4*>(gate_up + (size_t)t * 2 * inter);
    const uint4* u = reinterpret_cast<const uint4*>(gate_up + (size_t)t * 2 * inter + inter);
    float gf[8], uf[8], o[8];
    unpack8(g[i], gf);
    unpack8(u[i], uf);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = silu(gf[j]) * uf[j];
    reinterpret_cast<uint4*>(out + (size_t)t * inter)[i] = pack8(o);
}
