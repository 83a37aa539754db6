// Decode GEMV: y[t, n] = sum_k x[t, k] * W[n, k] for NT <= 8 token rows, bf16 weights [N, K]
// row-major (HF [out, in]), fp32 accumulation. Each warp owns one output row at a time and
// streams it with 128-bit loads, U vectors in flight per lane; blocks stride over rows so the
// grid can be sized to fill every SM. The NT input rows are staged once per block in shared
// memory as bf16 (dynamic shared memory: NT * K * 2 bytes).
//
// Input (xmode):  0: x bf16 rows [.., x_stride]
//                 1: x fp32 residual rows, RMS-normalized here with norm_w (fused RMSNorm)
//                 rows are x_rows[t] when x_rows != null, else t.
// Output (ymode): 0: y bf16 [t * y_stride + n] = acc + bias[n]  (bias may be null)
//                 1: y fp32 [t * y_stride + n] += acc           (residual add)
//                 2: y fp32 [t * y_stride + n]  = acc; with argmax != null also
//                    atomicMax(argmax[t], key(acc, n)) -- greedy sampling fused into lm_head
// PAIR (SwiGLU):  W has 2N rows (gate rows, then up rows); y bf16 = silu(gate) * up.
// K must be a multiple of 8.
#pragma once
#include "common.cuh"

#define GEMV_WARPS 4
#define GEMV_U 8

template <int NT, bool PAIR>
__device__ __forceinline__ void gemv_impl(const bf16* __restrict__ W, int N, int K,
                                          const void* __restrict__ x, int xmode, int x_stride,
                                          const int* __restrict__ x_rows,
                                          const float* __restrict__ norm_w, float eps,
                                          void* __restrict__ y, int ymode, int y_stride,
                                          const float* __restrict__ bias,
                                          unsigned long long* __restrict__ argmax) {
    extern __shared__ uint4 smem_x[];
    __shared__ unsigned long long red[GEMV_WARPS][NT];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nvec = K >> 3;
    const int row_step = gridDim.x * GEMV_WARPS;
    int row = blockIdx.x * GEMV_WARPS + warp;

    uint4 wa[GEMV_U], wb[GEMV_U];
    auto load = [&](int r, int base) {
        const uint4* pa = reinterpret_cast<const uint4*>(W + (size_t)r * K);
        const uint4* pb = reinterpret_cast<const uint4*>(W + (size_t)(r + N) * K);
#pragma unroll
        for (int u = 0; u < GEMV_U; ++u) {
            const int i = base + u * 32 + lane;
            if (i < nvec) {
                wa[u] = ld_stream(pa + i);
                if (PAIR) wb[u] = ld_stream(pb + i);
            }
        }
    };
    // Start the first weight loads before staging x, so their latency overlaps it.
    if (row < N) load(row, 0);

    // Stage the NT input rows as bf16 in shared memory.
    bf16* xs = reinterpret_cast<bf16*>(smem_x);
    if (xmode == 0) {
        for (int t = 0; t < NT; ++t) {
            const int src = x_rows ? x_rows[t] : t;
            const uint4* xr = reinterpret_cast<const uint4*>(
                reinterpret_cast<const bf16*>(x) + (size_t)src * x_stride);
            for (int i = threadIdx.x; i < nvec; i += blockDim.x) smem_x[t * nvec + i] = xr[i];
        }
    } else {
        // One warp per token row: sum of squares, then the normalized bf16 row.
        for (int t = warp; t < NT; t += GEMV_WARPS) {
            const int src = x_rows ? x_rows[t] : t;
            const float* xr = reinterpret_cast<const float*>(x) + (size_t)src * x_stride;
            float ss = 0.f;
            for (int i = lane; i < K; i += 32) ss += xr[i] * xr[i];
            const float inv = rsqrtf(warp_sum(ss) / K + eps);
            for (int i = lane; i < K; i += 32) xs[t * K + i] = f2bf(xr[i] * inv * norm_w[i]);
        }
    }
    __syncthreads();

    unsigned long long best[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) best[t] = 0ull;

    bool prefetched = true;
    for (; row < N; row += row_step) {
        float acc[NT], accb[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = accb[t] = 0.f;
        for (int base = 0; base < nvec; base += 32 * GEMV_U) {
            if (!prefetched) load(row, base);
            prefetched = false;
#pragma unroll
            for (int u = 0; u < GEMV_U; ++u) {
                const int i = base + u * 32 + lane;
                if (i < nvec) {
                    float w[8], v[8];
                    unpack8(wa[u], w);
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        unpack8(smem_x[t * nvec + i], v);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[t] = fmaf(w[j], v[j], acc[t]);
                    }
                    if (PAIR) {
                        unpack8(wb[u], w);
#pragma unroll
                        for (int t = 0; t < NT; ++t) {
                            unpack8(smem_x[t * nvec + i], v);
#pragma unroll
                            for (int j = 0; j < 8; ++j) accb[t] = fmaf(w[j], v[j], accb[t]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const float a = warp_sum(acc[t]);
            if (PAIR) {
                const float b = warp_sum(accb[t]);
                if (lane == 0) {
                    const float g = bf2f(f2bf(a)), u = bf2f(f2bf(b));
                    reinterpret_cast<bf16*>(y)[(size_t)t * y_stride + row] = f2bf(silu(g) * u);
                }
            } else if (lane == 0) {
                const size_t o = (size_t)t * y_stride + row;
                if (ymode == 0) {
                    reinterpret_cast<bf16*>(y)[o] = f2bf(a + (bias ? bias[row] : 0.f));
                } else if (ymode == 1) {
                    reinterpret_cast<float*>(y)[o] += a;
                } else {
                    reinterpret_cast<float*>(y)[o] = a;
                    const unsigned long long k = argmax_key(a, row);
                    best[t] = k > best[t] ? k : best[t];
                }
            }
        }
    }
    if (argmax != nullptr && ymode == 2 && !PAIR) {
        if (lane == 0)
#pragma unroll
            for (int t = 0; t < NT; ++t) red[warp][t] = best[t];
        __syncthreads();
        if (threadIdx.x < NT) {
            unsigned long long m = 0ull;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; ++w) m = red[w][threadIdx.x] > m ? red[w][threadIdx.x] : m;
            if (m) atomicMax(argmax + threadIdx.x, m);
        }
    }
}

#define GEMV_ARGS                                                                               \
    const bf16 *__restrict__ W, int N, int K, const void *__restrict__ x, int xmode, int x_stride, \
        const int *__restrict__ x_rows, const float *__restrict__ norm_w, float eps,               \
        void *__restrict__ y, int ymode, int y_stride, const float *__restrict__ bias,             \
        unsigned long long *__restrict__ argmax
#define GEMV_PASS W, N, K, x, xmode, x_stride, x_rows, norm_w, eps, y, ymode, y_stride, bias, argmax

#define GEMV_INST(NT)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) gemv_t##NT(GEMV_ARGS) {                  \
        gemv_impl<NT, false>(GEMV_PASS);                                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) gemv_pair_t##NT(GEMV_ARGS) {             \
        gemv_impl<NT, true>(GEMV_PASS);                                                         \
    }

