// Decode GEMV for 1..4 token rows (see gemv.cuh).
#include "gemv.cuh"

GEMV_INST(1)
GEMV_INST(2)
GEMV_INST(3)
GEMV_INST(4)
