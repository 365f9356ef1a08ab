// Forward pass on CUDA cores, exact in the accumulation type: float32 (no TF32) and float64.
//
// One block per (query tile, head, batch). Thread (r, c) of the block owns query row r and
// the columns c, c + TPR, c + 2 TPR, ... of that row, where TPR = THREADS / BLOCK_M threads
// share a row; they are consecutive lanes of one warp, so row statistics reduce by shuffles.
// K and V tiles stream through shared memory; m (running max, log2 units), l (running sum)
// and the output accumulator o live in registers.
#include "common.cuh"
#include "softmax.cuh"

template <typename T, int D_TILE, int BLOCK_M, int BLOCK_N, int THREADS, bool CAUSAL>
__global__ void __launch_bounds__(THREADS)
flash_fwd_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
               typename Acc<T>::type* __restrict__ lse, int seqlen_q, int seqlen_k, int headdim, int nheads,
               int group, i64 q_sb, i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss,
               i64 v_sh, i64 o_sb, i64 o_ss, i64 o_sh, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    constexpr int TPR = THREADS / BLOCK_M;
    constexpr int LD = D_TILE + 1;  // odd row stride: column walks hit distinct banks
    constexpr int COLS_D = D_TILE / TPR, COLS_N = BLOCK_N / TPR;
    static_assert(THREADS % BLOCK_M == 0 && D_TILE % TPR == 0 && BLOCK_N % TPR == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sQ = reinterpret_cast<A*>(smem_raw);
    A* sK = sQ + BLOCK_M * LD;
    A* sV = sK + BLOCK_N * LD;
    A* sP = sV + BLOCK_N * LD;  // [BLOCK_M][BLOCK_N + 1]

    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / group;
    const int r = threadIdx.x / TPR, c = threadIdx.x % TPR, i = m0 + r;
    q += b * q_sb + h * q_sh;
    k += b * k_sb + hk * k_sh;
    v += b * v_sb + hk * v_sh;
    const A scale_log2 = scale * A(LOG2E);

    load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sQ, q + (i64)m0 * q_ss, q_ss, 0, seqlen_q - m0, headdim);

    A o[COLS_D];
#pragma unroll
    for (int j = 0; j < COLS_D; ++j) o[j] = A(0);
    OnlineSoftmax<A> stats;

    const int n_tiles = key_tiles_for<CAUSAL>(m0, BLOCK_M, BLOCK_N, seqlen_q, seqlen_k);
    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = t * BLOCK_N;
        __syncthreads();  // previous tile fully consumed
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sK, k + (i64)n0 * k_ss, k_ss, 0, seqlen_k - n0, headdim);
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sV, v + (i64)n0 * v_ss, v_ss, 0, seqlen_k - n0, headdim);
        __syncthreads();

        // s = (q_i . k_j) * scale * log2(e) for this thread's keys j = n0 + c + TPR * jj.
        A s[COLS_N];
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj) s[jj] = A(0);
#pragma unroll 4
        for (int d = 0; d < D_TILE; ++d) {
            const A qd = sQ[r * LD + d];
#pragma unroll
            for (int jj = 0; jj < COLS_N; ++jj) s[jj] += qd * sK[(c + TPR * jj) * LD + d];
        }
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj)
            s[jj] = masked<CAUSAL>(i, n0 + c + TPR * jj, seqlen_q, seqlen_k) ? neg_inf<A>() : s[jj] * scale_log2;

        A tile_max = neg_inf<A>();
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj) tile_max = fmax(tile_max, s[jj]);
        const A alpha = stats.rescale(reduce_max<TPR>(tile_max));
#pragma unroll
        for (int j = 0; j < COLS_D; ++j) o[j] *= alpha;
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj) {
            const A p = stats.prob(s[jj]);
            stats.l += p;
            sP[r * (BLOCK_N + 1) + c + TPR * jj] = p;
        }
        __syncwarp();  // the TPR threads of a row share its p through shared memory

        for (int n = 0; n < BLOCK_N; ++n) {
            const A p = sP[r * (BLOCK_N + 1) + n];
#pragma unroll
            for (int j = 0; j < COLS_D; ++j) o[j] += p * sV[n * LD + c + TPR * j];
        }
    }

    const A l = reduce_sum<TPR>(stats.l);
    if (i < seqlen_q) {
        const A inv_l = l > A(0) ? A(1) / l : A(0);  // a row that sees no key gives 0
        T* o_row = out + b * o_sb + (i64)i * o_ss + h * o_sh;
#pragma unroll
        for (int j = 0; j < COLS_D; ++j) {
            const int d = c + TPR * j;
            if (d < headdim) o_row[d] = from_acc<T>(o[j] * inv_l);
        }
        if (c == 0) lse[((i64)b * nheads + h) * seqlen_q + i] = stats.lse(l);
    }
}
