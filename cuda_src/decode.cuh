// What the decode kernels (decode.cu, decode_mma.cu) share: each sequence's length and the page table.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "softmax.cuh"

// Keys of sequence b once its new rows are appended.
__device__ __forceinline__ int decode_seqlen(const DecodeParams& p, int b) {
    return (p.cache_seqlens ? p.cache_seqlens[b] : p.cache_seqlen) + p.seqlen_new;
}

// Offset of position `key` of sequence b's rows in a cache of strides st, through the page table.
__device__ __forceinline__ i64 cache_row(const DecodeParams& p, const Strides& st, int b, int key) {
    const int page = p.block_table ? p.block_table[b * p.table_stride + key / p.page_size] : b;
    return page * st.b + (i64)(key % p.page_size) * st.s;
}

// Called by every block of a decode with several splits once it has written its rows' part_out and part_lse:
// the block that finishes last among the splits of (sequence b, kv head hk) merges them into out and lse, by
// their lse as cupyflash.merge_attention does. The others' partials are read through L2 (ld.global.cg),
// where their __threadfence put them before they counted themselves. A warp per row finds the row's max and
// sum over the splits; then each thread sums its elements over the splits. The last block also resets the
// counter: the counters stay zero between launches (_cuda_backend keeps them per device and stream).
template <typename T, int WARPS> __device__ void merge_splits_if_last(const DecodeParams& p, int b, int hk) {
    const FwdParams& f = p.fwd;
    __shared__ bool last;
    __shared__ float s_max[16], s_total[16];  // m (finite, or 0) and sum of exp(lse - m) of each row
    __threadfence();
    __syncthreads();
    unsigned* counter = p.split_counters + b * (f.nheads / f.group) + hk;
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1u) == p.num_splits - 1;
        if (last) *counter = 0u;  // every split has counted: none reads it again in this launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    auto load = [](const float* x) {
        float v;
        asm("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(x));
        return v;
    };
    const int rows = f.group * f.seqlen_q, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const i64 split_rows = (i64)p.batch * f.nheads * f.seqlen_q;
    auto out_row = [&](int r) { return ((i64)b * f.nheads + hk * f.group + r / f.seqlen_q) * f.seqlen_q + r % f.seqlen_q; };
    for (int r = warp; r < rows; r += WARPS) {
        const float* lse = p.part_lse + out_row(r);
        float m = neg_inf<float>();
        for (int s = lane; s < p.num_splits; s += 32) m = fmax(m, load(lse + s * split_rows));
        m = reduce_max<32>(m);
        const float m_safe = is_finite(m) ? m : 0.f;  // every split -inf (or +inf): no m - m = NaN
        float total = 0.f;
        for (int s = lane; s < p.num_splits; s += 32) total += expf(load(lse + s * split_rows) - m_safe);
        total = reduce_sum<32>(total);
        if (lane == 0) {
            s_max[r] = m_safe;
            s_total[r] = total;
            static_cast<float*>(f.lse)[out_row(r)] = total == 0.f ? m : m_safe + logf(total);
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * f.headdim; idx += WARPS * 32) {
        const int r = idx / f.headdim, d = idx % f.headdim;
        const i64 row = out_row(r);
        // no split saw the row: weight 0 (out 0); NaN and inf carry through the arithmetic
        const float m = s_max[r], inv_total = s_total[r] == 0.f ? 0.f : 1.f / s_total[r];
        float acc = 0.f;
#pragma unroll 16
        for (int s = 0; s < p.num_splits; ++s)
            acc += expf(load(p.part_lse + s * split_rows + row) - m) * load(p.part_out + (s * split_rows + row) * f.headdim + d);
        static_cast<T*>(f.out)[b * f.o_st.b + (i64)(r % f.seqlen_q) * f.o_st.s + (hk * f.group + r / f.seqlen_q) * f.o_st.h + d] =
            from_acc<T>(acc * inv_total);
    }
}
