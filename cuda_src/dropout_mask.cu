// The dropout keep-mask as bytes (0/1) of a contiguous (batch, nheads, seqlen_q, seqlen_k) output:
// cupyflash._philox.dropout_mask(..., xp=cupy), the bits every kernel draws.
#include "philox.cuh"

// One thread per Philox call, i.e. per (b, h, i, c0) with c0 = (j / 64) * 4 + (j % 8) / 2; it writes
// the 16 columns 64 * (c0 / 4) + 8w + 2 * (c0 % 4) + {0, 1}. A grid-stride loop covers any size.
__global__ void dropout_mask_kernel(unsigned char* __restrict__ out, int batch, int nheads, int seqlen_q,
                                    int seqlen_k, unsigned k0, unsigned k1, unsigned threshold) {
    const i64 counters = (i64)((seqlen_k + 63) / 64) * 4;
    const i64 n = (i64)batch * nheads * seqlen_q * counters;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (i64)gridDim.x * blockDim.x) {
        const unsigned c0 = (unsigned)(t % counters);
        i64 row = t / counters;  // (b * nheads + h) * seqlen_q + i
        const unsigned i = (unsigned)(row % seqlen_q);
        const unsigned h = (unsigned)((row / seqlen_q) % nheads);
        const unsigned b = (unsigned)(row / seqlen_q / nheads);
        unsigned r[4];
        philox4x32(k0, k1, c0, i, h, b, r);
        unsigned char* out_row = out + row * seqlen_k;
        const int j0 = (int)(c0 / 4) * 64 + (int)(c0 % 4) * 2;
#pragma unroll
        for (int w = 0; w < 8; ++w) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = j0 + 8 * w + e;
                if (j < seqlen_k) out_row[j] = dropout_keep_at(r, w, e, threshold);
            }
        }
    }
}
