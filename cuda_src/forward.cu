// Forward pass on CUDA cores, exact in the accumulation type: float32 (no TF32) and float64.
//
// One block per (query tile, head, batch). Thread (r, c) of the block owns query row r and
// the columns c, c + TPR, c + 2 TPR, ... of that row, where TPR = THREADS / BLOCK_M threads
// share a row; they are consecutive lanes of one warp, so row statistics reduce by shuffles.
// K and V tiles of the band the variant allows stream through shared memory; m (running max, log2
// units), l (running sum) and the output accumulator o live in registers.
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"

template <typename T, int D_TILE, int BLOCK_M, int BLOCK_N, int THREADS, typename Var>
__global__ void __launch_bounds__(THREADS) flash_fwd_simt(const __grid_constant__ FwdParams p) {
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

    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
    const int r = threadIdx.x / TPR, c = threadIdx.x % TPR, i = m0 + r;
    const Sequence seq = sequence<Var::packed>(p, b);
    if (m0 >= seq.seqlen_q) return;  // a packed sequence shorter than the longest
    const Var var = variant_of<Var>(p, seq, b, h);
    const T* q = seq.query_rows(static_cast<const T*>(p.q), p.q_st, h, 0);
    const T* k = seq.key_rows(static_cast<const T*>(p.k), p.k_st, hk, 0);
    const T* v = seq.key_rows(static_cast<const T*>(p.v), p.v_st, hk, 0);
    const A scale_log2 = A(p.scale) * A(LOG2E);

    load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sQ, q + (i64)m0 * p.q_st.s, p.q_st.s, 0, seq.seqlen_q - m0, p.headdim);

    A o[COLS_D];
#pragma unroll
    for (int j = 0; j < COLS_D; ++j) o[j] = A(0);
    OnlineSoftmax<A> stats;

    int t_first, t_last;
    var.template key_tiles<BLOCK_M, BLOCK_N>(m0, t_first, t_last);
    for (int t = t_first; t < t_last; ++t) {
        const int n0 = t * BLOCK_N;
        __syncthreads();  // previous tile fully consumed
        const TileKind kind = var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
        if (kind == SKIP) continue;
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sK, k + (i64)n0 * p.k_st.s, p.k_st.s, 0, seq.seqlen_k - n0, p.headdim);
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sV, v + (i64)n0 * p.v_st.s, p.v_st.s, 0, seq.seqlen_k - n0, p.headdim);
        __syncthreads();

        // s = q_i . k_j for this thread's keys j = n0 + c + TPR * jj.
        A s[COLS_N];
#pragma unroll
        for (int jj = 0; jj < COLS_N; ++jj) s[jj] = A(0);
#pragma unroll 4
        for (int d = 0; d < D_TILE; ++d) {
            const A qd = sQ[r * LD + d];
#pragma unroll
            for (int jj = 0; jj < COLS_N; ++jj) s[jj] += qd * sK[(c + TPR * jj) * LD + d];
        }

        const bool needs_mask = kind != INTERIOR;
        // A scaled product leaves its scale to the exponent's FMA (as TileScores does): one rounding, of
        // the difference from the row's max, where x = s scale would round every score by |x| eps.
        const A product_scale = Var::scaled_product ? A(1) : scale_log2, exp_scale = scale_log2 / product_scale;
        auto softmax_step = [&](auto check, const Var& v) {
            constexpr bool CHECK = decltype(check)::value;
            A tile_max = neg_inf<A>();
#pragma unroll
            for (int jj = 0; jj < COLS_N; ++jj) {
                s[jj] = v.template score<CHECK, sizeof(T) == 2>(s[jj], product_scale, i, n0 + c + TPR * jj);
                tile_max = fmax(tile_max, s[jj]);
            }
            const A alpha = stats.rescale(reduce_max<TPR>(tile_max) * exp_scale);
#pragma unroll
            for (int j = 0; j < COLS_D; ++j) o[j] *= alpha;
#pragma unroll
            for (int jj = 0; jj < COLS_N; ++jj) {
                A pr = stats.template prob<CHECK>(s[jj], exp_scale);
                stats.l += pr;
                if (Var::dropout) pr *= v.keep(i, n0 + c + TPR * jj) ? A(v.dropout_scale) : A(0);
                sP[r * (BLOCK_N + 1) + c + TPR * jj] = pr;
            }
        };
        check_tile(kind, var, softmax_step);
        __syncwarp();  // the TPR threads of a row share its p through shared memory

        if (Var::hides_keys && needs_mask && seq.keys_nonfinite(p.v_nonfinite, p, hk, n0, BLOCK_N)) {
            for (int n = 0; n < BLOCK_N; ++n) {  // masked keys' values must not reach this row
                const A pr = sP[r * (BLOCK_N + 1) + n];
                if (is_masked_zero(pr)) continue;
#pragma unroll
                for (int j = 0; j < COLS_D; ++j) o[j] += pr * sV[n * LD + c + TPR * j];
            }
        } else {
            for (int n = 0; n < BLOCK_N; ++n) {
                const A pr = sP[r * (BLOCK_N + 1) + n];
#pragma unroll
                for (int j = 0; j < COLS_D; ++j) o[j] += pr * sV[n * LD + c + TPR * j];
            }
        }
    }

    const A l = reduce_sum<TPR>(stats.l);
    if (i < seq.seqlen_q) {
        const auto end = stats.end(l, sink_log2<A>(p.var, h));
        T* o_row = seq.query_rows(static_cast<T*>(p.out), p.o_st, h, i);
#pragma unroll
        for (int j = 0; j < COLS_D; ++j) {
            const int d = c + TPR * j;
            if (d < p.headdim) o_row[d] = from_acc<T>(o[j] * end.o_factor);
        }
        if (c == 0) static_cast<A*>(p.lse)[seq.stat_row0(p, h) + i] = end.lse;
    }
}
