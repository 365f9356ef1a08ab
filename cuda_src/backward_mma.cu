// Backward pass for float16 / bfloat16 on tensor cores: the dK/dV and dQ kernels of
// backward.cu (same algorithm, same deterministic order, delta from flash_bwd_delta), with
// every product a warp-level mma on 16-row slabs.
//
// dK/dV: one block per (key tile, kv head, batch), each warp owns 16 key rows; query tiles of
// every head of the GQA group stream through shared memory (double-buffered, cp.async):
//   s^T = k q^T, dp^T = v dout^T                 gemm_nt
//   p^T = exp2(s^T scale log2(e) - lse log2(e)),  ds^T = p^T (dp^T - delta)
//   dv += p^T dout, dk += ds^T q                 gemm_rn, p^T and ds^T straight from registers
// dQ: one block per (query tile, head, batch), each warp owns 16 query rows; key tiles stream:
//   s = q k^T, dp = dout v^T, ds = p (dp - delta), dq += ds k
#include "common.cuh"
#include "mma.cuh"

template <typename T, int D_TILE, int BLOCK_M, int WARPS, bool CAUSAL, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32)
flash_bwd_dkdv_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                   T* __restrict__ dk, T* __restrict__ dv, int seqlen_q, int seqlen_k, int headdim, int nheads,
                   int group, i64 q_sb, i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss,
                   i64 v_sh, i64 do_sb, i64 do_ss, i64 do_sh, i64 dk_sb, i64 dk_ss, i64 dk_sh, i64 dv_sb,
                   i64 dv_ss, i64 dv_sh, float scale) {
    constexpr int BLOCK_N = 16 * WARPS, THREADS = 32 * WARPS, LD = D_TILE + 8;
    constexpr int MT = BLOCK_M / 8, DT = D_TILE / 8;
    static_assert(D_TILE % 16 == 0 && BLOCK_M % 16 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BLOCK_N * LD;
    T* sQ = sV + BLOCK_N * LD;       // [2][BLOCK_M][LD]
    T* sdO = sQ + 2 * BLOCK_M * LD;  // [2][BLOCK_M][LD]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * BLOCK_M * LD);  // [2][BLOCK_M], log2 units
    float* sDelta = sLse + 2 * BLOCK_M;                              // [2][BLOCK_M]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int n0 = blockIdx.x * BLOCK_N, hk = blockIdx.y, b = blockIdx.z;
    const float scale_log2 = scale * float(LOG2E);

    // The stream: query tiles m_first.. of head hk * group, then of the next head of the group.
    const int m_first = first_query_tile<CAUSAL>(n0, BLOCK_M, seqlen_q, seqlen_k);
    const int per_head = (seqlen_q + BLOCK_M - 1) / BLOCK_M - m_first;
    const int n_tiles = group * per_head;
    auto load_query_tile = [&](int t, int buf) {
        const int h = hk * group + t / per_head, m0 = (m_first + t % per_head) * BLOCK_M;
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
            sQ + buf * BLOCK_M * LD, q + b * q_sb + h * q_sh + (i64)m0 * q_ss, q_ss, seqlen_q - m0, headdim);
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
            sdO + buf * BLOCK_M * LD, dout + b * do_sb + h * do_sh + (i64)m0 * do_ss, do_ss, seqlen_q - m0, headdim);
        const i64 stats = ((i64)b * nheads + h) * seqlen_q + m0;
        for (int r = threadIdx.x; r < BLOCK_M; r += THREADS) {
            const bool valid = m0 + r < seqlen_q;
            sLse[buf * BLOCK_M + r] = valid ? lse[stats + r] * float(LOG2E) : 0.f;
            sDelta[buf * BLOCK_M + r] = valid ? delta[stats + r] : 0.f;
        }
    };

    if (n_tiles > 0) {  // else no query sees these keys: dk = dv = 0
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, k + b * k_sb + hk * k_sh + (i64)n0 * k_ss, k_ss,
                                                               seqlen_k - n0, headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV, v + b * v_sb + hk * v_sh + (i64)n0 * v_ss, v_ss,
                                                               seqlen_k - n0, headdim);
        load_query_tile(0, 0);
        cp_async_commit();
    }

    float dk_acc[DT][4], dv_acc[DT][4];
    zero(dk_acc);
    zero(dv_acc);
    const int key0 = n0 + warp * 16 + g;

    for (int t = 0; t < n_tiles; ++t) {
        const int buf = t & 1, m0 = (m_first + t % per_head) * BLOCK_M;
        if (t + 1 < n_tiles) {
            load_query_tile(t + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* cQ = sQ + buf * BLOCK_M * LD;
        const T* cdO = sdO + buf * BLOCK_M * LD;
        const float* cLse = sLse + buf * BLOCK_M;
        const float* cDelta = sDelta + buf * BLOCK_M;

        float st[MT][4], dpt[MT][4];
        zero(st);
        zero(dpt);
        gemm_nt<T, D_TILE, BLOCK_M, LD>(st, sK + warp * 16 * LD, cQ, lane);
        gemm_nt<T, D_TILE, BLOCK_M, LD>(dpt, sV + warp * 16 * LD, cdO, lane);

        // Only tiles crossing the end of the queries or keys, or the causal diagonal, need the mask.
        const bool edge = m0 + BLOCK_M > seqlen_q || n0 + BLOCK_N > seqlen_k ||
                          (CAUSAL && n0 + BLOCK_N - 1 > m0 + seqlen_k - seqlen_q);
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = key0 + (e / 2) * 8, im = j * 8 + 2 * tq + (e % 2);
                const float p = edge && masked<CAUSAL>(m0 + im, key, seqlen_q, seqlen_k)
                                    ? 0.f
                                    : fast_exp2(st[j][e] * scale_log2 - cLse[im]);
                st[j][e] = p;
                dpt[j][e] = p * (dpt[j][e] - cDelta[im]);
            }
        gemm_rn<T, BLOCK_M, D_TILE, LD>(dv_acc, st, cdO, lane);
        gemm_rn<T, BLOCK_M, D_TILE, LD>(dk_acc, dpt, cQ, lane);
        __syncthreads();  // this buffer is refilled two tiles from now
    }

    const float dk_scale[2] = {scale, scale}, dv_scale[2] = {1.f, 1.f};
    store_slab(dk + b * dk_sb + hk * dk_sh + (i64)n0 * dk_ss, dk_ss, dk_acc, dk_scale, warp * 16, seqlen_k - n0,
               headdim, lane);
    store_slab(dv + b * dv_sb + hk * dv_sh + (i64)n0 * dv_ss, dv_ss, dv_acc, dv_scale, warp * 16, seqlen_k - n0,
               headdim, lane);
}

template <typename T, int D_TILE, int BLOCK_N, int WARPS, bool CAUSAL, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32)
flash_bwd_dq_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                 T* __restrict__ dq, int seqlen_q, int seqlen_k, int headdim, int nheads, int group, i64 q_sb,
                 i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss, i64 v_sh, i64 do_sb,
                 i64 do_ss, i64 do_sh, i64 dq_sb, i64 dq_ss, i64 dq_sh, float scale) {
    constexpr int BLOCK_M = 16 * WARPS, THREADS = 32 * WARPS, LD = D_TILE + 8;
    constexpr int NT = BLOCK_N / 8, DT = D_TILE / 8;
    static_assert(D_TILE % 16 == 0 && BLOCK_N % 16 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + BLOCK_M * LD;
    T* sK = sdO + BLOCK_M * LD;     // [2][BLOCK_N][LD]
    T* sV = sK + 2 * BLOCK_N * LD;  // [2][BLOCK_N][LD]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / group;
    k += b * k_sb + hk * k_sh;
    v += b * v_sb + hk * v_sh;
    const float scale_log2 = scale * float(LOG2E);

    const int n_tiles = key_tiles_for<CAUSAL>(m0, BLOCK_M, BLOCK_N, seqlen_q, seqlen_k);
    if (n_tiles > 0) {
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(sQ, q + b * q_sb + h * q_sh + (i64)m0 * q_ss, q_ss,
                                                               seqlen_q - m0, headdim);
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
            sdO, dout + b * do_sb + h * do_sh + (i64)m0 * do_ss, do_ss, seqlen_q - m0, headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, k, k_ss, seqlen_k, headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV, v, v_ss, seqlen_k, headdim);
        cp_async_commit();
    }

    const int row0 = m0 + warp * 16 + g;
    float lse2[2], delta_row[2];  // rows g and g + 8 of this warp
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        const i64 stat = ((i64)b * nheads + h) * seqlen_q + row;
        lse2[r] = row < seqlen_q ? lse[stat] * float(LOG2E) : 0.f;
        delta_row[r] = row < seqlen_q ? delta[stat] : 0.f;
    }
    float dq_acc[DT][4];
    zero(dq_acc);

    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = t * BLOCK_N;
        next_kv_tile<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, sV, k, v, k_ss, v_ss, t, n_tiles, seqlen_k, headdim);
        const T* cK = sK + (t & 1) * BLOCK_N * LD;
        const T* cV = sV + (t & 1) * BLOCK_N * LD;

        float s[NT][4], dp[NT][4];
        zero(s);
        zero(dp);
        gemm_nt<T, D_TILE, BLOCK_N, LD>(s, sQ + warp * 16 * LD, cK, lane);
        gemm_nt<T, D_TILE, BLOCK_N, LD>(dp, sdO + warp * 16 * LD, cV, lane);

        const bool edge = n0 + BLOCK_N > seqlen_k || (CAUSAL && n0 + BLOCK_N - 1 > m0 + seqlen_k - seqlen_q);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + (e / 2) * 8, col = n0 + j * 8 + 2 * tq + (e % 2);
                const float p = edge && masked<CAUSAL>(row, col, seqlen_q, seqlen_k)
                                    ? 0.f
                                    : fast_exp2(s[j][e] * scale_log2 - lse2[e / 2]);
                s[j][e] = p * (dp[j][e] - delta_row[e / 2]);  // ds
            }
        gemm_rn<T, BLOCK_N, D_TILE, LD>(dq_acc, s, cK, lane);
        __syncthreads();  // this buffer is refilled two tiles from now
    }

    const float dq_scale[2] = {scale, scale};
    store_slab(dq + b * dq_sb + h * dq_sh + (i64)m0 * dq_ss, dq_ss, dq_acc, dq_scale, warp * 16, seqlen_q - m0,
               headdim, lane);
}
