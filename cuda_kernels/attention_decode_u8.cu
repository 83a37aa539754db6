// paged_decode_d*_u8: see attention_decode.cuh (one file per U so they compile in parallel).
#include "attention_decode.cuh"
DEC_INST_ALL_D(8)
