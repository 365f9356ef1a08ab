// Which rows of q, k, v or dout hold NaN or inf, flagged once per call before the attention kernels run.
// A tile that hides some keys from some rows multiplies masked probabilities (zeros) by data those rows
// must not see, and 0 * NaN is NaN: such a tile takes the guarded products only when its rows are
// flagged here (mask.cuh, rows_nonfinite), instead of scanning its data in shared memory.
#include "common.cuh"
#include "params.cuh"

// A warp per chunk c of NONFINITE_ROWS rows of one head, flagged at flags[(b * heads + h) * chunks + c].
// VEC elements per load (16 bytes when rows are 16-byte aligned, else 1). Grid: (warps / 8, tensors).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) flag_nonfinite_rows(const __grid_constant__ NonfiniteParams p) {
    struct alignas(sizeof(T) * VEC) Vec { T x[VEC]; };
    const RowFlags& t = p.tensors[blockIdx.y];
    const int chunks = (t.seqlen + NONFINITE_ROWS - 1) / NONFINITE_ROWS, lane = threadIdx.x % 32;
    const i64 chunk = (i64)blockIdx.x * 8 + threadIdx.x / 32;
    if (chunk >= (i64)p.batch * t.heads * chunks) return;
    const int c = chunk % chunks, h = chunk / chunks % t.heads, b = chunk / chunks / t.heads;
    const int per_row = p.headdim / VEC, rows = min(NONFINITE_ROWS, t.seqlen - NONFINITE_ROWS * c);
    const T* x = static_cast<const T*>(t.x) + b * t.st.b + h * t.st.h + (i64)NONFINITE_ROWS * c * t.st.s;
    bool bad = false;
    for (int idx = lane; idx < rows * per_row; idx += 32) {
        const Vec v = *reinterpret_cast<const Vec*>(x + (idx / per_row) * t.st.s + (idx % per_row) * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) bad |= !is_finite(v.x[e]);
    }
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) t.flags[chunk] = bad;
}
