// Shared helpers for the kuiper-serve kernels: bf16 conversion, vector loads, reductions.
// All kernels keep bf16 in memory and accumulate in fp32.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// 8 bf16 packed in a uint4 (one 128-bit load) -> 8 floats.
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

// Weights are read exactly once per step: stream them past L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(r);
}

// Monotone map of a float to an unsigned key (larger float -> larger key), for atomicMax argmax.
__device__ __forceinline__ uint32_t float_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (value, index) packed so that atomicMax picks the largest value and, on ties, the lowest index
// (np.argmax semantics).
__device__ __forceinline__ unsigned long long argmax_key(float v, int idx) {
    return ((unsigned long long)float_key(v) << 32) | (unsigned long long)(0xffffffffu - (uint32_t)idx);
}

// Programmatic dependent launch (Hopper): a kernel launched with the programmatic-serialization
// attribute may start while the previous kernel still runs. pdl_trigger() lets the next kernel
// start its prologue now; pdl_wait() blocks until the previous kernel has finished and its
// writes are visible. Every kernel waits before touching data an earlier kernel wrote (or
// writing data an earlier kernel reads). Without the attribute both are no-ops.
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

// dst[0..8) = (first ? 0 : dst) + v, as two 16-byte shared-memory accesses. The attention
// kernels merge their warps' partial outputs with this, one warp at a time between barriers:
// a float atomicAdd into shared memory is a compare-and-swap retry loop on sm_90
// (ATOMS.CAST.SPIN), and warps contending for the same addresses serialize on it.
__device__ __forceinline__ void add8_shared(float* dst, const float* v, bool first) {
    float4* p = reinterpret_cast<float4*>(dst);
    float4 a = make_float4(v[0], v[1], v[2], v[3]), b = make_float4(v[4], v[5], v[6], v[7]);
    if (!first) {
        const float4 x = p[0], y = p[1];
        a.x += x.x; a.y += x.y; a.z += x.z; a.w += x.w;
        b.x += y.x; b.y += y.y; b.z += y.z; b.w += y.w;
    }
    p[0] = a;
    p[1] = b;
}
