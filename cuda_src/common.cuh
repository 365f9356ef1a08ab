// Primitives shared by every pass: storage types, conversions, masking and tile loads.
// Self-contained on purpose (no CUDA headers): NVRTC from pip ships none, so the 16-bit
// types are plain 16-bit structs converted with PTX `cvt`.
#pragma once

typedef long long i64;

struct __align__(2) half_t { unsigned short bits; };
struct __align__(2) bfloat16_t { unsigned short bits; };

// Accumulation type: float for 16-bit and float32 inputs, double for float64.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float to_acc(bfloat16_t x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ half_t from_acc<half_t>(float x) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ bfloat16_t from_acc<bfloat16_t>(float x) {
    bfloat16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fast_log2(float x) { return log2f(x); }
__device__ __forceinline__ double fast_log2(double x) { return log2(x); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

#define LOG2E 1.4426950408889634
#define LN2 0.6931471805599453

// Query i sees key j unless j is past the end or, when causal, j > i + seqlen_k - seqlen_q
// (bottom-right alignment, as flash-attn >= 2.1).
template <bool CAUSAL>
__device__ __forceinline__ bool masked(int i, int j, int seqlen_q, int seqlen_k) {
    return j >= seqlen_k || i >= seqlen_q || (CAUSAL && j > i + seqlen_k - seqlen_q);
}

// Number of key tiles a query tile [m0, m0 + block_m) needs: causal tiles entirely
// above the diagonal are skipped.
template <bool CAUSAL>
__device__ __forceinline__ int key_tiles_for(int m0, int block_m, int block_n, int seqlen_q, int seqlen_k) {
    int n_end = seqlen_k;
    if (CAUSAL) n_end = min(n_end, m0 + block_m + seqlen_k - seqlen_q);
    return n_end <= 0 ? 0 : (n_end + block_n - 1) / block_n;
}

// First query tile that sees any key of key tile [n0, ...) under causal masking.
template <bool CAUSAL>
__device__ __forceinline__ int first_query_tile(int n0, int block_m, int seqlen_q, int seqlen_k) {
    if (!CAUSAL) return 0;
    int i = n0 - (seqlen_k - seqlen_q);
    return i <= 0 ? 0 : i / block_m;
}

// Copies rows [row0, row0 + ROWS) x columns [0, D_TILE) of one head into shared memory in
// the accumulation type, zero-filling rows past `nrows` and columns past `headdim` so that
// padded entries contribute exactly nothing to any product.
template <int ROWS, int D_TILE, int LD, int THREADS, typename T, typename A>
__device__ __forceinline__ void load_tile_acc(A* dst, const T* src, i64 row_stride, int row0, int nrows,
                                              int headdim) {
    for (int idx = threadIdx.x; idx < ROWS * D_TILE; idx += THREADS) {
        int r = idx / D_TILE, d = idx % D_TILE;
        int row = row0 + r;
        dst[r * LD + d] = (row < nrows && d < headdim) ? to_acc(src[(i64)row * row_stride + d]) : A(0);
    }
}

// Loads ROWS per-row statistics (lse or delta) of one (batch, head), `fill` past the end.
template <int ROWS, int THREADS, typename A>
__device__ __forceinline__ void load_rows(A* dst, const A* src, int row0, int nrows, A fill) {
    for (int r = threadIdx.x; r < ROWS; r += THREADS) dst[r] = (row0 + r < nrows) ? src[row0 + r] : fill;
}
