// The gradient of the learnable sinks (OnlineSoftmax::end): a sink is a key whose value is zero, so its
// score's gradient is p_sink (0 - delta), and d sink_h = -sum over the rows (b, i) of head h of
// exp(sink_h - lse) delta, delta = rowsum(dout * out). The backward passes leave it alone; it is asked for
// apart (return_dsink).
#include "common.cuh"
#include "params.cuh"

// A warp per row, WARPS rows of head blockIdx.y of sequence blockIdx.z at a time; each block writes its sum to
// partial[(b * nheads + h) * gridDim.x + blockIdx.x], which the host sums in a fixed order.
template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) sink_gradient(const __grid_constant__ SinkGradParams p) {
    using A = typename Acc<T>::type;
    const int h = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const A sink = static_cast<const A*>(p.sink)[h];
    const A* lse = static_cast<const A*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
    A sum = A(0);
    for (int i = blockIdx.x * WARPS + warp; i < p.seqlen; i += gridDim.x * WARPS) {
        const T* dout = static_cast<const T*>(p.dout) + b * p.do_st.b + (i64)i * p.do_st.s + h * p.do_st.h;
        const T* out = static_cast<const T*>(p.out) + b * p.o_st.b + (i64)i * p.o_st.s + h * p.o_st.h;
        A delta = A(0);
        for (int c = lane; c < p.headdim; c += 32) delta += to_acc(dout[c]) * to_acc(out[c]);
        delta = reduce_sum<32>(delta);
        if (lse[i] != neg_inf<A>()) sum += exp(sink - lse[i]) * delta;  // -inf: no key and no sink, out 0
    }
    __shared__ A sums[WARPS];
    if (lane == 0) sums[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        A total = A(0);
        for (int w = 0; w < WARPS; ++w) total += sums[w];
        static_cast<A*>(p.partial)[((i64)b * gridDim.y + h) * gridDim.x + blockIdx.x] = -total;
    }
}
