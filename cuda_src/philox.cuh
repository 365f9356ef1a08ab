// Philox-4x32-7 and the dropout keep bit: the CUDA twin of cupyflash/_philox.py.
// keep[b, h, i, j] is a pure function of (seed, b, h, i, j) (docs/variants.md, "Dropout bits"):
// counter ((j / 64) * 4 + (j % 8) / 2, i, h, b), key (seed low, seed high). One call gives the
// 16 byte values of the columns 8w + 2q + {0, 1} (w = 0..7) of a 64-column group, q = (j % 8) / 2:
// the columns one thread holds of a 64-key tensor-core accumulator.
#pragma once

#include "common.cuh"

// Rounds of Philox-4x32 (Random123's round; its known answers for 7 rounds in tests/test_philox.py).
constexpr int PHILOX_ROUNDS = 7;

__device__ __forceinline__ void philox4x32(unsigned k0, unsigned k1, unsigned c0, unsigned c1, unsigned c2,
                                           unsigned c3, unsigned (&r)[4]) {
    const unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
        if (round) {
            k0 += W0;
            k1 += W1;
        }
        // One 32 x 32 -> 64-bit multiply gives both halves (hi, lo) of each product.
        const unsigned long long p0 = (unsigned long long)M0 * c0, p1 = (unsigned long long)M1 * c2;
        c0 = unsigned(p1 >> 32) ^ c1 ^ k0;
        c1 = unsigned(p1);
        c2 = unsigned(p0 >> 32) ^ c3 ^ k1;
        c3 = unsigned(p0);
    }
    r[0] = c0;
    r[1] = c1;
    r[2] = c2;
    r[3] = c3;
}

// Column j of a group takes byte 2 w + j % 2 of the call, w = (j % 64) / 8: byte (w % 2) * 2 + j % 2 of
// word w / 2.
__device__ __forceinline__ unsigned dropout_byte(unsigned word, int w, int odd) {
    return (word >> (16 * (w & 1) + 8 * odd)) & 0xFFu;
}

// The keep bit of the column 8 w + 2 q + odd of a group: for callers that know w and odd at compile time.
__device__ __forceinline__ bool dropout_keep_at(const unsigned (&r)[4], int w, int odd, unsigned threshold) {
    return dropout_byte(r[w >> 1], w, odd) >= threshold;
}

// Column j keeps its probability iff its byte value is >= threshold. Selects rather than indexing r by
// a variable, so that r stays in registers when j is not a constant.
__device__ __forceinline__ bool dropout_keep_bit(const unsigned (&r)[4], int j, unsigned threshold) {
    const int w = (j >> 3) & 7, half = w >> 1;
    const unsigned word = half == 0 ? r[0] : half == 1 ? r[1] : half == 2 ? r[2] : r[3];
    return dropout_byte(word, w, j & 1) >= threshold;
}

// The keep bits of the columns 8 w + 2 q + {0, 1} of a group as a mask of the two 16-bit halves of a
// packed pair of probabilities (low half: the even column): 0xFFFF where kept, 0 where dropped. word is
// r[w / 2] of the call; the pair's bytes are its half w % 2. Four bytes are compared at once: the top bit
// of byte k of `kept` is (byte k of word) >= threshold, and prmt copies that bit over a half.
__device__ __forceinline__ unsigned dropout_keep_halves(unsigned word, int w, unsigned threshold) {
    const unsigned top = 0x80808080u, t = threshold * 0x01010101u;
    const unsigned low_ge = (word | top) - (t & ~top);  // top bit: low 7 bits of word >= those of t, per byte
    const unsigned kept = (word & ~t) | (~(word ^ t) & low_ge);  // top bit decides where the top bits differ
    unsigned halves;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(halves) : "r"(kept), "r"(w & 1 ? 0xBBAAu : 0x9988u));
    return halves;
}
