// Primitives shared by every pass: storage types, conversions, masking and tile loads.
// Self-contained on purpose (no CUDA headers): NVRTC from pip ships none, so the 16-bit
// types are plain 16-bit structs converted with PTX `cvt`.
#pragma once

typedef long long i64;

struct __align__(2) half_t { unsigned short bits; };
struct __align__(2) bfloat16_t { unsigned short bits; };
// float32 data whose tensor-core products take one TF32 rounding of each operand (the opt-in fast mode;
// plain float runs exact, three TF32 products per product, mma.cuh).
struct __align__(4) tf32_t { float x; };

// Waits for THREADS threads at named barrier `id` (0 is __syncthreads').
template <int THREADS> __device__ __forceinline__ void named_barrier(int id) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(THREADS) : "memory");
}
// Arrives at named barrier `id` of THREADS threads without waiting.
template <int THREADS> __device__ __forceinline__ void named_barrier_arrive(int id) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "n"(THREADS) : "memory");
}

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
__device__ __forceinline__ float to_acc(tf32_t x) { return x.x; }
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
template <> __device__ __forceinline__ tf32_t from_acc<tf32_t>(float x) { return tf32_t{x}; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// One MUFU.EX2 with results below 2^-126 flushed to zero: exp2f keeps them, at three more instructions
// per call, and no probability that small changes a sum it enters (the row max contributes 1).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fast_log2(float x) { return log2f(x); }
__device__ __forceinline__ double fast_log2(double x) { return log2(x); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

#define LOG2E 1.4426950408889634
#define LN2 0.6931471805599453

// Division of dividends below 2^31 by a divisor fixed before a loop: a / d = a m / 2^(31 + s) with
// s = ceil(log2 d), m = ceil(2^(31 + s) / d) (below 2^32), which errs by less than 1 / d, in one wide
// multiply and a shift, where a division costs a reciprocal, two conversions and about twenty dependent
// instructions.
struct FastDiv {
    int d;
    unsigned m, s = 0;
    __device__ explicit FastDiv(int divisor) : d(divisor) {
        while ((1u << s) < unsigned(d)) ++s;
        m = unsigned(((1ull << (31 + s)) + d - 1) / unsigned(max(d, 1)));
    }
    __device__ __forceinline__ int div(int a) const { return int((unsigned long long)unsigned(a) * m >> (31 + s)); }
};

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

// Adds this lane's part of rowsum(x * y) over a row of n columns to sum: LANES lanes a row, VEC columns a load
// (x and y aligned to VEC elements); reduce_sum<LANES> completes it.
template <int LANES, int VEC, typename T, typename A>
__device__ __forceinline__ void add_row_dot(A& sum, const T* x, const T* y, int n, int lane) {
    struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };
    for (int c = VEC * lane; c < n; c += VEC * LANES) {
        const Vec a = *reinterpret_cast<const Vec*>(x + c), b = *reinterpret_cast<const Vec*>(y + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum += to_acc(a.v[e]) * to_acc(b.v[e]);
    }
}

// Compile-time bool for generic lambdas that instantiate a masked and an unmasked tile step.
template <bool B> struct Bool {
    static constexpr bool value = B;
};

// lse in log2 units for recomputing probabilities; a row that saw no key (lse = -inf) gets +inf, so
// every p = exp2(s - lse) of it is 0.
template <typename A> __device__ __forceinline__ A lse_log2(A lse) {
    return lse == neg_inf<A>() ? -neg_inf<A>() : lse * A(LOG2E);
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

// The exponent bits of the 16-bit types: all set for NaN and inf.
template <typename T> struct Half16;
template <> struct Half16<half_t> { static constexpr unsigned EXP = 0x7c00u; };
template <> struct Half16<bfloat16_t> { static constexpr unsigned EXP = 0x7f80u; };

template <typename T> __device__ __forceinline__ bool is_finite(T x) { return (x.bits & Half16<T>::EXP) != Half16<T>::EXP; }
__device__ __forceinline__ bool is_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool is_finite(double x) {
    return (__double_as_longlong(x) & 0x7ff0000000000000LL) != 0x7ff0000000000000LL;
}

