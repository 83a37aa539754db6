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
// MODE 1 (SwiGLU pair): W has 2N rows (gate rows, then up rows); y bf16 = silu(gate) * up.
// MODE 2 (q|k|v + RoPE + KV write, decode): N = (H + 2 KVH) * D / 2 row pairs; pair r is rows
//   (head * D + i, head * D + i + D/2) of the fused q|k|v weight (head = r / (D/2)), so one warp
//   holds both halves of a rotate-half pair: it adds the bias, rotates q and k at positions[t]
//   (neox order, inv_freq carries llama3 scaling), writes q to y (bf16, row stride y_stride) and
//   k, v straight into the paged cache at slots[t]. Saves the separate rope kernel.
// K must be a multiple of 8.
//
// Compiled once per row count: loader.py builds module gemv_t{NT} with -DGEMV_ROWS=NT
// (loader.VARIANTS), so the eight instantiations compile in parallel.
#include "common.cuh"

#define GEMV_WARPS 4
// 128-bit loads in flight per lane per row (two rows in the pair modes).
#define GEMV_U_PAIR 8
#define GEMV_U_SINGLE 16

struct RopeArgs {
    const int* positions;
    const int* slots;
    const float* inv_freq;
    bf16* k_cache;
    bf16* v_cache;
    int H, KVH, D;
};

template <int NT, int MODE>
__device__ __forceinline__ void gemv_impl(const bf16* __restrict__ W, int N, int K,
                                          const void* __restrict__ x, int xmode, int x_stride,
                                          const int* __restrict__ x_rows,
                                          const float* __restrict__ norm_w, float eps,
                                          void* __restrict__ y, int ymode, int y_stride,
                                          const float* __restrict__ bias,
                                          unsigned long long* __restrict__ argmax,
                                          const RopeArgs rope) {
    constexpr bool PAIR = MODE != 0;
    constexpr int GEMV_U = PAIR ? GEMV_U_PAIR : GEMV_U_SINGLE;
    extern __shared__ uint4 smem_x[];
    __shared__ float ss_red[GEMV_WARPS][NT];
    __shared__ unsigned long long red[GEMV_WARPS][NT];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nvec = K >> 3;
    const int row_step = gridDim.x * GEMV_WARPS;
    int row = blockIdx.x * GEMV_WARPS + warp;

    uint4 wa[GEMV_U], wb[GEMV_U];
    const int halfD = rope.D >> 1;
    auto row_a = [&](int r) { return MODE == 2 ? (r / halfD) * rope.D + r % halfD : r; };
    auto row_b = [&](int r) { return MODE == 2 ? row_a(r) + halfD : r + N; };
    auto load = [&](int r, int base) {
        const uint4* pa = reinterpret_cast<const uint4*>(W + (size_t)row_a(r) * K);
        const uint4* pb = reinterpret_cast<const uint4*>(W + (size_t)row_b(r) * K);
#pragma unroll
        for (int u = 0; u < GEMV_U; ++u) {
            const int i = base + u * 32 + lane;
            if (i < nvec) {
                wa[u] = ld_stream(pa + i);
                if (PAIR) wb[u] = ld_stream(pb + i);
            }
        }
    };
    // Start the first weight loads before staging x, so their latency overlaps it -- and,
    // under programmatic dependent launch, the previous kernel's tail (weights are read-only).
    pdl_trigger();
    if (row < N) load(row, 0);
    pdl_wait();

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
        // Fused RMSNorm, all threads: sum of squares of every token row (128-bit loads), one
        // barrier for all rows, then the normalized bf16 rows.
        float ss[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const int src = x_rows ? x_rows[t] : t;
            const float4* xr = reinterpret_cast<const float4*>(
                reinterpret_cast<const float*>(x) + (size_t)src * x_stride);
            float acc = 0.f;
            for (int i = threadIdx.x; i < K / 4; i += blockDim.x) {
                const float4 v = xr[i];
                acc += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            ss[t] = warp_sum(acc);
        }
        if (lane == 0)
#pragma unroll
            for (int t = 0; t < NT; ++t) ss_red[warp][t] = ss[t];
        __syncthreads();
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            float tot = 0.f;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; ++w) tot += ss_red[w][t];
            const float inv = rsqrtf(tot / K + eps);
            const int src = x_rows ? x_rows[t] : t;
            const float4* xr = reinterpret_cast<const float4*>(
                reinterpret_cast<const float*>(x) + (size_t)src * x_stride);
            const float4* nw = reinterpret_cast<const float4*>(norm_w);
            __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(xs + (size_t)t * K);
            for (int i = threadIdx.x; i < K / 4; i += blockDim.x) {
                const float4 v = xr[i], g = nw[i];
                dst[2 * i] = __floats2bfloat162_rn(v.x * inv * g.x, v.y * inv * g.y);
                dst[2 * i + 1] = __floats2bfloat162_rn(v.z * inv * g.z, v.w * inv * g.w);
            }
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
            if (MODE == 2) {
                const float b = warp_sum(accb[t]);
                if (lane == 0) {
                    const int ra = row_a(row), rb = ra + halfD;
                    const int head = row / halfD, i = row % halfD;
                    float xa = bf2f(f2bf(a + (bias ? bias[ra] : 0.f)));
                    float xb = bf2f(f2bf(b + (bias ? bias[rb] : 0.f)));
                    if (head < rope.H + rope.KVH) {
                        float sn, cs;
                        sincosf((float)rope.positions[t] * rope.inv_freq[i], &sn, &cs);
                        const float ya = xa * cs - xb * sn, yb = xb * cs + xa * sn;
                        xa = ya;
                        xb = yb;
                    }
                    const long long slot = rope.slots[t];
                    bf16* dst;
                    if (head < rope.H)
                        dst = reinterpret_cast<bf16*>(y) + (size_t)t * y_stride + (size_t)head * rope.D;
                    else if (head < rope.H + rope.KVH)
                        dst = rope.k_cache + slot * rope.KVH * rope.D + (size_t)(head - rope.H) * rope.D;
                    else
                        dst = rope.v_cache + slot * rope.KVH * rope.D +
                              (size_t)(head - rope.H - rope.KVH) * rope.D;
                    dst[i] = f2bf(xa);
                    dst[i + halfD] = f2bf(xb);
                }
            } else if (PAIR) {
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
        gemv_impl<NT, 0>(GEMV_PASS, RopeArgs{});                                                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) gemv_pair_t##NT(GEMV_ARGS) {             \
        gemv_impl<NT, 1>(GEMV_PASS, RopeArgs{});                                                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) gemv_qkv_rope_t##NT(                     \
        GEMV_ARGS, const int *positions, const int *slots, const float *inv_freq,               \
        bf16 *k_cache, bf16 *v_cache, int H, int KVH, int D) {                                  \
        gemv_impl<NT, 2>(GEMV_PASS, RopeArgs{positions, slots, inv_freq, k_cache, v_cache, H, KVH, D}); \
    }

#ifndef GEMV_ROWS
#error "compile with -DGEMV_ROWS=1..8 (cuda_kernels/loader.py VARIANTS)"
#endif
// One level of indirection so GEMV_ROWS expands before ## pastes it into the names.
#define GEMV_INST_ROWS(NT) GEMV_INST(NT)
GEMV_INST_ROWS(GEMV_ROWS)
