// Forward pass for float16 / bfloat16 on tensor cores (FlashAttention-2 partitioning).
//
// One block per (query tile, head, batch); each warp owns 16 query rows. Per key tile:
//   s = q k^T              mma.sync m16n8k16, q and k fragments through ldmatrix
//   online softmax         in registers, on the s accumulators (rows g and g + 8 of the warp's
//                          16, each row split over the 4 lanes of a quad)
//   o = o * alpha + p v    p reused straight from the s accumulators as the A operand,
//                          v fragments through ldmatrix.trans
// K and V tiles are double-buffered in shared memory: the copy of tile t + 1 (cp.async)
// overlaps the arithmetic on tile t. Rows are padded by 16 bytes so ldmatrix is conflict-free.
#include "common.cuh"
#include "softmax.cuh"
#include "mma.cuh"

template <typename T, int D_TILE, int BLOCK_N, int WARPS, bool CAUSAL, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32)
flash_fwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
              float* __restrict__ lse, int seqlen_q, int seqlen_k, int headdim, int nheads, int group, i64 q_sb,
              i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss, i64 v_sh, i64 o_sb, i64 o_ss,
              i64 o_sh, float scale) {
    constexpr int BLOCK_M = 16 * WARPS, THREADS = 32 * WARPS, LD = D_TILE + 8;
    constexpr int NT = BLOCK_N / 8, DT = D_TILE / 8;  // 8-wide column tiles of s and of o
    static_assert(D_TILE % 16 == 0 && BLOCK_N % 16 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BLOCK_M * LD;      // [2][BLOCK_N][LD]
    T* sV = sK + 2 * BLOCK_N * LD;  // [2][BLOCK_N][LD]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / group;
    q += b * q_sb + h * q_sh + (i64)m0 * q_ss;
    k += b * k_sb + hk * k_sh;
    v += b * v_sb + hk * v_sh;
    const float scale_log2 = scale * float(LOG2E);

    const int n_tiles = key_tiles_for<CAUSAL>(m0, BLOCK_M, BLOCK_N, seqlen_q, seqlen_k);
    if (n_tiles > 0) {
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(sQ, q, q_ss, seqlen_q - m0, headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, k, k_ss, seqlen_k, headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV, v, v_ss, seqlen_k, headdim);
        cp_async_commit();
    }

    float o[DT][4];
#pragma unroll
    for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    OnlineSoftmax<float> stats[2];  // rows g and g + 8 of this warp
    const int row0 = m0 + warp * 16 + g;

    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = t * BLOCK_N;
        if (t + 1 < n_tiles) {
            const int nb = (t + 1) & 1, n1 = n0 + BLOCK_N;
            load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK + nb * BLOCK_N * LD, k + (i64)n1 * k_ss, k_ss,
                                                                   seqlen_k - n1, headdim);
            load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV + nb * BLOCK_N * LD, v + (i64)n1 * v_ss, v_ss,
                                                                   seqlen_k - n1, headdim);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* cK = sK + (t & 1) * BLOCK_N * LD;
        const T* cV = sV + (t & 1) * BLOCK_N * LD;

        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D_TILE / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, sQ + (warp * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
            for (int nn = 0; nn < NT / 2; ++nn) {
                unsigned bk[4];
                ldmatrix_x4(bk, cK + (nn * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
                mma_16816<T>(s[2 * nn], a, bk[0], bk[1]);
                mma_16816<T>(s[2 * nn + 1], a, bk[2], bk[3]);
            }
        }

        // Only tiles crossing the end of the keys or the causal diagonal need the mask.
        const bool edge = n0 + BLOCK_N > seqlen_k || (CAUSAL && n0 + BLOCK_N - 1 > m0 + seqlen_k - seqlen_q);
        float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + (e / 2) * 8, col = n0 + j * 8 + 2 * tq + (e % 2);
                s[j][e] = edge && masked<CAUSAL>(row, col, seqlen_q, seqlen_k) ? neg_inf<float>() : s[j][e] * scale_log2;
                tile_max[e / 2] = fmax(tile_max[e / 2], s[j][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) alpha[r] = stats[r].rescale(reduce_max<4>(tile_max[r]));
#pragma unroll
        for (int j = 0; j < DT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e / 2];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = stats[e / 2].prob(s[j][e]);
                stats[e / 2].l += s[j][e];
            }

#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
            // The accumulators of two adjacent 8-key tiles form the A fragment of a 16-key step.
            const unsigned pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dd = 0; dd < DT / 2; ++dd) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, cV + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + dd * 16 + (lane / 16) * 8);
                mma_16816<T>(o[2 * dd], pa, bv[0], bv[1]);
                mma_16816<T>(o[2 * dd + 1], pa, bv[2], bv[3]);
            }
        }
        __syncthreads();  // this buffer is refilled two tiles from now
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        const float l = reduce_sum<4>(stats[r].l);
        if (row < seqlen_q) {
            const float inv_l = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gives 0
            T* o_row = out + b * o_sb + (i64)row * o_ss + h * o_sh;
#pragma unroll
            for (int j = 0; j < DT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int d = j * 8 + 2 * tq + e;
                    if (d < headdim) o_row[d] = from_acc<T>(o[j][2 * r + e] * inv_l);
                }
            if (tq == 0) lse[((i64)b * nheads + h) * seqlen_q + row] = stats[r].lse(l);
        }
    }
}
