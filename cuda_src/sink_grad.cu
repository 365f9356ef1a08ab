// The gradient of the learnable sinks (OnlineSoftmax::end): a sink is a key whose value is zero, so its
// score's gradient is p_sink (0 - delta), and d sink_h = -sum over the rows (b, i) of head h of
// exp(sink_h - lse) delta, delta = rowsum(dout * out). The backward passes leave it alone; it is asked for
// apart (return_dsink).
#include "common.cuh"
#include "params.cuh"

// The sum of x over a block of WARPS warps, in a fixed order: thread 0's value.
template <int WARPS, typename A> __device__ __forceinline__ A block_sum(A x) {
    __shared__ A sums[WARPS];
    x = reduce_sum<32>(x);
    if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = x;
    __syncthreads();
    A total = A(0);
    if (threadIdx.x == 0)
        for (int w = 0; w < WARPS; ++w) total += sums[w];
    return total;
}

// LANES threads a row, VEC columns a load (16 bytes where the rows of dout and out are 16-byte aligned, else 1),
// 32 * WARPS / LANES rows of head blockIdx.y of sequence blockIdx.z at a time; each of p.blocks blocks writes its
// sum to partial[(b * nheads + h) * p.blocks + blockIdx.x], which sink_gradient_sum adds up.
template <typename T, int LANES, int VEC, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) sink_gradient(const __grid_constant__ SinkGradParams p) {
    using A = typename Acc<T>::type;
    constexpr int ROWS = 32 * WARPS / LANES;
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % LANES;
    const A sink = static_cast<const A*>(p.sink)[h];
    const A* lse = static_cast<const A*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
    A sum = A(0);
    // The bound is the block's, so that every lane of a warp takes part in its rows' shuffles.
    for (int i0 = blockIdx.x * ROWS; i0 < p.seqlen; i0 += gridDim.x * ROWS) {
        const int i = i0 + threadIdx.x / LANES;
        A delta = A(0);
        if (i < p.seqlen) {
            const T* dout = static_cast<const T*>(p.dout) + b * p.do_st.b + (i64)i * p.do_st.s + h * p.do_st.h;
            const T* out = static_cast<const T*>(p.out) + b * p.o_st.b + (i64)i * p.o_st.s + h * p.o_st.h;
            add_row_dot<LANES, VEC>(delta, dout, out, p.headdim, lane);
        }
        delta = reduce_sum<LANES>(delta);
        // lse -inf: no key and no sink, out 0
        if (lane == 0 && i < p.seqlen && lse[i] != neg_inf<A>()) sum += exp(sink - lse[i]) * delta;
    }
    const A total = block_sum<WARPS>(sum);
    if (threadIdx.x == 0) static_cast<A*>(p.partial)[((i64)b * gridDim.y + h) * p.blocks + blockIdx.x] = -total;
}

// dsink[h] for head blockIdx.x: the sum of its batch * p.blocks partials, in an order fixed by their count.
constexpr int SINK_SUM_WARPS = 8;
template <typename T>
__global__ void __launch_bounds__(SINK_SUM_WARPS * 32) sink_gradient_sum(const __grid_constant__ SinkGradParams p) {
    using A = typename Acc<T>::type;
    const int h = blockIdx.x, nheads = gridDim.x, parts = p.batch * p.blocks;
    const A* partial = static_cast<const A*>(p.partial);
    A sum = A(0);
    for (int k = threadIdx.x; k < parts; k += SINK_SUM_WARPS * 32)
        sum += partial[((i64)(k / p.blocks) * nheads + h) * p.blocks + k % p.blocks];  // (batch, head, block)
    const A total = block_sum<SINK_SUM_WARPS>(sum);
    if (threadIdx.x == 0) static_cast<A*>(p.dsink)[h] = total;
}
