// Decode GEMV for 5..8 token rows (see gemv.cuh); a separate file so the two compile in
// parallel on a cold start.
#include "gemv.cuh"

GEMV_INST(5)
GEMV_INST(6)
GEMV_INST(7)
GEMV_INST(8)
