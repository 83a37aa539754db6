// Decode GEMV over int8 weights (weight-only quantization, `kuiper export --quant int8`):
// y[t, n] = sum_k x[t, k] * q[n, k] * s[n, k / G] for NT <= 8 token rows. q int8 [N, K]
// row-major, s fp16 [N, K / G] (symmetric, one scale per G consecutive inputs, G a multiple
// of 16, a power of two). Dequantized in registers, fp32 accumulation: half the bytes of the bf16 GEMV
// (gemv.cuh), whose layout it follows -- one warp per output row at a time, 128-bit streaming
// loads (16 weights each), U loads in flight per lane and the next U prefetched while these are
// summed, x rows staged in shared memory as bf16.
//
// Output (ymode): 0: y bf16 [t * y_stride + n] = acc + bias[n] (bias may be null)
//                 1: y fp32 [t * y_stride + n] += acc  (residual add)
//                 2: y fp32 [t * y_stride + n]  = acc
// K must be a multiple of 16.
#include "common.cuh"
#include <cuda_fp16.h>

#define GEMV8_WARPS 4
#define GEMV8_U 8

// 4 int8 of a 32-bit word -> 4 floats, without I2F: (b ^ 0x80) is b + 128 as a byte; placed
// under the exponent of 2^23 it reads as 2^23 + b + 128 (exact), and one add removes the bias.
__device__ __forceinline__ void unpack_i8x4(uint32_t w, float* f) {
    const uint32_t u = w ^ 0x80808080u;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        f[j] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650u | j)) - 8388736.f;
}

template <int NT>
__device__ __forceinline__ void gemv_i8_impl(const int8_t* __restrict__ Wq,
                                             const __half* __restrict__ scales, int N, int K,
                                             int group, const bf16* __restrict__ x, int x_stride,
                                             void* __restrict__ y, int ymode, int y_stride,
                                             const float* __restrict__ bias) {
    extern __shared__ uint4 smem_x[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nvec = K >> 4;  // 16 weights per 128-bit load
    const int ng = K / group;
    const int gshift = __ffs(group) - 1 - 4;  // vector index -> group index (G = 2^k >= 16)
    const int row_step = gridDim.x * GEMV8_WARPS;
    const int chunk = 32 * GEMV8_U;
    int row = blockIdx.x * GEMV8_WARPS + warp;

    // Two register buffers: while one chunk is summed, the next one (the next part of this
    // row, or the start of this warp's next row) is already on its way from memory.
    uint4 wa[GEMV8_U], wb[GEMV8_U];
    auto load = [&](uint4* w, int r, int base) {
        const uint4* p = reinterpret_cast<const uint4*>(Wq + (size_t)r * K);
#pragma unroll
        for (int u = 0; u < GEMV8_U; ++u) {
            const int i = base + u * 32 + lane;
            if (i < nvec) w[u] = ld_stream(p + i);
        }
    };
    pdl_trigger();
    if (row < N) load(wa, row, 0);
    pdl_wait();

    const int xvec = K >> 3;  // 8 bf16 per uint4 of x
    for (int t = 0; t < NT; ++t) {
        const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)t * x_stride);
        for (int i = threadIdx.x; i < xvec; i += blockDim.x) smem_x[t * xvec + i] = xr[i];
    }
    __syncthreads();

    for (; row < N; row += row_step) {
        float acc[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = 0.f;
        const __half* srow = scales + (size_t)row * ng;
        for (int base = 0; base < nvec; base += chunk) {
            if (base + chunk < nvec)
                load(wb, row, base + chunk);
            else if (row + row_step < N)
                load(wb, row + row_step, 0);
#pragma unroll
            for (int u = 0; u < GEMV8_U; ++u) {
                const int i = base + u * 32 + lane;
                if (i < nvec) {
                    const float s = __half2float(__ldg(srow + (i >> gshift)));
                    float w[16];
                    unpack_i8x4(wa[u].x, w);
                    unpack_i8x4(wa[u].y, w + 4);
                    unpack_i8x4(wa[u].z, w + 8);
                    unpack_i8x4(wa[u].w, w + 12);
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        float v[16];
                        unpack8(smem_x[t * xvec + 2 * i], v);
                        unpack8(smem_x[t * xvec + 2 * i + 1], v + 8);
                        float part = 0.f;
#pragma unroll
                        for (int j = 0; j < 16; ++j) part = fmaf(w[j], v[j], part);
                        acc[t] = fmaf(part, s, acc[t]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < GEMV8_U; ++u) wa[u] = wb[u];
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const float a = warp_sum(acc[t]);
            if (lane == 0) {
                const size_t o = (size_t)t * y_stride + row;
                if (ymode == 0)
                    reinterpret_cast<bf16*>(y)[o] = f2bf(a + (bias ? bias[row] : 0.f));
                else if (ymode == 1)
                    reinterpret_cast<float*>(y)[o] += a;
                else
                    reinterpret_cast<float*>(y)[o] = a;
            }
        }
    }
}

#define GEMV8_INST(NT)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) gemv_i8_t##NT(                           \
        const int8_t* __restrict__ Wq, const __half* __restrict__ scales, int N, int K,         \
        int group, const bf16* __restrict__ x, int x_stride, void* __restrict__ y, int ymode,   \
        int y_stride, const float* __restrict__ bias) {                                         \
        gemv_i8_impl<NT>(Wq, scales, N, K, group, x, x_stride, y, ymode, y_stride, bias);       \
    }

GEMV8_INST(1)
GEMV8_INST(2)
GEMV8_INST(4)
GEMV8_INST(8)
