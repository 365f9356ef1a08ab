// What the decode kernels (decode.cu, decode_mma.cu) share: each sequence's length and the page table.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "softmax.cuh"

// The cache row of sequence b's first key: the rows before it (a left padding) are not its keys.
__device__ __forceinline__ int decode_first_row(const DecodeParams& p, int b) {
    return p.cache_leftpad ? p.cache_leftpad[b] : 0;
}

// Keys of sequence b once its new rows are appended.
__device__ __forceinline__ int decode_seqlen(const DecodeParams& p, int b) {
    return (p.cache_seqlens ? p.cache_seqlens[b] : p.cache_seqlen) + p.seqlen_new - decode_first_row(p, b);
}

// Offset of position `key` of sequence b's rows in a cache of strides st, through the page table.
__device__ __forceinline__ i64 cache_row(const DecodeParams& p, const Strides& st, int b, int key) {
    const int page = p.block_table ? p.block_table[b * p.table_stride + key / p.page_size] : b;
    return page * st.b + (i64)(key % p.page_size) * st.s;
}

// A decode block's query rows: the GQA group's heads times seqlen_q of kv head hk, in slabs of at most SLAB
// rows, the grid's rows being (kv head, slab) pairs (nheads_kv x slabs), so that a call of any number of rows
// per kv head is one launch. Row r of the block is row row0 + r of its kv head: query position
// (row0 + r) % seqlen_q of query head hk * group + (row0 + r) / seqlen_q.
struct DecodeSlab {
    int hk, row0, rows;  // the kv head, the slab's first row, its rows

    __device__ __forceinline__ int head(const FwdParams& f, int r) const {
        return hk * f.group + (row0 + r) / f.seqlen_q;
    }
    __device__ __forceinline__ int query(const FwdParams& f, int r) const { return (row0 + r) % f.seqlen_q; }
};

template <int SLAB> __device__ __forceinline__ DecodeSlab decode_slab(const FwdParams& f) {
    const int slabs = gridDim.y / (f.nheads / f.group), row0 = int(blockIdx.y) % slabs * SLAB;
    return {int(blockIdx.y) / slabs, row0, min(SLAB, f.group * f.seqlen_q - row0)};
}

// The most splits of a (sequence, kv head): _plan.DECODE_MAX_SPLITS.
constexpr int DECODE_MAX_SPLITS = 128;

// An atomic add with acquire-release semantics at GPU scope: the writes ordered before it (by the block's
// barrier, for the other threads' writes) are seen by whoever acquires the count after it.
__device__ __forceinline__ unsigned atomic_add_acq_rel(unsigned* counter, unsigned value) {
    unsigned old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(value) : "memory");
    return old;
}

// Called by every block of a decode with several splits once it has written its rows' part_out and part_lse:
// the block that finishes last among the splits of (sequence b, its slab) merges them into out and lse, by
// their lse as cupyflash.merge_attention does. Thread 0 counts the block with one acquire-release atomic
// after the block's barrier, so the last block reads the others' partials (through L2, ld.global.cg). A warp
// per row finds the row's max and sum over the splits and leaves each split's weight in shared memory; then
// each thread sums its elements over the splits, every load independent of the others. The last block also
// resets the counter: the counters stay zero between launches (_cuda_backend keeps them per device and stream).
template <typename T, int WARPS, int ROWS>
__device__ void merge_splits_if_last(const DecodeParams& p, int b, const DecodeSlab& slab) {
    const FwdParams& f = p.fwd;
    __shared__ bool last;
    __shared__ float s_weight[ROWS][DECODE_MAX_SPLITS];  // exp(lse_s - m) / sum of each of the slab's rows and split
    __syncthreads();  // the block's partial rows are written
    unsigned* counter = p.split_counters + b * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) {
        last = atomic_add_acq_rel(counter, 1u) == p.num_splits - 1;
        if (last) *counter = 0u;  // every split has counted: none reads it again in this launch
    }
    __syncthreads();
    if (!last) return;
    auto load = [](const float* x) {
        float v;
        asm("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(x));  // L2: other blocks wrote it
        return v;
    };
    constexpr int PER_LANE = DECODE_MAX_SPLITS / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const i64 split_rows = (i64)p.batch * f.nheads * f.seqlen_q;
    auto out_row = [&](int r) { return ((i64)b * f.nheads + slab.head(f, r)) * f.seqlen_q + slab.query(f, r); };
    for (int r = warp; r < slab.rows; r += WARPS) {
        float lse[PER_LANE];
        float m = neg_inf<float>();
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const int s = lane + 32 * i;
            lse[i] = s < p.num_splits ? load(p.part_lse + s * split_rows + out_row(r)) : neg_inf<float>();
            m = fmax(m, lse[i]);
        }
        m = reduce_max<32>(m);
        const float sink = sink_logit<float>(f.var, slab.head(f, r));  // a term with no o
        m = fmax(m, sink);
        const float m_safe = is_finite(m) ? m : 0.f;  // every split -inf (or +inf): no m - m = NaN
        float total = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            lse[i] = expf(lse[i] - m_safe);
            total += lse[i];
        }
        const float keys = reduce_sum<32>(total);
        total = keys + expf(sink - m_safe);
        // no split saw the row: weight 0 (out 0, whatever the sink); NaN and inf carry through the arithmetic
        const float inv_total = keys == 0.f ? 0.f : 1.f / total;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i)
            if (lane + 32 * i < p.num_splits) s_weight[r][lane + 32 * i] = lse[i] * inv_total;
        if (lane == 0) static_cast<float*>(f.lse)[out_row(r)] = total == 0.f ? m : m_safe + logf(total);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < slab.rows * f.headdim; idx += WARPS * 32) {
        const int r = idx / f.headdim, d = idx % f.headdim;
        const float* part = p.part_out + out_row(r) * f.headdim + d;
        const i64 split_stride = split_rows * f.headdim;
        float acc = 0.f;
#pragma unroll 16
        for (int s = 0; s < p.num_splits; ++s) acc += s_weight[r][s] * load(part + s * split_stride);
        static_cast<T*>(f.out)[b * f.o_st.b + (i64)slab.query(f, r) * f.o_st.s + slab.head(f, r) * f.o_st.h + d] =
            from_acc<T>(acc);
    }
}
