// Backward pass, in three kernels that follow FlashAttention-2:
//   1. delta = rowsum(dout * out)                                   (flash_bwd_delta)
//   2. per key tile, loop over query tiles (and the query heads of a GQA group):
//      p = exp(s - lse), dv += p^T dout, dp = dout v^T, ds = p (dp - delta), dk += ds^T q
//                                                                    (flash_bwd_dkdv_simt)
//   3. per query tile, loop over key tiles: dq += ds k                (flash_bwd_dq_simt)
// dQ gets its own pass instead of atomics, so every gradient is summed in a fixed order and
// the backward is bitwise deterministic. Probabilities are recomputed from lse; nothing of
// size seqlen_q x seqlen_k is ever stored.
//
// Thread layout as in forward.cu: TPR = THREADS / ROWS consecutive lanes share one row of
// the block's own tile (key rows in dK/dV, query rows in dQ).
#include "common.cuh"
#include "softmax.cuh"

// One warp per (batch, head, query row).
template <typename T>
__global__ void __launch_bounds__(128)
flash_bwd_delta(const T* __restrict__ dout, const T* __restrict__ out, typename Acc<T>::type* __restrict__ delta,
                int batch, int seqlen_q, int headdim, int nheads, i64 do_sb, i64 do_ss, i64 do_sh, i64 o_sb, i64 o_ss,
                i64 o_sh) {
    typedef typename Acc<T>::type A;
    const i64 row = (i64)blockIdx.x * 4 + threadIdx.x / 32;
    if (row >= (i64)batch * nheads * seqlen_q) return;
    const int i = (int)(row % seqlen_q), h = (int)((row / seqlen_q) % nheads), b = (int)(row / seqlen_q / nheads);
    const T* dor = dout + b * do_sb + (i64)i * do_ss + h * do_sh;
    const T* orow = out + b * o_sb + (i64)i * o_ss + h * o_sh;
    A acc = A(0);
    for (int d = threadIdx.x % 32; d < headdim; d += 32) acc += to_acc(dor[d]) * to_acc(orow[d]);
    acc = reduce_sum<32>(acc);
    if (threadIdx.x % 32 == 0) delta[row] = acc;
}

template <typename T, int D_TILE, int BLOCK_M, int BLOCK_N, int THREADS, bool CAUSAL>
__global__ void __launch_bounds__(THREADS)
flash_bwd_dkdv_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ dout, const typename Acc<T>::type* __restrict__ lse,
                    const typename Acc<T>::type* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                    int seqlen_q, int seqlen_k, int headdim, int nheads, int group, i64 q_sb, i64 q_ss, i64 q_sh,
                    i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss, i64 v_sh, i64 do_sb, i64 do_ss, i64 do_sh,
                    i64 dk_sb, i64 dk_ss, i64 dk_sh, i64 dv_sb, i64 dv_ss, i64 dv_sh,
                    typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    constexpr int TPR = THREADS / BLOCK_N;
    constexpr int LD = D_TILE + 1, LDP = BLOCK_M + 1;
    constexpr int COLS_D = D_TILE / TPR, COLS_M = BLOCK_M / TPR;
    static_assert(THREADS % BLOCK_N == 0 && D_TILE % TPR == 0 && BLOCK_M % TPR == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sK = reinterpret_cast<A*>(smem_raw);
    A* sV = sK + BLOCK_N * LD;
    A* sQ = sV + BLOCK_N * LD;
    A* sdO = sQ + BLOCK_M * LD;
    A* sP = sdO + BLOCK_M * LD;   // [BLOCK_N][BLOCK_M + 1], p transposed
    A* sdS = sP + BLOCK_N * LDP;  // [BLOCK_N][BLOCK_M + 1], ds transposed
    A* sLse = sdS + BLOCK_N * LDP;
    A* sDelta = sLse + BLOCK_M;

    const int n0 = blockIdx.x * BLOCK_N, hk = blockIdx.y, b = blockIdx.z;
    const int r = threadIdx.x / TPR, c = threadIdx.x % TPR, j = n0 + r;
    const A scale_log2 = scale * A(LOG2E);

    load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sK, k + b * k_sb + hk * k_sh + (i64)n0 * k_ss, k_ss, 0,
                                                seqlen_k - n0, headdim);
    load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sV, v + b * v_sb + hk * v_sh + (i64)n0 * v_ss, v_ss, 0,
                                                seqlen_k - n0, headdim);

    A dk_acc[COLS_D], dv_acc[COLS_D];
#pragma unroll
    for (int jd = 0; jd < COLS_D; ++jd) dk_acc[jd] = dv_acc[jd] = A(0);

    const int m_first = first_query_tile<CAUSAL>(n0, BLOCK_M, seqlen_q, seqlen_k);
    const int m_tiles = (seqlen_q + BLOCK_M - 1) / BLOCK_M;
    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        const T* qh = q + b * q_sb + h * q_sh;
        const T* doh = dout + b * do_sb + h * do_sh;
        const A* lse_h = lse + ((i64)b * nheads + h) * seqlen_q;
        const A* delta_h = delta + ((i64)b * nheads + h) * seqlen_q;
        for (int mt = m_first; mt < m_tiles; ++mt) {
            const int m0 = mt * BLOCK_M;
            __syncthreads();  // previous query tile fully consumed
            load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sQ, qh + (i64)m0 * q_ss, q_ss, 0, seqlen_q - m0, headdim);
            load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sdO, doh + (i64)m0 * do_ss, do_ss, 0, seqlen_q - m0,
                                                        headdim);
            load_rows<BLOCK_M, THREADS>(sLse, lse_h + m0, 0, seqlen_q - m0, A(0));
            load_rows<BLOCK_M, THREADS>(sDelta, delta_h + m0, 0, seqlen_q - m0, A(0));
            __syncthreads();

            A s[COLS_M], dp[COLS_M];
#pragma unroll
            for (int mm = 0; mm < COLS_M; ++mm) s[mm] = dp[mm] = A(0);
#pragma unroll 4
            for (int d = 0; d < D_TILE; ++d) {
                const A kd = sK[r * LD + d], vd = sV[r * LD + d];
#pragma unroll
                for (int mm = 0; mm < COLS_M; ++mm) {
                    s[mm] += kd * sQ[(c + TPR * mm) * LD + d];
                    dp[mm] += vd * sdO[(c + TPR * mm) * LD + d];
                }
            }
#pragma unroll
            for (int mm = 0; mm < COLS_M; ++mm) {
                const int im = c + TPR * mm;
                const A p = masked<CAUSAL>(m0 + im, j, seqlen_q, seqlen_k)
                                ? A(0)
                                : fast_exp2(s[mm] * scale_log2 - sLse[im] * A(LOG2E));
                sP[r * LDP + im] = p;
                sdS[r * LDP + im] = p * (dp[mm] - sDelta[im]);
            }
            __syncwarp();  // the TPR threads of a key row share its p and ds

            for (int im = 0; im < BLOCK_M; ++im) {
                const A p = sP[r * LDP + im], ds = sdS[r * LDP + im];
#pragma unroll
                for (int jd = 0; jd < COLS_D; ++jd) {
                    dv_acc[jd] += p * sdO[im * LD + c + TPR * jd];
                    dk_acc[jd] += ds * sQ[im * LD + c + TPR * jd];
                }
            }
        }
    }

    if (j < seqlen_k) {
        T* dk_row = dk + b * dk_sb + (i64)j * dk_ss + hk * dk_sh;
        T* dv_row = dv + b * dv_sb + (i64)j * dv_ss + hk * dv_sh;
#pragma unroll
        for (int jd = 0; jd < COLS_D; ++jd) {
            const int d = c + TPR * jd;
            if (d < headdim) {
                dk_row[d] = from_acc<T>(dk_acc[jd] * scale);
                dv_row[d] = from_acc<T>(dv_acc[jd]);
            }
        }
    }
}

template <typename T, int D_TILE, int BLOCK_M, int BLOCK_N, int THREADS, bool CAUSAL>
__global__ void __launch_bounds__(THREADS)
flash_bwd_dq_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const T* __restrict__ dout, const typename Acc<T>::type* __restrict__ lse,
                  const typename Acc<T>::type* __restrict__ delta, T* __restrict__ dq, int seqlen_q, int seqlen_k,
                  int headdim, int nheads, int group, i64 q_sb, i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh,
                  i64 v_sb, i64 v_ss, i64 v_sh, i64 do_sb, i64 do_ss, i64 do_sh, i64 dq_sb, i64 dq_ss, i64 dq_sh,
                  typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    constexpr int TPR = THREADS / BLOCK_M;
    constexpr int LD = D_TILE + 1, LDS = BLOCK_N + 1;
    constexpr int COLS_D = D_TILE / TPR, COLS_N = BLOCK_N / TPR;
    static_assert(THREADS % BLOCK_M == 0 && D_TILE % TPR == 0 && BLOCK_N % TPR == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sQ = reinterpret_cast<A*>(smem_raw);
    A* sdO = sQ + BLOCK_M * LD;
    A* sK = sdO + BLOCK_M * LD;
    A* sV = sK + BLOCK_N * LD;
    A* sdS = sV + BLOCK_N * LD;  // [BLOCK_M][BLOCK_N + 1]

    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / group;
    const int r = threadIdx.x / TPR, c = threadIdx.x % TPR, i = m0 + r;
    const A scale_log2 = scale * A(LOG2E);
    k += b * k_sb + hk * k_sh;
    v += b * v_sb + hk * v_sh;

    load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sQ, q + b * q_sb + h * q_sh + (i64)m0 * q_ss, q_ss, 0,
                                                seqlen_q - m0, headdim);
    load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sdO, dout + b * do_sb + h * do_sh + (i64)m0 * do_ss, do_ss, 0,
                                                seqlen_q - m0, headdim);
    const i64 stat = ((i64)b * nheads + h) * seqlen_q + i;
    const A lse2 = i < seqlen_q ? lse[stat] * A(LOG2E) : A(0);
    const A delta_i = i < seqlen_q ? delta[stat] : A(0);

    A dq_acc[COLS_D];
#pragma unroll
    for (int jd = 0; jd < COLS_D; ++jd) dq_acc[jd] = A(0);

    const int n_tiles = key_tiles_for<CAUSAL>(m0, BLOCK_M, BLOCK_N, seqlen_q, seqlen_k);
    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = t * BLOCK_N;
        __syncthreads();  // previous key tile fully consumed
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sK, k + (i64)n0 * k_ss, k_ss, 0, seqlen_k - n0, headdim);
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sV, v + (i64)n0 * v_ss, v_ss, 0, seqlen_k - n0, headdim);
        __syncthreads();

        A s[COLS_N], dp[COLS_N];
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj) s[jj] = dp[jj] = A(0);
#pragma unroll 4
        for (int d = 0; d < D_TILE; ++d) {
            const A qd = sQ[r * LD + d], dod = sdO[r * LD + d];
#pragma unroll
            for (int jj = 0; jj < COLS_N; ++jj) {
                s[jj] += qd * sK[(c + TPR * jj) * LD + d];
                dp[jj] += dod * sV[(c + TPR * jj) * LD + d];
            }
        }
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj) {
            const int jn = c + TPR * jj;
            const A p = masked<CAUSAL>(i, n0 + jn, seqlen_q, seqlen_k) ? A(0) : fast_exp2(s[jj] * scale_log2 - lse2);
            sdS[r * LDS + jn] = p * (dp[jj] - delta_i);
        }
        __syncwarp();  // the TPR threads of a query row share its ds

        for (int n = 0; n < BLOCK_N; ++n) {
            const A ds = sdS[r * LDS + n];
#pragma unroll
            for (int jd = 0; jd < COLS_D; ++jd) dq_acc[jd] += ds * sK[n * LD + c + TPR * jd];
        }
    }

    if (i < seqlen_q) {
        T* dq_row = dq + b * dq_sb + (i64)i * dq_ss + h * dq_sh;
#pragma unroll
        for (int jd = 0; jd < COLS_D; ++jd) {
            const int d = c + TPR * jd;
            if (d < headdim) dq_row[d] = from_acc<T>(dq_acc[jd] * scale);
        }
    }
}
