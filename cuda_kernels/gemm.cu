// Tensor-core GEMM for prefill: C[M, N] (op)= A[M, K] . W[N, K]^T, bf16 operands (A row-major
// activations, W the HF [out, in] weight), fp32 accumulation on the tensor cores (WMMA
// 16x16x16 bf16, i.e. mma.sync), a 3-stage cp.async pipeline through padded shared memory.
// mode 0: C bf16 = acc + bias[n] (bias may be null); 1: C fp32 += acc (residual add);
// mode 2: C fp32 = acc. M, N arbitrary (guarded); K a multiple of 8 (16-byte rows).
// Dynamic shared memory: STAGES * (BM + BN) * (BK + SKEW) * 2 bytes.
#include <mma.h>
#include "common.cuh"

using namespace nvcuda;

#define GEMM_BK 64
#define GEMM_SKEW 8
#define GEMM_LDS (GEMM_BK + GEMM_SKEW)
#define GEMM_STAGES 3

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <int BM, int BN, int WARPS_M, int WARPS_N>
__device__ __forceinline__ void gemm_impl(const bf16* __restrict__ A, int lda,
                                          const bf16* __restrict__ W, int ldw, int M, int N,
                                          int K, void* __restrict__ C, int ldc, int mode,
                                          const float* __restrict__ bias) {
    pdl_trigger();
    pdl_wait();
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    constexpr int FM = WTM / 16, FN = WTN / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* As = reinterpret_cast<bf16*>(smem_raw);
    bf16* Ws = As + GEMM_STAGES * BM * GEMM_LDS;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int ktiles = (K + GEMM_BK - 1) / GEMM_BK;

    auto load_tile = [&](int stage, int kt) {
        const int k0 = kt * GEMM_BK;
        bf16* as = As + stage * BM * GEMM_LDS;
        bf16* ws = Ws + stage * BN * GEMM_LDS;
        for (int c = tid; c < BM * (GEMM_BK / 8); c += THREADS) {
            const int r = c / (GEMM_BK / 8), kc = (c % (GEMM_BK / 8)) * 8;
            const bool ok = (m0 + r < M) && (k0 + kc < K);
            const bf16* src = ok ? A + (size_t)(m0 + r) * lda + k0 + kc : A;
            cp_async16(as + r * GEMM_LDS + kc, src, ok ? 16 : 0);
        }
        for (int c = tid; c < BN * (GEMM_BK / 8); c += THREADS) {
            const int r = c / (GEMM_BK / 8), kc = (c % (GEMM_BK / 8)) * 8;
            const bool ok = (n0 + r < N) && (k0 + kc < K);
            const bf16* src = ok ? W + (size_t)(n0 + r) * ldw + k0 + kc : W;
            cp_async16(ws + r * GEMM_LDS + kc, src, ok ? 16 : 0);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; ++s) {
        if (s < ktiles) load_tile(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<GEMM_STAGES - 2>();
        __syncthreads();
        const int nk = kt + GEMM_STAGES - 1;
        if (nk < ktiles) load_tile(nk % GEMM_STAGES, nk);
        cp_async_commit();
        const bf16* as = As + (kt % GEMM_STAGES) * BM * GEMM_LDS;
        const bf16* ws = Ws + (kt % GEMM_STAGES) * BN * GEMM_LDS;
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i)
                wmma::load_matrix_sync(fa[i], as + (wm * WTM + i * 16) * GEMM_LDS + kk, GEMM_LDS);
#pragma unroll
            for (int j = 0; j < FN; ++j)
                wmma::load_matrix_sync(fb[j], ws + (wn * WTN + j * 16) * GEMM_LDS + kk, GEMM_LDS);
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Epilogue through a 16x16 fp32 scratch tile per warp (reusing the pipeline's smem).
    float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            const int r = lane >> 1, c0 = (lane & 1) * 8;
            const int gm = m0 + wm * WTM + i * 16 + r;
            const int gn0 = n0 + wn * WTN + j * 16 + c0;
            if (gm < M) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int gn = gn0 + e;
                    if (gn < N) {
                        const float v = scratch[r * 16 + c0 + e];
                        const size_t o = (size_t)gm * ldc + gn;
                        if (mode == 0)
                            reinterpret_cast<bf16*>(C)[o] = f2bf(v + (bias ? bias[gn] : 0.f));
                        else if (mode == 1)
                            reinterpret_cast<float*>(C)[o] += v;
                        else
                            reinterpret_cast<float*>(C)[o] = v;
                    }
                }
            }
            __syncwarp();
        }
}

#define GEMM_ARGS                                                                            \
    const bf16 *__restrict__ A, int lda, const bf16 *__restrict__ W, int ldw, int M, int N, \
        int K, void *__restrict__ C, int ldc, int mode, const float *__restrict__ bias
#define GEMM_PASS A, lda, W, ldw, M, N, K, C, ldc, mode, bias

extern "C" __global__ void __launch_bounds__(256) gemm_128x128(GEMM_ARGS) {
    gemm_impl<128, 128, 2, 4>(GEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(128) gemm_64x128(GEMM_ARGS) {
    gemm_impl<64, 128, 2, 2>(GEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(128) gemm_64x64(GEMM_ARGS) {
    gemm_impl<64, 64, 2, 2>(GEMM_PASS);
}
