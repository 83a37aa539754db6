// Sampling on the device.
//   argmax_rows: greedy ids of fp32 logits rows (ties -> lowest id, as np.argmax).
//   argmax_finish: turn the packed keys of the lm_head GEMV's fused argmax into ids.
//   sample_rows: the whole host sampler (inference_service/sampling/sampler.py, whose module
//     docstring defines the semantics) for rows that are not plain greedy: repetition penalty,
//     logprobs (chosen + top-n), temperature, top-k, top-p, min-p and the draw with a uniform
//     u computed on the host (Philox keyed by (seed, step)), one block per row. Host side:
//     inference_service/backends/cuda/sampler.py (packing, launch, unpacking).
//
// sample_rows is deterministic: thresholds come from radix selects over an order-preserving
// 32-bit key, and every probability mass is a 64-bit fixed-point integer (w * 2^44, w =
// exp(s - max) in (0, 1]), so sums are exact whatever the order of the atomics. Where it can
// differ from numpy: numpy's top-p sums float32 probabilities sequentially (np.cumsum) and its
// float32 exp is not CUDA's expf, so a row whose top-p mass or draw target lies within ~1e-6
// of a boundary, or whose min-p threshold lies within an ulp of a probability, may keep /
// pick a neighbouring token; two tokens with different scaled logits but equal float32
// probabilities are ordered by logit here and by id in numpy. On random logits this shows up
// in a small fraction of top-p rows with thousands of kept tokens (tests/gpu/
// test_device_sampling.py checks that every difference is such a boundary case).
#include "common.cuh"

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// grid: R blocks; block: 1024 threads.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int stride,
                                       int* __restrict__ out_ids) {
    pdl_trigger();
    pdl_wait();
    __shared__ unsigned long long red[32];
    const float* row = logits + (size_t)blockIdx.x * stride;
    unsigned long long best = 0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const unsigned long long k = argmax_key(row[i], i);
        best = k > best ? k : best;
    }
    best = warp_max_u64(best);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0ull;
        best = warp_max_u64(best);
        if (threadIdx.x == 0) out_ids[blockIdx.x] = (int)(0xffffffffu - (uint32_t)(best & 0xffffffffull));
    }
}

// grid: 1; block: >= R.
extern "C" __global__ void argmax_finish(const unsigned long long* __restrict__ keys, int R,
                                         int* __restrict__ out_ids) {
    pdl_trigger();
    pdl_wait();
    for (int i = threadIdx.x; i < R; i += blockDim.x)
        out_ids[i] = (int)(0xffffffffu - (uint32_t)(keys[i] & 0xffffffffull));
}

// ---------------------------------------------------------------------------- sample_rows
// Per-row parameters: SAMPLE_PARAM_WORDS int32 words (backends/cuda/sampler.py packs them).
#define SAMPLE_PARAM_WORDS 12
#define SP_ROW 0        // logits row index
#define SP_NLOGPROBS 1  // -1: no logprobs; n >= 0: chosen token's + top-n
#define SP_TOPK 2       // 0: off (the host sends 0 for k >= vocab)
#define SP_HIST_OFF 3   // history ids: hist[off, off + len), only when the penalty is on
#define SP_HIST_LEN 4
#define SP_TEMP 6       // float bits; 0 = greedy
#define SP_TOPP 7       // float bits; 1 = off
#define SP_MINP 8       // float bits; 0 = off
#define SP_PENALTY 9    // float bits; 1 = off
#define SP_U 10         // double (words 10, 11): the uniform of the draw
// Per-row output: token, logprob bits, n, pad, top ids[20], top logprob bits[20].
#define SAMPLE_OUT_WORDS 44
#define SAMPLE_MAX_TOP 20
#define SAMPLE_THREADS 1024

typedef unsigned long long u64;

// Probability masses as fixed point: w in [0, 1] -> round(w * 2^44). A row sums to at most
// vocab * 2^44, so vocab < 2^20 keeps every sum in 64 bits (the host checks).
__device__ __forceinline__ u64 fixw(float w) { return __float2ull_rn(w * 17592186044416.0f); }

// float_key with -0 folded into +0 (numpy compares them equal).
__device__ __forceinline__ uint32_t ckey(float f) { return float_key(f == 0.f ? 0.f : f); }

__device__ __forceinline__ float key_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SampleSmem {
    u64 hist[2048];  // radix histogram: 2048 u64 masses or u32 counts
    u64 red[32];
    double redd[32];
    u64 sel_above, sel_group;
    uint32_t sel_digit;
    int token;
    int ntop;
    int top_id[SAMPLE_MAX_TOP];
    uint32_t top_key[SAMPLE_MAX_TOP];
};

struct Sel {
    uint32_t key;  // the selected key T
    u64 above;     // weight of participating elements with key > T
    u64 at_least;  // weight of participating elements with key >= T
};

// f(i, p[i]) for the elements of p[0, n) this thread owns (i = tid, tid + blockDim, ...; in
// 4-float groups when p is 16-byte aligned and n % 4 == 0): a fixed map, 16 loads in flight
// per thread. One block reads a whole row, so the pass is bound by bytes in flight.
template <typename F>
__device__ __forceinline__ void for_each(const float* p, int n, F f) {
    const int tid = threadIdx.x, nt = blockDim.x;
    if ((((uintptr_t)p & 15) | (n & 3)) == 0) {
        const float4* p4 = reinterpret_cast<const float4*>(p);
        const int n4 = n >> 2;
        int i = tid;
        for (; i + 3 * nt < n4; i += 4 * nt) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = p4[i + u * nt];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int b = 4 * (i + u * nt);
                f(b, v[u].x);
                f(b + 1, v[u].y);
                f(b + 2, v[u].z);
                f(b + 3, v[u].w);
            }
        }
        for (; i < n4; i += nt) {
            const float4 v = p4[i];
            f(4 * i, v.x);
            f(4 * i + 1, v.y);
            f(4 * i + 2, v.z);
            f(4 * i + 3, v.w);
        }
    } else {
        int i = tid;
        for (; i + 7 * nt < n; i += 8 * nt) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = p[i + u * nt];
#pragma unroll
            for (int u = 0; u < 8; ++u) f(i + u * nt, v[u]);
        }
        for (; i < n; i += nt) f(i, p[i]);
    }
}

// f(i, p[i]) in ascending i over this thread's contiguous share of p[0, n) (thread t's share
// precedes thread t + 1's), until f returns true.
template <typename F>
__device__ __forceinline__ void for_chunk(const float* p, int n, F f) {
    const int tid = threadIdx.x, nt = blockDim.x;
    if ((((uintptr_t)p & 15) | (n & 3)) == 0) {
        const float4* p4 = reinterpret_cast<const float4*>(p);
        const int n4 = n >> 2, c4 = (n4 + nt - 1) / nt;
        const int lo = min(tid * c4, n4), hi = min(lo + c4, n4);
        int j = lo;
        for (; j + 4 <= hi; j += 4) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = p4[j + u];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int b = 4 * (j + u);
                if (f(b, v[u].x) || f(b + 1, v[u].y) || f(b + 2, v[u].z) || f(b + 3, v[u].w)) return;
            }
        }
        for (; j < hi; ++j) {
            const float4 v = p4[j];
            if (f(4 * j, v.x) || f(4 * j + 1, v.y) || f(4 * j + 2, v.z) || f(4 * j + 3, v.w)) return;
        }
    } else {
        const int c = (n + nt - 1) / nt, lo = min(tid * c, n), hi = min(lo + c, n);
        for (int i = lo; i < hi; ++i)
            if (f(i, p[i])) return;
    }
}

__device__ __forceinline__ u64 block_sum_u64(u64 v, SampleSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sm.red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sm.red[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ u64 block_max_u64(u64 v, SampleSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max_u64(v);
    __syncthreads();
    if (lane == 0) sm.red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sm.red[lane] : 0ull;
    return warp_max_u64(v);
}

// Fixed reduction tree over a fixed element-to-thread map: the same bits every run.
__device__ __forceinline__ double block_sum_f64(double v, SampleSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sm.redd[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sm.redd[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive prefix sum over threads in thread order; *total gets the block's sum.
__device__ __forceinline__ u64 block_excl_scan_u64(u64 v, u64* total, SampleSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) sm.red[warp] = incl;
    __syncthreads();
    u64 w = lane < (int)(blockDim.x >> 5) ? sm.red[lane] : 0ull, wincl = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, wincl, o);
        if (lane >= o) wincl += t;
    }
    const u64 before_warp = __shfl_sync(0xffffffffu, wincl - w, warp);
    *total = __shfl_sync(0xffffffffu, wincl, 31);
    return before_warp + incl - v;
}

// Radix histograms in sm.hist: 2048 bins of counts (u32) or of fixed-point masses. A mass
// bin is two u32 words, the low half plus a high half that also takes the carries (an add
// whose low word wraps adds 1 there): exact and order-independent with native 32-bit shared
// atomics only (a 64-bit shared atomicAdd is a compare-and-swap loop, slow under collisions).
#define RADIX_BINS0 2048
#define RADIX_SHIFT0 21  // first digit: key bits 31..21 (sign, exponent, 2 mantissa bits)

template <bool MASS>
__device__ __forceinline__ void hist_zero(SampleSmem& sm, int nb) {
    uint32_t* h = reinterpret_cast<uint32_t*>(sm.hist);
    for (int i = threadIdx.x; i < nb; i += blockDim.x) {
        h[i] = 0u;
        if (MASS) h[RADIX_BINS0 + i] = 0u;
    }
}

template <bool MASS>
__device__ __forceinline__ void hist_add(SampleSmem& sm, uint32_t bin, u64 wt) {
    uint32_t* h = reinterpret_cast<uint32_t*>(sm.hist);
    if (!MASS) {
        atomicAdd(&h[bin], (uint32_t)wt);
        return;
    }
    const uint32_t lo = (uint32_t)wt;
    const uint32_t old = atomicAdd(&h[bin], lo);
    const uint32_t hi = (uint32_t)(wt >> 32) + (old > 0xffffffffu - lo ? 1u : 0u);
    if (hi) atomicAdd(&h[RADIX_BINS0 + bin], hi);
}

template <bool MASS>
__device__ __forceinline__ u64 hist_get(const SampleSmem& sm, int bin) {
    const uint32_t* h = reinterpret_cast<const uint32_t*>(sm.hist);
    return MASS ? ((u64)h[RADIX_BINS0 + bin] << 32) | h[bin] : (u64)h[bin];
}

// An element's weight in a select: 1 (counts) or its fixed-point mass, a function of its key
// (the float bits of its weight w).
template <bool MASS>
__device__ __forceinline__ u64 key_weight(uint32_t key) {
    return MASS ? fixw(__uint_as_float(key)) : 1ull;
}

// The key T with weight(key > T) < X <= weight(key >= T) over the elements of p[0, n) that
// get(i, p[i], key) accepts: the X-th largest key when the weights are counts, the top-p
// threshold when they are masses (MASS: weight = fixw(float of key)). Needs 1 <= X <= the
// total weight and blockDim.x == SAMPLE_THREADS. Digits of 11, 11 and 10 bits: 3 passes; the
// wide first digit spreads real logits / weights over many bins, so few atomics collide.
// hist0_ready: the caller's own pass already built the first level's histogram (hist_zero +
// hist_add of every accepted element into bin key >> RADIX_SHIFT0), saving that pass.
template <bool MASS, typename Get>
__device__ Sel radix_select(const float* p, int n, u64 X, Get get, SampleSmem& sm,
                            bool hist0_ready = false) {
    uint32_t prefix = 0, mask = 0;
    u64 above = 0, group = 0;
#pragma unroll 1
    for (int lv = 0; lv < 3; ++lv) {
        const int shift = lv == 0 ? RADIX_SHIFT0 : (lv == 1 ? 10 : 0);
        const int nb = lv == 2 ? 1024 : RADIX_BINS0;
        const uint32_t dmask = (uint32_t)nb - 1u;
        __syncthreads();  // the previous level's readers are done with hist / sel_*
        if (threadIdx.x == 0) {  // unreachable fallback: keep `above`, empty group
            sm.sel_digit = 0u;
            sm.sel_above = above;
            sm.sel_group = 0ull;
        }
        if (lv > 0 || !hist0_ready) {
            hist_zero<MASS>(sm, nb);
            __syncthreads();
            for_each(p, n, [&](int i, float v) {
                uint32_t key;
                if (get(i, v, key) && (key & mask) == prefix) {
                    const u64 wt = key_weight<MASS>(key);
                    if (wt != 0ull) hist_add<MASS>(sm, (key >> shift) & dmask, wt);
                }
            });
            __syncthreads();
        }
        // Thread t owns the bpt bins just below those of thread t - 1 (thread 0: the top ones),
        // so an exclusive scan gives each thread the weight of all larger bins.
        const int bpt = nb / SAMPLE_THREADS;
        const int top_bin = nb - 1 - (int)threadIdx.x * bpt;
        u64 s = 0;
        for (int j = 0; j < bpt; ++j) s += hist_get<MASS>(sm, top_bin - j);
        u64 tot;
        u64 cum = above + block_excl_scan_u64(s, &tot, sm);
        for (int j = 0; j < bpt; ++j) {
            const u64 b = hist_get<MASS>(sm, top_bin - j);
            if (cum < X && cum + b >= X) {  // exactly one bin crosses X
                sm.sel_digit = (uint32_t)(top_bin - j);
                sm.sel_above = cum;
                sm.sel_group = b;
            }
            cum += b;
        }
        __syncthreads();
        prefix |= sm.sel_digit << shift;
        mask |= dmask << shift;
        above = sm.sel_above;
        group = sm.sel_group;
    }
    __syncthreads();
    return Sel{prefix, above, above + group};
}

// grid: rows to sample; block: SAMPLE_THREADS. logits rows have `vocab` floats; the row of
// block b is params[b * SAMPLE_PARAM_WORDS + SP_ROW]. Penalized logits are written back into
// that row. scratch: [gridDim.x][vocab] floats (the row's kept weights; first the history
// bitmap). out: [gridDim.x][SAMPLE_OUT_WORDS].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)
sample_rows(float* __restrict__ logits, int vocab, const int* __restrict__ params,
            const int* __restrict__ hist, float* __restrict__ scratch, int* __restrict__ out) {
    pdl_trigger();
    pdl_wait();
    __shared__ SampleSmem sm;
    const int tid = threadIdx.x, nthr = blockDim.x;
    const int* prm = params + (size_t)blockIdx.x * SAMPLE_PARAM_WORDS;
    float* x = logits + (size_t)prm[SP_ROW] * vocab;
    float* w = scratch + (size_t)blockIdx.x * vocab;
    int* o = out + (size_t)blockIdx.x * SAMPLE_OUT_WORDS;
    const int nlp = prm[SP_NLOGPROBS], topk = prm[SP_TOPK];
    const float temp = __int_as_float(prm[SP_TEMP]), top_p = __int_as_float(prm[SP_TOPP]);
    const float min_p = __int_as_float(prm[SP_MINP]), pen = __int_as_float(prm[SP_PENALTY]);
    const double u = *reinterpret_cast<const double*>(prm + SP_U);
    auto by_logit = [](int, float v, uint32_t& key) {
        key = ckey(v);
        return true;
    };
    const bool sampled = temp != 0.f, use_topk = sampled && topk > 0 && topk < vocab;

    // 1. Repetition penalty, once per distinct history id (a bitmap in the scratch row).
    const int hlen = prm[SP_HIST_LEN];
    if (pen != 1.f && hlen > 0) {
        uint32_t* bits = reinterpret_cast<uint32_t*>(w);
        for (int i = tid; i < (vocab + 31) / 32; i += nthr) bits[i] = 0u;
        __syncthreads();
        const int* h = hist + prm[SP_HIST_OFF];
        for (int j = tid; j < hlen; j += nthr) {
            const int id = h[j];
            if (id < 0 || id >= vocab) continue;
            const uint32_t bit = 1u << (id & 31);
            if (!(atomicOr(&bits[id >> 5], bit) & bit)) {
                const float v = x[id];
                x[id] = v > 0.f ? v / pen : v * pen;
            }
        }
        __syncthreads();
    }

    // 2. Max (and greedy argmax, ties -> lowest id) of the penalized logits; when a count
    // select over the logits follows (top-n, top-k), its first histogram in the same pass.
    bool xhist = nlp > 0 || use_topk;
    if (xhist) {
        hist_zero<false>(sm, RADIX_BINS0);
        __syncthreads();
    }
    u64 best = 0ull;
    for_each(x, vocab, [&](int i, float v) {
        const uint32_t key = ckey(v);
        const u64 k = ((u64)key << 32) | (u64)(0xffffffffu - (uint32_t)i);
        best = k > best ? k : best;
        if (xhist) hist_add<false>(sm, key >> RADIX_SHIFT0, 1ull);
    });
    best = block_max_u64(best, sm);
    const float xmax = key_float((uint32_t)(best >> 32));
    int token = (int)(0xffffffffu - (uint32_t)(best & 0xffffffffull));

    // 3. Logprobs: log-softmax of the penalized logits; top-n by a count radix select.
    float log_z = 0.f;
    if (nlp >= 0) {
        double se = 0.0;
        for_each(x, vocab, [&](int, float v) { se += (double)expf(v - xmax); });
        log_z = logf((float)block_sum_f64(se, sm));
    }
    if (nlp > 0) {
        const int n = min(nlp, min(vocab, SAMPLE_MAX_TOP));
        const Sel s = radix_select<false>(x, vocab, (u64)n, by_logit, sm, xhist);
        xhist = false;
        uint32_t id_cut = 0xffffffffu;  // ties at the threshold: the lowest ids
        if (s.at_least > (u64)n) {
            const uint32_t T = s.key;
            auto tie_ids = [T](int i, float v, uint32_t& key) {
                key = ~(uint32_t)i;
                return ckey(v) == T;
            };
            id_cut = ~radix_select<false>(x, vocab, (u64)n - s.above, tie_ids, sm).key;
        }
        if (tid == 0) sm.ntop = 0;
        __syncthreads();
        for_each(x, vocab, [&](int i, float v) {
            const uint32_t k = ckey(v);
            if (k > s.key || (k == s.key && (uint32_t)i <= id_cut)) {
                const int slot = atomicAdd(&sm.ntop, 1);
                if (slot < SAMPLE_MAX_TOP) {
                    sm.top_id[slot] = i;
                    sm.top_key[slot] = k;
                }
            }
        });
        __syncthreads();
        if (tid == 0) {  // n <= 20: insertion sort, most likely first, ties by id
            const int m = min(sm.ntop, n);
            for (int a = 1; a < m; ++a) {
                const int id = sm.top_id[a];
                const uint32_t k = sm.top_key[a];
                int b = a - 1;
                while (b >= 0 && (sm.top_key[b] < k || (sm.top_key[b] == k && sm.top_id[b] > id))) {
                    sm.top_id[b + 1] = sm.top_id[b];
                    sm.top_key[b + 1] = sm.top_key[b];
                    --b;
                }
                sm.top_id[b + 1] = id;
                sm.top_key[b + 1] = k;
            }
            o[2] = m;
            for (int a = 0; a < m; ++a) {
                o[4 + a] = sm.top_id[a];
                o[4 + SAMPLE_MAX_TOP + a] = __float_as_int((key_float(sm.top_key[a]) - xmax) - log_z);
            }
        }
    } else if (tid == 0) {
        o[2] = 0;
    }

    if (sampled) {
        // 4. Temperature; top-k threshold on the logits (division keeps the order).
        const float ms = xmax / temp;
        float kth = -INFINITY;
        if (use_topk)
            kth = key_float(radix_select<false>(x, vocab, (u64)topk, by_logit, sm, xhist).key) / temp;
        // 5. Kept weights w = exp(s - max) (0 where top-k drops), their fixed-point total and,
        // for top-p, the first histogram of their masses.
        const bool use_topp = top_p < 1.f;
        if (use_topp) {
            __syncthreads();  // a select above may still read hist
            hist_zero<true>(sm, RADIX_BINS0);
            __syncthreads();
        }
        u64 zsum = 0;
        for_each(x, vocab, [&](int i, float v) {
            const float s = v / temp;
            const float wi = s >= kth ? expf(s - ms) : 0.f;
            w[i] = wi;
            const u64 f = fixw(wi);
            zsum += f;
            if (use_topp && f != 0ull) hist_add<true>(sm, __float_as_uint(wi) >> RADIX_SHIFT0, f);
        });
        const u64 z = block_sum_u64(zsum, sm);  // its barriers order the w writes before reads
        // 6. Top-p: keep key(w) > pT, and among key(w) == pT the ids <= p_cut (numpy's stable
        // most-likely-first order keeps a prefix of each tie group).
        uint32_t pT = 0u, p_cut = 0xffffffffu;
        if (use_topp) {
            u64 X = (u64)ceil((double)top_p * (double)z);
            X = X < 1ull ? 1ull : (X > z ? z : X);
            auto by_weight = [](int, float v, uint32_t& key) {
                key = __float_as_uint(v);
                return true;
            };
            const Sel s = radix_select<true>(w, vocab, X, by_weight, sm, true);
            pT = s.key;
            const u64 wt = fixw(__uint_as_float(pT));  // > 0: the crossing group has mass
            const u64 g = (s.at_least - s.above) / wt;
            const u64 c = (X - s.above + wt - 1) / wt;  // group members whose mass before < X
            if (c < g) {
                auto tie_ids = [pT](int i, float v, uint32_t& key) {
                    key = ~(uint32_t)i;
                    return __float_as_uint(v) == pT;
                };
                p_cut = ~radix_select<false>(w, vocab, c, tie_ids, sm).key;
            }
        }
        // 7. Draw: the first id (ascending) whose cumulative kept weight exceeds u * total.
        // Each thread owns a contiguous id range; an exclusive scan finds the owner.
        auto kept = [=](int i, float v) -> u64 {
            const uint32_t kb = __float_as_uint(v);
            const bool keep = (kb > pT || (kb == pT && (uint32_t)i <= p_cut)) && v >= min_p;
            return keep ? fixw(v) : 0ull;
        };
        u64 mine = 0;
        for_chunk(w, vocab, [&](int i, float v) {
            mine += kept(i, v);
            return false;
        });
        if (tid == 0) sm.token = token;  // replaced by the owner below (one always exists)
        u64 total;
        const u64 excl = block_excl_scan_u64(mine, &total, sm);
        u64 target = (u64)(u * (double)total);  // cum > u*total  <=>  cum > floor(u*total)
        if (target >= total) target = total - 1;  // u*total rounded up to total
        if (excl <= target && target < excl + mine) {
            u64 cum = excl;
            for_chunk(w, vocab, [&](int i, float v) {
                cum += kept(i, v);
                if (cum > target) {
                    sm.token = i;
                    return true;
                }
                return false;
            });
        }
        __syncthreads();
        token = sm.token;
    }
    if (tid == 0) {
        o[0] = token;
        o[1] = nlp >= 0 ? __float_as_int((x[token] - xmax) - log_z) : 0;
    }
}
