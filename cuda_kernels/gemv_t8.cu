// Decode GEMV for 8 token row(s) (see gemv.cuh): one file per row count, so a cold start
// compiles them in parallel.
#include "gemv.cuh"

GEMV_INST(8)
