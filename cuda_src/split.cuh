// float32 as three bfloat16 parts hi + mid + lo, each the remainder of the ones before rounded to nearest:
// they sum to x exactly (a float's 24 significant bits in three parts of 8, where rounding's sign gives each
// part the bit the next needs). The tensor cores multiply bfloat16 exactly and add in float32, so the six
// products whose parts' orders sum to at most 2 (split_pairs) give a float32 product short of only terms
// below 2^-26 of it.
#pragma once
#include "common.cuh"

__device__ __forceinline__ float bf16_rounded(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return __uint_as_float(unsigned(h) << 16);
}

// The parts of a finite x as floats (each a bfloat16 value). A value past bfloat16's largest rounds its
// first part toward zero instead of to infinity.
__device__ __forceinline__ void split3(float x, float& hi, float& mid, float& lo) {
    hi = bf16_rounded(x);
    if (isinf(hi)) hi = __uint_as_float(__float_as_uint(x) & 0xffff0000u);
    const float rest = x - hi;
    mid = bf16_rounded(rest);
    lo = rest - mid;  // 8 significant bits or fewer: a bfloat16 value
}

// Float32 accumulators x, taken in consecutive pairs as wgmma's A fragments take them, as their bfloat16 parts
// (split3), two to a register: parts[part][i] holds part `part` of x[2 i] (low half) and of x[2 i + 1], each
// a bfloat16 value and so its float's high half.
template <int P, int N>
__device__ __forceinline__ void split_fragments(const float (&x)[2 * N], unsigned (&parts)[P][N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float even[3], odd[3];
        split3(x[2 * i], even[0], even[1], even[2]);
        split3(x[2 * i + 1], odd[0], odd[1], odd[2]);
#pragma unroll
        for (int part = 0; part < P; ++part)
            parts[part][i] = __byte_perm(__float_as_uint(even[part]), __float_as_uint(odd[part]), 0x7632);
    }
}

// What the Hopper kernels' tensor cores read of an input dtype: 16-bit values themselves; float32 as PARTS
// bfloat16 parts.
template <typename T> struct Operands {
    using type = T;
    static constexpr int PARTS = 1;
};
template <> struct Operands<float> {
    using type = bfloat16_t;
    static constexpr int PARTS = 3;
};

// The pairs of parts (of the A and the B operand) whose products sum to a float32 product, the small ones
// first (they are added to the accumulator before the large ones): PARTS 1 is the plain product.
__host__ __device__ constexpr int split_pairs(int parts) { return parts == 1 ? 1 : 6; }
__host__ __device__ constexpr int split_part_a(int parts, int pair) {
    return parts == 1 ? 0 : pair == 0 ? 1 : pair == 1 ? 0 : pair == 2 ? 2 : pair == 3 ? 0 : pair == 4 ? 1 : 0;
}
__host__ __device__ constexpr int split_part_b(int parts, int pair) {
    return parts == 1 ? 0 : pair == 0 ? 1 : pair == 1 ? 2 : pair == 2 ? 0 : pair == 3 ? 1 : 0;
}
