// Prefill GEMM tiles of 128 x 128 and up (see gemm.cuh); the tiles are split over two files
// so a cold start compiles them in parallel.
#include "gemm.cuh"

GEMM_KERNEL(gemm_128x256, 128, 256, 2, 4, 4, 1)
GEMM_KERNEL(gemm_128x128, 128, 128, 2, 2, 3, 2)
GEMM_KERNEL(gemm_128x128_w8, 128, 128, 2, 4, 3, 2)
