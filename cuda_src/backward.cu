// Backward pass, in three kernels that follow FlashAttention-2:
//   1. delta = rowsum(dout * out)                                   (flash_bwd_delta)
//   2. per key tile, loop over the query tiles of the band (and the query heads of a GQA group):
//      p = exp(score - lse) (dropped: pd = p keep / (1 - p_drop)), dv += pd^T dout,
//      dp = dout v^T (dropped likewise), ds = p (dp - delta), dx = ds dcap (softcap), dk += dx^T q
//                                                                    (flash_bwd_dkdv_simt)
//   3. per query tile, loop over key tiles: dq += dx k, dbias += ds  (flash_bwd_dq_simt)
// Wide inputs renormalize the recomputed probabilities (mask.cuh, row_renormalizer): step 3 runs before
// step 2, sums each row's, scales dq by the row's factor and leaves it in row_scale for step 2.
// dQ gets its own pass instead of atomics, so dq, dk and dv are summed in a fixed order and
// bitwise deterministic. Probabilities are recomputed from lse; nothing of size
// seqlen_q x seqlen_k is ever stored.
//
// Thread layout as in forward.cu: TPR = THREADS / ROWS consecutive lanes share one row of
// the block's own tile (key rows in dK/dV, query rows in dQ).
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"

// One warp per (batch entry, head, query row), delta in lse's layout: a packed batch is one entry of all
// its rows. ZERO_DQ also zeroes the row of dq, for a dK/dV pass that adds dq with atomics (backward_mma.cu).
template <typename T, bool ZERO_DQ>
__global__ void __launch_bounds__(128) flash_bwd_delta(const __grid_constant__ BwdParams p) {
    typedef typename Acc<T>::type A;
    const FwdParams& f = p.fwd;
    if (gated_off(f)) return;
    const i64 row = (i64)blockIdx.x * 4 + threadIdx.x / 32;
    if (row >= (i64)(f.cu_seqlens_q ? 1 : p.batch) * f.nheads * f.total_q) return;
    const int i = (int)(row % f.total_q), h = (int)((row / f.total_q) % f.nheads),
              b = (int)(row / f.total_q / f.nheads);
    const T* dor = static_cast<const T*>(p.dout) + b * p.do_st.b + (i64)i * p.do_st.s + h * p.do_st.h;
    const T* orow = static_cast<const T*>(f.out) + b * f.o_st.b + (i64)i * f.o_st.s + h * f.o_st.h;
    A acc = A(0);
    add_row_dot<32, 1>(acc, dor, orow, f.headdim, threadIdx.x % 32);
    acc = reduce_sum<32>(acc);
    if (threadIdx.x % 32 == 0) static_cast<A*>(p.delta)[b * f.lse_sb + h * f.lse_sh + i] = acc;
    if constexpr (ZERO_DQ) {
        T* dqr = static_cast<T*>(p.dq) + b * p.dq_st.b + (i64)i * p.dq_st.s + h * p.dq_st.h;
        for (int d = threadIdx.x % 32; d < f.headdim; d += 32) dqr[d] = T(0);
    }
}

template <typename T, int D_TILE, int BLOCK_M, int BLOCK_N, int THREADS, typename Var>
__global__ void __launch_bounds__(THREADS) flash_bwd_dkdv_simt(const __grid_constant__ BwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr bool APPROX = sizeof(T) == 2;
    constexpr int TPR = THREADS / BLOCK_N;
    constexpr int LD = D_TILE + 1, LDP = BLOCK_M + 1;
    constexpr int COLS_D = D_TILE / TPR, COLS_M = BLOCK_M / TPR;
    static_assert(THREADS % BLOCK_N == 0 && D_TILE % TPR == 0 && BLOCK_M % TPR == 0, "tile shape");
    const FwdParams& f = p.fwd;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sK = reinterpret_cast<A*>(smem_raw);
    A* sV = sK + BLOCK_N * LD;
    A* sQ = sV + BLOCK_N * LD;
    A* sdO = sQ + BLOCK_M * LD;
    A* sP = sdO + BLOCK_M * LD;   // [BLOCK_N][BLOCK_M + 1], pd transposed
    A* sdX = sP + BLOCK_N * LDP;  // [BLOCK_N][BLOCK_M + 1], dx transposed
    A* sLse = sdX + BLOCK_N * LDP;
    A* sDelta = sLse + BLOCK_M;
    A* sScale = sDelta + BLOCK_M;  // wide inputs only

    const int n0 = blockIdx.x * BLOCK_N, hk = blockIdx.y, b = blockIdx.z;
    const int r = threadIdx.x / TPR, c = threadIdx.x % TPR, j = n0 + r;
    const A scale_log2 = A(f.scale) * A(LOG2E);
    const Sequence seq = sequence<Var::packed>(f, b);
    if (n0 >= seq.seqlen_k) return;  // a packed sequence shorter than the longest

    load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sK, seq.key_rows(static_cast<const T*>(f.k), f.k_st, hk, n0), f.k_st.s,
                                                0, seq.seqlen_k - n0, f.headdim);
    load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sV, seq.key_rows(static_cast<const T*>(f.v), f.v_st, hk, n0), f.v_st.s,
                                                0, seq.seqlen_k - n0, f.headdim);

    A dk_acc[COLS_D], dv_acc[COLS_D];
#pragma unroll
    for (int jd = 0; jd < COLS_D; ++jd) dk_acc[jd] = dv_acc[jd] = A(0);

    for (int g = 0; g < f.group; ++g) {
        const int h = hk * f.group + g;
        const Var var = variant_of<Var>(f, seq, b, h);
        int t_first, t_last;
        var.template query_tiles<BLOCK_M, BLOCK_N>(n0, t_first, t_last);
        const T* qh = seq.query_rows(static_cast<const T*>(f.q), f.q_st, h, 0);
        const T* doh = seq.query_rows(static_cast<const T*>(p.dout), p.do_st, h, 0);
        const A* lse_h = static_cast<const A*>(f.lse) + seq.stat_row0(f, h);
        const A* delta_h = static_cast<const A*>(p.delta) + seq.stat_row0(f, h);
        const A* scale_h = APPROX ? nullptr : static_cast<const A*>(p.row_scale) + seq.stat_row0(f, h);
        for (int mt = t_first; mt < t_last; ++mt) {
            const int m0 = mt * BLOCK_M;
            __syncthreads();  // previous query tile fully consumed
            const TileKind kind = var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
            if (kind == SKIP) continue;
            load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sQ, qh + (i64)m0 * f.q_st.s, f.q_st.s, 0, seq.seqlen_q - m0,
                                                        f.headdim);
            load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sdO, doh + (i64)m0 * p.do_st.s, p.do_st.s, 0,
                                                        seq.seqlen_q - m0, f.headdim);
            for (int x = threadIdx.x; x < BLOCK_M; x += THREADS) {
                const bool valid = m0 + x < seq.seqlen_q;
                sLse[x] = valid ? lse_log2(lse_h[m0 + x]) : A(0);
                sDelta[x] = valid ? delta_h[m0 + x] : A(0);
                if constexpr (!APPROX) sScale[x] = valid ? scale_h[m0 + x] : A(1);
            }
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
            const bool needs_mask = kind != INTERIOR;
            auto pairs = [&](auto check, const Var& v) {
                constexpr bool CHECK = decltype(check)::value;
#pragma unroll
                for (int mm = 0; mm < COLS_M; ++mm) {
                    const int im = c + TPR * mm;
                    A pd, ds, dx;
                    pair_backward<CHECK, APPROX>(v, s[mm], dp[mm], scale_log2, sLse[im], APPROX ? A(1) : sScale[im],
                                                 sDelta[im], m0 + im, j, Var::dropout && v.keep(m0 + im, j), pd, ds, dx);
                    sP[r * LDP + im] = pd;
                    sdX[r * LDP + im] = dx;
                }
            };
            check_tile(kind, var, pairs);
            __syncwarp();  // the TPR threads of a key row share its pd and dx

            const bool guard = Var::hides_keys && needs_mask &&
                               (seq.queries_nonfinite(p.q_nonfinite, f, h, m0, BLOCK_M) ||
                                seq.queries_nonfinite(p.do_nonfinite, f, h, m0, BLOCK_M));
            for (int im = 0; im < BLOCK_M; ++im) {
                const A pd = sP[r * LDP + im], dx = sdX[r * LDP + im];
                if (guard && is_masked_zero(pd)) continue;  // masked queries' data must not reach this key
#pragma unroll
                for (int jd = 0; jd < COLS_D; ++jd) {
                    dv_acc[jd] += pd * sdO[im * LD + c + TPR * jd];
                    dk_acc[jd] += dx * sQ[im * LD + c + TPR * jd];
                }
            }
        }
    }

    if (j < seq.seqlen_k) {
        T* dk_row = seq.key_rows(static_cast<T*>(p.dk), p.dk_st, hk, j);
        T* dv_row = seq.key_rows(static_cast<T*>(p.dv), p.dv_st, hk, j);
#pragma unroll
        for (int jd = 0; jd < COLS_D; ++jd) {
            const int d = c + TPR * jd;
            if (d < f.headdim) {
                dk_row[d] = from_acc<T>(dk_acc[jd] * A(f.scale));
                dv_row[d] = from_acc<T>(dv_acc[jd]);
            }
        }
    }
}

template <typename T, int D_TILE, int BLOCK_M, int BLOCK_N, int THREADS, typename Var>
__global__ void __launch_bounds__(THREADS) flash_bwd_dq_simt(const __grid_constant__ BwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr bool APPROX = sizeof(T) == 2;
    constexpr int TPR = THREADS / BLOCK_M;
    constexpr int LD = D_TILE + 1, LDS = BLOCK_N + 1;
    constexpr int COLS_D = D_TILE / TPR, COLS_N = BLOCK_N / TPR;
    static_assert(THREADS % BLOCK_M == 0 && D_TILE % TPR == 0 && BLOCK_N % TPR == 0, "tile shape");
    const FwdParams& f = p.fwd;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sQ = reinterpret_cast<A*>(smem_raw);
    A* sdO = sQ + BLOCK_M * LD;
    A* sK = sdO + BLOCK_M * LD;
    A* sV = sK + BLOCK_N * LD;
    A* sdX = sV + BLOCK_N * LD;  // [BLOCK_M][BLOCK_N + 1]

    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / f.group;
    const int r = threadIdx.x / TPR, c = threadIdx.x % TPR, i = m0 + r;
    const Sequence seq = sequence<Var::packed>(f, b);
    if (m0 >= seq.seqlen_q) return;  // a packed sequence shorter than the longest
    const Var var = variant_of<Var>(f, seq, b, h);
    const A scale_log2 = A(f.scale) * A(LOG2E);
    const T* k = seq.key_rows(static_cast<const T*>(f.k), f.k_st, hk, 0);
    const T* v = seq.key_rows(static_cast<const T*>(f.v), f.v_st, hk, 0);

    load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sQ, seq.query_rows(static_cast<const T*>(f.q), f.q_st, h, m0), f.q_st.s,
                                                0, seq.seqlen_q - m0, f.headdim);
    load_tile_acc<BLOCK_M, D_TILE, LD, THREADS>(sdO, seq.query_rows(static_cast<const T*>(p.dout), p.do_st, h, m0),
                                                p.do_st.s, 0, seq.seqlen_q - m0, f.headdim);
    const i64 stat = seq.stat_row0(f, h) + i;
    const A lse2 = i < seq.seqlen_q ? lse_log2(static_cast<const A*>(f.lse)[stat]) : A(0);
    const A delta_i = i < seq.seqlen_q ? static_cast<const A*>(p.delta)[stat] : A(0);
    A* dbias = Var::bias && f.var.dbias ? static_cast<A*>(f.var.dbias) + b * f.var.dbias_sb + h * f.var.dbias_sh : nullptr;

    A dq_acc[COLS_D], row_sum = A(0);
#pragma unroll
    for (int jd = 0; jd < COLS_D; ++jd) dq_acc[jd] = A(0);

    int t_first, t_last;
    var.template key_tiles<BLOCK_M, BLOCK_N>(m0, t_first, t_last);
    for (int t = t_first; t < t_last; ++t) {
        const int n0 = t * BLOCK_N;
        __syncthreads();  // previous key tile fully consumed
        const TileKind kind = var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
        if (kind == SKIP) continue;
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sK, k + (i64)n0 * f.k_st.s, f.k_st.s, 0, seq.seqlen_k - n0,
                                                    f.headdim);
        load_tile_acc<BLOCK_N, D_TILE, LD, THREADS>(sV, v + (i64)n0 * f.v_st.s, f.v_st.s, 0, seq.seqlen_k - n0,
                                                    f.headdim);
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
        const bool needs_mask = kind != INTERIOR;
        auto pairs = [&](auto check, const Var& v) {
            constexpr bool CHECK = decltype(check)::value;
#pragma unroll
            for (int jj = 0; jj < COLS_N; ++jj) {
                const int jn = c + TPR * jj;
                A pd, ds, dx;
                row_sum += pair_backward<CHECK, APPROX>(v, s[jj], dp[jj], scale_log2, lse2, A(1), delta_i, i, n0 + jn,
                                                        Var::dropout && v.keep(i, n0 + jn), pd, ds, dx);
                sdX[r * LDS + jn] = dx;
                if (Var::bias && dbias && i < seq.seqlen_q && n0 + jn < seq.seqlen_k && !is_masked_zero(ds))
                    atomicAdd(dbias + i * f.var.dbias_sq + (n0 + jn) * f.var.dbias_sk, ds);
            }
        };
        check_tile(kind, var, pairs);
        __syncwarp();  // the TPR threads of a query row share its dx

        const bool guard = Var::hides_keys && needs_mask &&
                           seq.keys_nonfinite(p.k_nonfinite, f, hk, n0, BLOCK_N);
        for (int n = 0; n < BLOCK_N; ++n) {
            const A dx = sdX[r * LDS + n];
            if (guard && is_masked_zero(dx)) continue;  // masked keys must not reach this row
#pragma unroll
            for (int jd = 0; jd < COLS_D; ++jd) dq_acc[jd] += dx * sK[n * LD + c + TPR * jd];
        }
    }

    A dq_scale = A(f.scale);
    if constexpr (!APPROX) {
        const A factor = row_renormalizer(reduce_sum<TPR>(row_sum), lse2, sink_log2<A>(f.var, h));
        dq_scale *= factor;
        if (c == 0 && i < seq.seqlen_q) static_cast<A*>(p.row_scale)[stat] = factor;
    }
    if (i < seq.seqlen_q) {
        T* dq_row = seq.query_rows(static_cast<T*>(p.dq), p.dq_st, h, i);
#pragma unroll
        for (int jd = 0; jd < COLS_D; ++jd) {
            const int d = c + TPR * jd;
            if (d < f.headdim) dq_row[d] = from_acc<T>(dq_acc[jd] * dq_scale);
        }
    }
}
