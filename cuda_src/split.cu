// float32 inputs of the Hopper kernels (q, k and v; and dout for the backward) as bfloat16 parts
// (split.cuh), which their wgmma products read through TMA; and whether any element is NaN or inf, which the
// parts cannot carry through the products (inf times a zero part is NaN): such a call takes the mma.sync
// kernels (FwdParams::gate).
#include "common.cuh"
#include "params.cuh"
#include "split.cuh"

// A thread per element of the parts' (batch, seqlen, heads, cols) layout, over a grid-stride loop.
template <typename T>
__global__ void __launch_bounds__(256) split_float32(const __grid_constant__ SplitParams p) {
    const i64 n = (i64)p.batch * p.seqlen * p.heads * p.cols;
    bool bad = false;
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) {
        const int c = int(i % p.cols), h = int(i / p.cols % p.heads), s = int(i / p.cols / p.heads % p.seqlen);
        const int b = int(i / p.cols / p.heads / p.seqlen);
        const T x = c < p.headdim ? p.x[b * p.st.b + s * p.st.s + h * p.st.h + c] : T(0);
        float hi = 0.f, mid = 0.f, lo = 0.f;
        if (isfinite(x)) split3(x, hi, mid, lo);
        else bad = true;
        p.parts[i] = __float_as_uint(hi) >> 16;
        p.parts[n + i] = __float_as_uint(mid) >> 16;
        p.parts[2 * n + i] = __float_as_uint(lo) >> 16;
    }
    if (__any_sync(0xffffffffu, bad) && threadIdx.x % 32 == 0) atomicExch(p.nonfinite, 1);
}
