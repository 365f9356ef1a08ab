// Split-KV decoding (flash-decoding) for attention_with_kvcache on CUDA cores, for float32 caches (16-bit
// caches take decode_mma.cu): a few query rows against a long cache.
//
// flash_decode: one block per (split, kv head and slab of ROWS rows, sequence); a split is a share of the band
// of keys that some row may see (key_begin, key_end in mask.cuh). A kv head's rows are the GQA group's query
// heads times seqlen_q, ROWS a block (decode_slab), so each key and value row read from the cache serves all of
// a block's rows.
// Per tile of 128 keys of the split:
//   scores    thread j: key j's dot products with every row (16-byte loads of its row, found through
//             the page table), score and visibility from mask.cuh
//   softmax   warp w: the running max and sum of rows w, w + 4, ... (OnlineSoftmax); probabilities in place
//   o += p v  thread t: 8-column chunks of o over the tile's keys; a masked probability (-0.0) skips its
//             value, so data a row cannot see never reaches it
// With one split the block writes out and lse; otherwise each split writes its normalised o and its lse in
// float32, and the last split of a (sequence, kv head, slab) to finish merges them (decode.cuh). kvcache_append
// writes a call's new rows into the cache before (and applies the rotary embedding to them and to q).
#include "decode.cuh"
#include "softmax.cuh"

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Row x rotated into out at `position` (DecodeParams' rotary embedding; the block's threads over its columns):
// a pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin), each product and the sum rounded once in the
// accumulation type (no fused multiply-add: the NumPy backend's float32 operations give the same bits), the
// result once to the dtype; the columns past rotary_dim are copied.
template <typename T>
__device__ __forceinline__ void rotate_row(const DecodeParams& p, const T* x, T* out, int position) {
    using A = typename Acc<T>::type;
    const int half = p.rotary_dim / 2;
    const T* cos = static_cast<const T*>(p.rotary_cos) + (i64)position * half;
    const T* sin = static_cast<const T*>(p.rotary_sin) + (i64)position * half;
    for (int d = threadIdx.x; d < p.fwd.headdim; d += blockDim.x) {
        if (d >= p.rotary_dim) {
            out[d] = x[d];
            continue;
        }
        // column d pairs with `partner`: d is the pair's first (x1) or second (x2)
        const bool first = p.rotary_interleaved ? d % 2 == 0 : d < half;
        const int i = p.rotary_interleaved ? d / 2 : d % half;
        const int partner = p.rotary_interleaved ? d ^ 1 : (first ? d + half : d - half);
        const A own = mul_rn(to_acc(x[d]), to_acc(cos[i])), other = mul_rn(to_acc(x[partner]), to_acc(sin[i]));
        out[d] = from_acc<T>(first ? add_rn(own, -other) : add_rn(own, other));
    }
}

// The in-place append, and the rotary embedding where it is asked: one block per (new row, kv head, sequence)
// writes that row of k_new (rotated) and of v_new to position cache_seqlens[b] + row of the caches; with the
// rotary embedding, the blocks of grid rows nheads_kv ... take q's rows of head blockIdx.y - nheads_kv.
template <typename T> __global__ void __launch_bounds__(128) kvcache_append(const __grid_constant__ DecodeParams p) {
    const FwdParams& f = p.fwd;
    const int i = blockIdx.x, b = blockIdx.z, nheads_kv = f.nheads / f.group;
    const int start = p.cache_seqlens ? p.cache_seqlens[b] : p.cache_seqlen;
    if (int(blockIdx.y) >= nheads_kv) {
        const int h = blockIdx.y - nheads_kv;
        if (i < f.seqlen_q)
            rotate_row<T>(p, static_cast<const T*>(f.q) + b * f.q_st.b + (i64)i * f.q_st.s + h * f.q_st.h,
                          static_cast<T*>(p.q_rot) + (((i64)b * f.seqlen_q + i) * f.nheads + h) * f.headdim,
                          start + i * p.q_step);
        return;
    }
    if (i >= p.seqlen_new) return;
    const int hk = blockIdx.y, key = start + i;
    T* k = static_cast<T*>(const_cast<void*>(f.k)) + cache_row(p, f.k_st, b, key) + hk * f.k_st.h;
    T* v = static_cast<T*>(const_cast<void*>(f.v)) + cache_row(p, f.v_st, b, key) + hk * f.v_st.h;
    const T* kn = static_cast<const T*>(p.k_new) + b * p.kn_st.b + (i64)i * p.kn_st.s + hk * p.kn_st.h;
    const T* vn = static_cast<const T*>(p.v_new) + b * p.vn_st.b + (i64)i * p.vn_st.s + hk * p.vn_st.h;
    if (p.rotary_cos) {
        rotate_row<T>(p, kn, k, key);
    } else {
        for (int d = threadIdx.x; d < f.headdim; d += blockDim.x) k[d] = kn[d];
    }
    for (int d = threadIdx.x; d < f.headdim; d += blockDim.x) v[d] = vn[d];
}

__device__ __forceinline__ void load16(const void* p, unsigned (&w)[4]) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}

// Eight consecutive elements from a 16-byte aligned address, in float.
template <typename T> __device__ __forceinline__ void load8(const T* src, float (&x)[8]) {
    if constexpr (sizeof(T) == 2) {
        unsigned w[4];
        load16(src, w);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            T lo, hi;
            lo.bits = w[i] & 0xffffu;
            hi.bits = w[i] >> 16;
            x[2 * i] = to_acc(lo);
            x[2 * i + 1] = to_acc(hi);
        }
    } else {
        unsigned a[4], b[4];
        load16(src, a);
        load16(src + 4, b);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            x[i] = __uint_as_float(a[i]);
            x[4 + i] = __uint_as_float(b[i]);
        }
    }
}

template <typename T, int D_TILE, int ROWS, typename Var>
__global__ void __launch_bounds__(128) flash_decode(const __grid_constant__ DecodeParams p) {
    constexpr int THREADS = 128, BLOCK_N = 128, WARPS = THREADS / 32, CHUNKS = D_TILE / 8;
    constexpr int PAIRS = (ROWS * CHUNKS + THREADS - 1) / THREADS;  // (row, chunk) pieces of o per thread
    static_assert(D_TILE % 8 == 0, "tile shape");
    const FwdParams& f = p.fwd;

    __shared__ float sq[ROWS][D_TILE];
    __shared__ float sp[ROWS][BLOCK_N + 1];  // scores, then probabilities; padded against bank conflicts
    __shared__ i64 s_vrow[BLOCK_N];          // offset of each key's value row
    __shared__ float s_m[ROWS], s_l[ROWS], s_alpha[ROWS];  // running max and sum of each row, this tile's factor

    const int split = blockIdx.x, b = blockIdx.z, tid = threadIdx.x, lane = tid % 32;
    const DecodeSlab slab = decode_slab<ROWS>(f);
    const int hk = slab.hk, rows = slab.rows, seqlen_k = decode_seqlen(p, b), first_row = decode_first_row(p, b);
    const int begin = Var(f, b, hk * f.group, seqlen_k).key_begin(0) + split * p.keys_per_split;
    const int end = min(seqlen_k, begin + p.keys_per_split);
    const float scale_log2 = float(f.scale) * float(LOG2E);
    auto head = [&](int r) { return slab.head(f, r); };

    for (int idx = tid; idx < ROWS * D_TILE; idx += THREADS) {
        const int r = idx / D_TILE, d = idx % D_TILE;
        sq[r][d] = r < rows && d < f.headdim
                       ? to_acc(static_cast<const T*>(f.q)[b * f.q_st.b + (i64)slab.query(f, r) * f.q_st.s +
                                                           head(r) * f.q_st.h + d])
                       : 0.f;
    }
    if (tid < ROWS) {
        s_m[tid] = neg_inf<float>();
        s_l[tid] = 0.f;
    }
    __syncthreads();
    auto row_stats = [&](int r) {
        OnlineSoftmax<float> stats;
        stats.m = s_m[r];
        stats.l = s_l[r];
        return stats;
    };

    float o[PAIRS][8];
#pragma unroll
    for (int q = 0; q < PAIRS; ++q)
#pragma unroll
        for (int e = 0; e < 8; ++e) o[q][e] = 0.f;

    for (int n0 = begin; n0 < end; n0 += BLOCK_N) {
        // ---- scores: thread tid takes key n0 + tid
        const int key = n0 + tid;
        if (key < end) {
            const T* k_row = static_cast<const T*>(f.k) + cache_row(p, f.k_st, b, first_row + key) + hk * f.k_st.h;
            s_vrow[tid] = cache_row(p, f.v_st, b, first_row + key) + hk * f.v_st.h;
            float dot[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) dot[r] = 0.f;
#pragma unroll 8  // eight 16-byte loads in flight per thread; many blocks per multiprocessor do the rest
            for (int c = 0; c < CHUNKS; ++c) {
                if (c * 8 < f.headdim) {  // the head dimension is a multiple of 8
                    float x[8];
                    load8(k_row + c * 8, x);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int e = 0; e < 8; ++e) dot[r] += sq[r][c * 8 + e] * x[e];
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (r < rows) {
                    const Var var(f, b, head(r), seqlen_k);
                    sp[r][tid] = var.template score<true, sizeof(T) == 2>(dot[r], scale_log2, slab.query(f, r), key);
                }
            }
        } else {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sp[r][tid] = neg_inf<float>();
        }
        __syncthreads();

        // ---- online softmax, a warp per row
        for (int r = tid / 32; r < rows; r += WARPS) {
            float s[BLOCK_N / 32], tile_max = neg_inf<float>();
#pragma unroll
            for (int i = 0; i < BLOCK_N / 32; ++i) {
                s[i] = sp[r][lane + 32 * i];
                tile_max = fmax(tile_max, s[i]);
            }
            OnlineSoftmax<float> stats = row_stats(r);
            const float alpha = stats.rescale(reduce_max<32>(tile_max));
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < BLOCK_N / 32; ++i) {
                const float pr = stats.template prob<true>(s[i]);
                sp[r][lane + 32 * i] = pr;
                sum += pr;
            }
            stats.l += reduce_sum<32>(sum);  // here l is the whole row's sum
            __syncwarp();
            if (lane == 0) {
                s_m[r] = stats.m;
                s_l[r] = stats.l;
                s_alpha[r] = alpha;
            }
        }
        __syncthreads();

        // ---- o = o * alpha + p v
        const int n_keys = min(BLOCK_N, end - n0);
#pragma unroll
        for (int q = 0; q < PAIRS; ++q) {
            const int idx = tid + q * THREADS, r = idx / CHUNKS, c = idx % CHUNKS;
            if (r < rows && c * 8 < f.headdim) {
                const float alpha = s_alpha[r];
#pragma unroll
                for (int e = 0; e < 8; ++e) o[q][e] *= alpha;
                const T* v_col = static_cast<const T*>(f.v) + c * 8;
#pragma unroll 4
                for (int j = 0; j < n_keys; ++j) {
                    const float pr = sp[r][j];
                    float x[8];
                    load8(v_col + s_vrow[j], x);
                    const bool masked = is_masked_zero(pr);
#pragma unroll
                    for (int e = 0; e < 8; ++e) o[q][e] = masked ? o[q][e] : fmaf(pr, x[e], o[q][e]);
                }
            }
        }
        __syncthreads();  // sp and s_vrow are refilled by the next tile
    }

    const bool direct = p.num_splits == 1;
    const i64 split_row0 = (i64)split * p.batch * f.nheads * f.seqlen_q;  // (split, b, h, i) rows
    // a split's rows leave the learnable sink to the merge
    auto row_end = [&](int r) { return row_stats(r).end(s_l[r], direct ? sink_log2<float>(f.var, head(r)) : neg_inf<float>()); };
#pragma unroll
    for (int q = 0; q < PAIRS; ++q) {
        const int idx = tid + q * THREADS, r = idx / CHUNKS, c = idx % CHUNKS;
        if (r < rows && c * 8 < f.headdim) {
            const float inv_l = row_end(r).o_factor;
            const i64 out_row = ((i64)b * f.nheads + head(r)) * f.seqlen_q + slab.query(f, r);  // (b, h, i)
            if (direct) {
                T* dst = static_cast<T*>(f.out) + b * f.o_st.b + (i64)slab.query(f, r) * f.o_st.s + head(r) * f.o_st.h + c * 8;
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[e] = from_acc<T>(o[q][e] * inv_l);
            } else {
                float* dst = p.part_out + (split_row0 + out_row) * f.headdim + c * 8;
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[e] = o[q][e] * inv_l;
            }
        }
    }
    if (tid < rows) {
        const float lse = row_end(tid).lse;
        const i64 out_row = ((i64)b * f.nheads + head(tid)) * f.seqlen_q + slab.query(f, tid);
        if (direct)
            static_cast<float*>(f.lse)[out_row] = lse;
        else
            p.part_lse[split_row0 + out_row] = lse;
    }
    if (!direct) merge_splits_if_last<T, THREADS / 32, ROWS>(p, b, slab);
}
