// Online softmax shared by the forward kernels. Scores arrive in log2 units (the softmax
// scale times log2(e) folded in), so every exponential is one exp2.
#pragma once
#include "common.cuh"
#include "mask.cuh"

// Reductions over the TPR consecutive lanes that share a row.
template <int TPR, typename A> __device__ __forceinline__ A reduce_max(A x) {
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}
template <int TPR, typename A> __device__ __forceinline__ A reduce_sum(A x) {
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// Running statistics of one query row: m is the running max, l this thread's share of the
// running sum (the lanes of a row are summed once, at the end).
template <typename A> struct OnlineSoftmax {
    A m, l, m_use;

    __device__ OnlineSoftmax() : m(neg_inf<A>()), l(A(0)), m_use(A(0)) {}

    // Folds in a tile whose row max (already reduced over the row's lanes) is tile_max and
    // returns alpha = exp2(m_old - m_new), the factor that rescales the accumulator.
    __device__ __forceinline__ A rescale(A tile_max) {
        const A m_new = fmax(m, tile_max);
        // A row that has seen only masked keys keeps m = -inf; exp2(-inf - 0) = 0, never NaN.
        m_use = m_new == neg_inf<A>() ? A(0) : m_new;
        const A alpha = fast_exp2(m - m_use);
        m = m_new;
        l *= alpha;
        return alpha;
    }

    // CHECK (tiles where elements may be masked): a -inf score gives -0.0, see mask.cuh.
    template <bool CHECK> __device__ __forceinline__ A prob(A s) const {
        return CHECK ? ::prob(s, m_use) : fast_exp2(s - m_use);
    }

    // Natural-log log-sum-exp of the row from its total sum: -inf for a row that saw no key (or only
    // -inf scores), +inf for a row with a +inf score, NaN for a row with a NaN score.
    __device__ __forceinline__ A lse(A l_row) const {
        if (m == -neg_inf<A>()) return m;
        if (l_row > A(0)) return (m + fast_log2(l_row)) * A(LN2);
        return l_row == A(0) ? neg_inf<A>() : l_row;
    }
};
