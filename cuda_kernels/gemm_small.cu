// Prefill GEMM tiles below 128 x 128 (see gemm.cuh).
#include "gemm.cuh"

GEMM_KERNEL(gemm_128x64, 128, 64, 2, 2, 4, 2)
GEMM_KERNEL(gemm_64x128, 64, 128, 2, 2, 4, 2)
GEMM_KERNEL(gemm_64x64, 64, 64, 2, 2, 4, 3)
