// Rotary position embedding of attention_with_kvcache's queries and new keys (its rotary_cos and rotary_sin),
// before the keys are appended and the queries attend: a pair (x1, x2) at position p becomes
// (x1 cos - x2 sin, x2 cos + x1 sin) with cos and sin of row p, each product and the sum rounded once in the
// accumulation type (no fused multiply-add: the NumPy backend's float32 operations give the same bits), the
// result once to the dtype. Columns past rotary_dim are copied.
#include "common.cuh"
#include "params.cuh"

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// One block per (row, head, sequence) of q's heads then k's, its threads over the head's columns.
template <typename T> __global__ void __launch_bounds__(128) rotary(const __grid_constant__ RotaryParams p) {
    using A = typename Acc<T>::type;
    const bool is_q = int(blockIdx.y) < p.q.heads;
    const RotaryRows& rows = is_q ? p.q : p.k;
    const int s = blockIdx.x, h = is_q ? blockIdx.y : blockIdx.y - p.q.heads, b = blockIdx.z;
    if (s >= rows.seqlen) return;
    const int half = p.rotary_dim / 2, position = (p.starts ? p.starts[b] : p.start) + s * rows.step;
    const T* x = static_cast<const T*>(rows.x) + b * rows.st.b + (i64)s * rows.st.s + h * rows.st.h;
    T* out = static_cast<T*>(rows.out) + (((i64)b * rows.seqlen + s) * rows.heads + h) * p.headdim;
    const T* cos = static_cast<const T*>(p.cos) + (i64)position * half;
    const T* sin = static_cast<const T*>(p.sin) + (i64)position * half;
    for (int d = threadIdx.x; d < p.headdim; d += blockDim.x) {
        if (d >= p.rotary_dim) {
            out[d] = x[d];
            continue;
        }
        // column d pairs with `partner`: d is the pair's first (x1) or second (x2)
        const bool first = p.interleaved ? d % 2 == 0 : d < half;
        const int i = p.interleaved ? d / 2 : d % half;
        const int partner = p.interleaved ? d ^ 1 : (first ? d + half : d - half);
        const A own = mul_rn(to_acc(x[d]), to_acc(cos[i])), other = mul_rn(to_acc(x[partner]), to_acc(sin[i]));
        out[d] = from_acc<T>(first ? add_rn(own, -other) : add_rn(own, other));
    }
}
