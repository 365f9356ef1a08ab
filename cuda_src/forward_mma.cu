// Forward pass for float16 / bfloat16 on tensor cores (FlashAttention-2 partitioning).
//
// One block per (query tile, head, batch); each warp owns MT slabs of 16 query rows (every K/V
// fragment read from shared memory feeds all of them). Per key tile:
//   s = q k^T              gemm_nt (mma.sync m16n8k16, fragments through ldmatrix)
//   online softmax         in registers, on the s accumulators (rows g and g + 8 of each slab,
//                          each row split over the 4 lanes of a quad)
//   o = o * alpha + p v    gemm_rn: p straight from the s accumulators as the A operand
// K and V tiles are double-buffered in shared memory: the copy of tile t + 1 (cp.async)
// overlaps the arithmetic on tile t. Rows are padded by 16 bytes so ldmatrix is conflict-free.
#include "common.cuh"
#include "softmax.cuh"
#include "mma.cuh"

template <typename T, int D_TILE, int BLOCK_N, int WARPS, int MT, bool CAUSAL, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32)
flash_fwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
              float* __restrict__ lse, int seqlen_q, int seqlen_k, int headdim, int nheads, int group, i64 q_sb,
              i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss, i64 v_sh, i64 o_sb, i64 o_ss,
              i64 o_sh, float scale) {
    constexpr int WARP_ROWS = 16 * MT, BLOCK_M = WARP_ROWS * WARPS, THREADS = 32 * WARPS, LD = D_TILE + 8;
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

    float o[MT][DT][4];
    zero(o);
    OnlineSoftmax<float> stats[MT][2];  // rows g and g + 8 of each slab
    const int row0 = m0 + warp * WARP_ROWS + g;

    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = t * BLOCK_N;
        next_kv_tile<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, sV, k, v, k_ss, v_ss, t, n_tiles, seqlen_k, headdim);
        const T* cK = sK + (t & 1) * BLOCK_N * LD;
        const T* cV = sV + (t & 1) * BLOCK_N * LD;

        float s[MT][NT][4];
        zero(s);
        gemm_nt<T, D_TILE, BLOCK_N, LD>(s, sQ + warp * WARP_ROWS * LD, cK, lane);

        // Only tiles crossing the end of the keys or the causal diagonal need the mask.
        const bool edge = n0 + BLOCK_N > seqlen_k || (CAUSAL && n0 + BLOCK_N - 1 > m0 + seqlen_k - seqlen_q);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = row0 + 16 * mt + (e / 2) * 8, col = n0 + j * 8 + 2 * tq + (e % 2);
                    s[mt][j][e] = edge && masked<CAUSAL>(row, col, seqlen_q, seqlen_k) ? neg_inf<float>()
                                                                                      : s[mt][j][e] * scale_log2;
                    tile_max[e / 2] = fmax(tile_max[e / 2], s[mt][j][e]);
                }
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) alpha[r] = stats[mt][r].rescale(reduce_max<4>(tile_max[r]));
#pragma unroll
            for (int j = 0; j < DT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[mt][j][e] *= alpha[e / 2];
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[mt][j][e] = stats[mt][e / 2].prob(s[mt][j][e]);
                    stats[mt][e / 2].l += s[mt][j][e];
                }
        }

        gemm_rn<T, BLOCK_N, D_TILE, LD>(o, s, cV, lane);
        __syncthreads();  // this buffer is refilled two tiles from now
    }

    float inv_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = reduce_sum<4>(stats[mt][r].l);
            inv_l[mt][r] = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gives 0
            const int row = row0 + 16 * mt + 8 * r;
            if (tq == 0 && row < seqlen_q) lse[((i64)b * nheads + h) * seqlen_q + row] = stats[mt][r].lse(l);
        }
    store_slab(out + b * o_sb + h * o_sh + (i64)m0 * o_ss, o_ss, o, inv_l, warp * WARP_ROWS, seqlen_q - m0, headdim,
               lane);
}
