// Backward pass on tensor cores (the dtypes of forward_mma.cu): the dK/dV and dQ kernels of
// backward.cu (same algorithm, same deterministic order but for float64's dq added by the dK/dV pass
// below, delta from flash_bwd_delta, the same per-pair step pair_backward), with every product a
// warp-level mma on 16-row slabs.
//
// dK/dV: one block per (key tile, column slice, kv head, batch); 16 key rows to a warp (ROLES 1) or to
// a pair of warps (ROLES 2); the query tiles of the band, of every head of the GQA group, stream
// through shared memory (double-buffered, cp.async):
//   s^T = k q^T, dp^T = v dout^T                 gemm_nt, over the whole head
//   pd^T, dx^T                                    pair_backward, in registers
//   dv += pd^T dout, dk += dx^T q                 gemm_rn, straight from registers, for the D_OUT columns
//                                                 of the block's slice
// Wide heads do not hold both accumulators of a warp in registers. Either the blocks split dK and dV
// into column slices (D_OUT < D_TILE), each recomputing s^T and dp^T (six products' work for four), or
// the two warps of a pair take a role each (ROLES 2): one computes s^T and dv += pd^T dout, the other
// dp^T and dk += dx^T q, from s^T handed over through shared memory (four products, one accumulator of
// the whole head each).
// dQ: one block per (query tile, head, batch), 16 query rows to a warp (ROLES 1) or to a pair of warps
// (ROLES 2: one computes s, the other dp, they swap them, and each adds to half of dq's columns); key
// tiles stream:
//   s = q k^T, dp = dout v^T, dx (and dbias += ds), dq += dx k
// Wide inputs renormalize the recomputed probabilities (mask.cuh, row_renormalizer): the dQ pass runs
// first, sums each row's, scales dq by the row's factor and leaves it in row_scale for the dK/dV pass.
// float64 without `deterministic` (DX_BUFFERS > 0, SUMS): the dK/dV pass adds each query tile's
//   dq += (scale dx) k                           every warp a slice of dq's columns, float64 atomics
// into the dq that flash_bwd_delta zeroed, and the dQ pass only sums the rows' probabilities, in the
// blocks holding a row that renormalizes: five products instead of seven.
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "mma.cuh"

// dq += (scale dx) k for one query tile of the dK/dV pass (DX_BUFFERS > 0): dx of the block's BLOCK_N keys
// from shared memory ([BLOCK_M][LDX]), k from its tile; each warp takes DQ_COLS columns. product() forms the
// warp's sums, add() adds them to dq with float64 atomics; work placed between the two hides the products'
// latency, which the atomics would otherwise wait out.
template <int D_TILE, int BLOCK_M, int BLOCK_N, int WARPS, int LD, int LDX> struct DqTile {
    static constexpr int DQ_COLS = (D_TILE / WARPS + 7) / 8 * 8, SLABS = BLOCK_M / 16;  // whole 8-column tiles
    double part[SLABS][DQ_COLS / 8][4];

    // The A fragments come straight from dx, in gemm_rn's order of the keys (SPREAD_ROWS), so that no
    // register is shuffled. `guarded`: k holds NaN or inf that some rows must not see.
    __device__ __forceinline__ void product(const double* sDx, const double* sK, bool guarded, int warp, int lane) {
        const int g = lane / 4, tq = lane % 4, c0 = warp * DQ_COLS;
        if (c0 >= D_TILE) return;
        zero(part);
        if (guarded) {
#pragma unroll 1
            for (int k0 = 0; k0 < BLOCK_N; k0 += 16) {
                double dx[SLABS][2][4];  // the C layout of 16 keys
#pragma unroll
                for (int ms = 0; ms < SLABS; ++ms)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            dx[ms][j][e] = sDx[(16 * ms + g + 8 * (e / 2)) * LDX + k0 + 8 * j + 2 * tq + e % 2];
                gemm_rn_guarded<double, 16, DQ_COLS>(part, dx, PaddedTile<double, LD>{sK + k0 * LD + c0}, lane);
            }
            return;
        }
        // fragment k = tq takes key 2 tq + swap of each 8, k = tq + 4 the other (gemm_rn_wide's SPREAD_ROWS)
        const int swap = tq >> 1;
        const double* a_keys[2] = {sDx + g * LDX + 2 * tq + swap, sDx + g * LDX + 2 * tq + (swap ^ 1)};
        const double* b_rows[2] = {sK + (2 * tq + swap) * LD + c0 + g, sK + (2 * tq + (swap ^ 1)) * LD + c0 + g};
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 8; ++kk) {
            double a[SLABS][4];
#pragma unroll
            for (int ms = 0; ms < SLABS; ++ms)
#pragma unroll
                for (int e = 0; e < 4; ++e) a[ms][e] = a_keys[e / 2][(16 * ms + 8 * (e % 2)) * LDX + 8 * kk];
#pragma unroll
            for (int nn = 0; nn < DQ_COLS / 8; ++nn) {
                const double b0 = b_rows[0][8 * kk * LD + 8 * nn], b1 = b_rows[1][8 * kk * LD + 8 * nn];
#pragma unroll
                for (int ms = 0; ms < SLABS; ++ms) mma_f64(part[ms][nn], a[ms], b0, b1);
            }
        }
    }

    // into dq's rows_left rows from `dq` (row stride dq_ss)
    __device__ __forceinline__ void add(double* dq, i64 dq_ss, int rows_left, int headdim, int warp, int lane) const {
        const int g = lane / 4, tq = lane % 4, c0 = warp * DQ_COLS;
        if (c0 >= D_TILE) return;
#pragma unroll
        for (int ms = 0; ms < SLABS; ++ms)
#pragma unroll
            for (int j = 0; j < DQ_COLS / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = 16 * ms + g + 8 * (e / 2), col = c0 + 8 * j + 2 * tq + e % 2;
                    if (row < rows_left && col < headdim) atomicAdd(dq + row * dq_ss + col, part[ms][j][e]);
                }
    }
};

template <typename T, int D_TILE, int D_OUT, int BLOCK_M, int WARPS, int ROLES, typename Var, bool ALIGNED,
          int DX_BUFFERS>
__global__ void __launch_bounds__(WARPS * 32) flash_bwd_dkdv_mma(const __grid_constant__ BwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr bool APPROX = is_16bit<T>();
    constexpr int BLOCK_N = 16 * WARPS / ROLES, THREADS = 32 * WARPS, LD = D_TILE + row_pad<T>();
    constexpr int SLICES = D_TILE / D_OUT, MT = BLOCK_M / 8, DT = D_OUT / 8, LDX = BLOCK_N + row_pad<T>();
    static_assert(D_TILE % 16 == 0 && D_OUT % 16 == 0 && D_TILE % D_OUT == 0 && BLOCK_M % 16 == 0, "tile shape");
    static_assert((ROLES == 1 || (ROLES == 2 && SLICES == 1)) && WARPS % ROLES == 0, "roles");
    constexpr bool DQ = DX_BUFFERS > 0;
    static_assert(!DQ || (sizeof(T) == 8 && SLICES == 1), "dq added with float64 atomics, once per key tile");
    const FwdParams& f = p.fwd;
    if (gated_off(f)) return;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BLOCK_N * LD;
    T* sQ = sV + BLOCK_N * LD;       // [2][BLOCK_M][LD]
    T* sdO = sQ + 2 * BLOCK_M * LD;  // [2][BLOCK_M][LD]
    A* sLse = reinterpret_cast<A*>(sdO + 2 * BLOCK_M * LD);  // [2][BLOCK_M], log2 units
    A* sDelta = sLse + 2 * BLOCK_M;                          // [2][BLOCK_M]
    A* sScale = sDelta + 2 * BLOCK_M;                        // [2][BLOCK_M], wide inputs only
    A* sHandover = sScale + (APPROX ? 0 : 2 * BLOCK_M);      // [WARPS / 2][MT * 4][32]: s^T, ROLES 2 only
    A* sDx = sHandover + (ROLES - 1) * (WARPS / 2) * MT * 4 * 32;  // [DX_BUFFERS][BLOCK_M][LDX]: scale dx

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    const int slab = warp / ROLES, role = warp % ROLES;  // role 1 (ROLES 2): dp^T and dk
    const int n0 = blockIdx.x / SLICES * BLOCK_N, col0 = blockIdx.x % SLICES * D_OUT, hk = blockIdx.y, b = blockIdx.z;
    const A scale_log2 = A(f.scale) * A(LOG2E);
    const Sequence seq = sequence<Var::packed>(f, b);
    if (n0 >= seq.seqlen_k) return;  // a packed sequence shorter than the longest

    // The stream: the band's query tiles of head hk * group, then of the next head of the group (the
    // band depends on the head only through ALiBi and masks, never through its bounds).
    int m_first, m_last;
    variant_of<Var>(f, seq, b, hk * f.group).template query_tiles<BLOCK_M, BLOCK_N>(n0, m_first, m_last);
    const int per_head = m_last - m_first;
    const int n_tiles = f.group * per_head;
    auto load_query_tile = [&](int t, int buf) {
        const int h = hk * f.group + t / per_head, m0 = (m_first + t % per_head) * BLOCK_M;
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
            sQ + buf * BLOCK_M * LD, seq.query_rows(static_cast<const T*>(f.q), f.q_st, h, m0), f.q_st.s,
            seq.seqlen_q - m0, f.headdim);
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
            sdO + buf * BLOCK_M * LD, seq.query_rows(static_cast<const T*>(p.dout), p.do_st, h, m0), p.do_st.s,
            seq.seqlen_q - m0, f.headdim);
        // the rows' statistics asynchronously too (a load here would hold the block at the next barrier for
        // its latency); the thread that copies a row's finishes it (finish_stats)
        const i64 stats = seq.stat_row0(f, h) + m0;
        for (int r = threadIdx.x; r < BLOCK_M; r += THREADS) {
            const bool valid = m0 + r < seq.seqlen_q;
            const i64 row = valid ? stats + r : 0;
            cp_async_value(sLse + buf * BLOCK_M + r, static_cast<const A*>(f.lse) + row, valid);
            cp_async_value(sDelta + buf * BLOCK_M + r, static_cast<const A*>(p.delta) + row, valid);
            if constexpr (!APPROX)
                cp_async_value(sScale + buf * BLOCK_M + r, static_cast<const A*>(p.row_scale) + row, valid);
        }
    };
    // once the copies of tile t have landed, before the barrier: lse in log2 units, renormalizer 1 past the rows
    auto finish_stats = [&](int t, int buf) {
        const int m0 = (m_first + t % per_head) * BLOCK_M;
        for (int r = threadIdx.x; r < BLOCK_M; r += THREADS) {
            sLse[buf * BLOCK_M + r] = lse_log2(sLse[buf * BLOCK_M + r]);
            if constexpr (!APPROX)
                if (m0 + r >= seq.seqlen_q) sScale[buf * BLOCK_M + r] = A(1);
        }
    };

    if (n_tiles > 0) {  // else no query sees these keys: dk = dv = 0
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(
            sK, seq.key_rows(static_cast<const T*>(f.k), f.k_st, hk, n0), f.k_st.s, seq.seqlen_k - n0, f.headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(
            sV, seq.key_rows(static_cast<const T*>(f.v), f.v_st, hk, n0), f.v_st.s, seq.seqlen_k - n0, f.headdim);
        load_query_tile(0, 0);
        cp_async_commit();
    }

    // ROLES 1: acc[0] = dv, acc[1] = dk; ROLES 2: acc[0] = dv (role 0) or dk (role 1)
    A acc[3 - ROLES][DT][4];
    zero(acc);
    const int key0 = n0 + slab * 16 + g;
    // DQ: every warp adds its share of a tile's dq once a barrier has passed since the tile's dx was stored:
    // with two buffers, the next tile's barrier, its atomics after that tile's first products; with one
    // (where two would leave room for fewer blocks), a barrier of its own right away.
    int dx_buf = 0, pending_h = -1, pending_m0 = 0;
    bool pending_guarded = false;
    DqTile<D_TILE, BLOCK_M, BLOCK_N, WARPS, LD, LDX> dq_tile;
    auto pending_dq_product = [&]() {
        if constexpr (DQ)
            if (pending_h >= 0)
                dq_tile.product(sDx + (DX_BUFFERS == 2 ? dx_buf ^ 1 : 0) * BLOCK_M * LDX, sK, pending_guarded, warp,
                                lane);
    };
    auto pending_dq_add = [&]() {
        if constexpr (DQ) {
            if (pending_h < 0) return;
            dq_tile.add(seq.query_rows(static_cast<T*>(p.dq), p.dq_st, pending_h, pending_m0), p.dq_st.s,
                        seq.seqlen_q - pending_m0, f.headdim, warp, lane);
            pending_h = -1;
        }
    };

    for (int t = 0; t < n_tiles; ++t) {
        const int buf = t & 1, h = hk * f.group + t / per_head, m0 = (m_first + t % per_head) * BLOCK_M;
        cp_async_wait<0>();  // tile t, the one group in flight
        finish_stats(t, buf);
        // the tile's one barrier: tile t has landed, and every warp is done with tile t - 1, whose buffers
        // (and the s^T hand-over) may now be refilled
        __syncthreads();
        if (t + 1 < n_tiles) {
            load_query_tile(t + 1, buf ^ 1);
            cp_async_commit();
        }
        pending_dq_product();
        const T* cQ = sQ + buf * BLOCK_M * LD;
        const T* cdO = sdO + buf * BLOCK_M * LD;
        const A* cLse = sLse + buf * BLOCK_M;
        const A* cDelta = sDelta + buf * BLOCK_M;
        const A* cScale = sScale + buf * BLOCK_M;
        const Var var = variant_of<Var>(f, seq, b, h);
        const TileKind kind = var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
        if (kind == SKIP) {
            pending_dq_add();
            continue;
        }

        A st[MT][4], dpt[MT][4];
        zero(st);
        zero(dpt);
        if (role == 0) gemm_nt<T, D_TILE, BLOCK_M, LD>(st, sK + slab * 16 * LD, cQ, lane);
        if (ROLES == 1 || role == 1) gemm_nt<T, D_TILE, BLOCK_M, LD>(dpt, sV + slab * 16 * LD, cdO, lane);
        pending_dq_add();
        if constexpr (ROLES == 2) {  // s^T to the pair's dk warp (the next tile's barrier orders the reuse)
            A* handover = sHandover + slab * MT * 4 * 32 + lane;
            if (role == 0)
#pragma unroll
                for (int i = 0; i < MT * 4; ++i) handover[32 * i] = st[i / 4][i % 4];
            named_barrier<64>(1 + slab);
            if (role == 1)
#pragma unroll
                for (int i = 0; i < MT * 4; ++i) st[i / 4][i % 4] = handover[32 * i];
        }

        // st becomes pd^T, dpt becomes dx^T (rows: keys key0, key0 + 8; columns: queries).
        const bool needs_mask = kind != INTERIOR;
        check_tile(kind, var, [&](auto check, const Var& v) {
            key_rows_backward<decltype(check)::value, APPROX>(v, st, dpt, m0, key0, slab, lane, scale_log2, cLse, cDelta,
                                                              cScale);
        });
        if constexpr (DQ) {
            if (ROLES == 1 || role == 1) {  // dx^T's element (key g, query 2 tq) at dx (query 2 tq, key g)
                A* dx = sDx + (dx_buf * BLOCK_M + 2 * (lane % 4)) * LDX + slab * 16 + g;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) dx[(8 * mt + e % 2) * LDX + 8 * (e / 2)] = dpt[mt][e] * A(f.scale);
            }
            pending_h = h;
            pending_m0 = m0;
            pending_guarded = Var::hides_keys && needs_mask && seq.keys_nonfinite(p.k_nonfinite, f, hk, n0, BLOCK_N);
            if constexpr (DX_BUFFERS == 2) {
                dx_buf ^= 1;
            } else {
                __syncthreads();
                pending_dq_product();
                pending_dq_add();
            }
        }
        const bool guarded = Var::hides_keys && needs_mask && (seq.queries_nonfinite(p.do_nonfinite, f, h, m0, BLOCK_M) ||
                                                               seq.queries_nonfinite(p.q_nonfinite, f, h, m0, BLOCK_M));
        auto accumulate = [&](A (&into)[DT][4], const A (&a)[MT][4], const T* sB) {
            if (guarded) gemm_rn_guarded<T, BLOCK_M, D_OUT>(into, a, PaddedTile<T, LD>{sB}, lane);
            else gemm_rn<T, BLOCK_M, D_OUT, LD, true>(into, a, sB, lane);
        };
        if constexpr (ROLES == 1) {
            accumulate(acc[0], st, cdO + col0);
            accumulate(acc[1], dpt, cQ + col0);
        } else {
            if (role == 1)
#pragma unroll
                for (int i = 0; i < MT * 4; ++i) st[i / 4][i % 4] = dpt[i / 4][i % 4];
            accumulate(acc[0], st, role == 0 ? cdO : cQ);
        }
    }
    if constexpr (DX_BUFFERS == 2) __syncthreads();  // the last tile's dx
    pending_dq_product();
    pending_dq_add();

    const A dk_scale[2] = {A(f.scale), A(f.scale)}, dv_scale[2] = {A(1), A(1)};
    auto store = [&](T* out, const Strides& strides, const A (&from)[DT][4], const A (&scale)[2]) {
        store_slab(seq.key_rows(out, strides, hk, n0) + col0, strides.s, from, scale, slab * 16, seq.seqlen_k - n0,
                   f.headdim - col0, lane);
    };
    if (role == 0) store(static_cast<T*>(p.dv), p.dv_st, acc[0], dv_scale);
    if (ROLES == 1 || role == 1) store(static_cast<T*>(p.dk), p.dk_st, acc[ROLES == 1 ? 1 : 0], dk_scale);
}

template <typename T, int D_TILE, int BLOCK_N, int WARPS, int ROLES, typename Var, bool ALIGNED, bool SUMS>
__global__ void __launch_bounds__(WARPS * 32) flash_bwd_dq_mma(const __grid_constant__ BwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr bool APPROX = is_16bit<T>();
    static_assert(!SUMS || !APPROX, "only wide inputs renormalize");
    // SUMS computes s alone: every warp takes 16 rows of its own (the rows' q fill dout's buffer too)
    constexpr int PAIRS = SUMS ? 1 : ROLES, BLOCK_M = 16 * WARPS / PAIRS, THREADS = 32 * WARPS;
    constexpr int LD = D_TILE + row_pad<T>();
    constexpr int NT = BLOCK_N / 8, D_OUT = D_TILE / ROLES, DT = D_OUT / 8;
    static_assert(D_TILE % 16 == 0 && BLOCK_N % 16 == 0 && D_OUT % 8 == 0 && WARPS % ROLES == 0, "tile shape");
    const FwdParams& f = p.fwd;
    if (gated_off(f)) return;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + 16 * WARPS / ROLES * LD;
    T* sK = sdO + 16 * WARPS / ROLES * LD;  // [2][BLOCK_N][LD]
    T* sV = sK + 2 * BLOCK_N * LD;  // [2][BLOCK_N][LD]
    A* sHandover = reinterpret_cast<A*>(sV + 2 * BLOCK_N * LD);  // [WARPS / 2][2][NT * 4][32]: s, dp (ROLES 2)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int slab = warp / PAIRS, role = warp % PAIRS, col0 = role * D_OUT;  // role 1 (ROLES 2): dp, dq's right half
    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / f.group;
    const Sequence seq = sequence<Var::packed>(f, b);
    if (m0 >= seq.seqlen_q) return;  // a packed sequence shorter than the longest
    const Var var = variant_of<Var>(f, seq, b, h);
    int t_first, t_last;
    var.template key_tiles<BLOCK_M, BLOCK_N>(m0, t_first, t_last);
    const int n_tiles = t_last - t_first, kv_rows = seq.seqlen_k - t_first * BLOCK_N;
    const T* k = seq.key_rows(static_cast<const T*>(f.k), f.k_st, hk, t_first * BLOCK_N);
    const T* v = seq.key_rows(static_cast<const T*>(f.v), f.v_st, hk, t_first * BLOCK_N);
    const A scale_log2 = A(f.scale) * A(LOG2E);

    const int row0 = m0 + slab * 16 + g;
    A lse2[2], delta_row[2];  // rows g and g + 8 of this warp
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        const i64 stat = seq.stat_row0(f, h) + row;
        lse2[r] = row < seq.seqlen_q ? lse_log2(static_cast<const A*>(f.lse)[stat]) : A(0);
        delta_row[r] = row < seq.seqlen_q ? static_cast<const A*>(p.delta)[stat] : A(0);
    }
    // SUMS: the factors alone, for a dK/dV pass that adds dq itself; a block none of whose rows renormalizes
    // leaves 1s.
    const bool sums_needed = !SUMS || __syncthreads_or(renormalizes_row(lse2[0]) || renormalizes_row(lse2[1]));
    if (n_tiles > 0 && sums_needed) {
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
            sQ, seq.query_rows(static_cast<const T*>(f.q), f.q_st, h, m0), f.q_st.s, seq.seqlen_q - m0, f.headdim);
        if (!SUMS)
            load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(
                sdO, seq.query_rows(static_cast<const T*>(p.dout), p.do_st, h, m0), p.do_st.s, seq.seqlen_q - m0,
                f.headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, k, f.k_st.s, kv_rows, f.headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV, v, f.v_st.s, kv_rows, f.headdim);
        cp_async_commit();
    }

    A* dbias = !SUMS && Var::bias && f.var.dbias && role == 0
                   ? static_cast<A*>(f.var.dbias) + b * f.var.dbias_sb + h * f.var.dbias_sh
                   : nullptr;
    A dq_acc[DT][4], row_sum[2] = {A(0), A(0)};
    zero(dq_acc);

    for (int t = 0; t < (sums_needed ? n_tiles : 0); ++t) {
        const int n0 = (t_first + t) * BLOCK_N;
        next_kv_tile<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, sV, k, v, f.k_st.s, f.v_st.s, t, n_tiles, kv_rows,
                                                            f.headdim);
        const TileKind kind = var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
        if (kind == SKIP) continue;  // nothing of it is seen; its buffer is not read
        const T* cK = sK + (t & 1) * BLOCK_N * LD;
        const T* cV = sV + (t & 1) * BLOCK_N * LD;

        A s[NT][4], dp[NT][4];
        zero(s);
        zero(dp);
        if (role == 0) gemm_nt<T, D_TILE, BLOCK_N, LD>(s, sQ + slab * 16 * LD, cK, lane);
        if (!SUMS && (PAIRS == 1 || role == 1)) gemm_nt<T, D_TILE, BLOCK_N, LD>(dp, sdO + slab * 16 * LD, cV, lane);
        if constexpr (PAIRS == 2) {  // each warp of the pair hands its product to the other (the next tile's
                                     // barrier orders the reuse)
            A* handover = sHandover + slab * 2 * NT * 4 * 32 + lane;
#pragma unroll
            for (int i = 0; i < NT * 4; ++i) handover[(role * NT * 4 + i) * 32] = role == 0 ? s[i / 4][i % 4] : dp[i / 4][i % 4];
            named_barrier<64>(1 + slab);
#pragma unroll
            for (int i = 0; i < NT * 4; ++i) {
                const A other = handover[((role ^ 1) * NT * 4 + i) * 32];
                if (role == 0) dp[i / 4][i % 4] = other;
                else s[i / 4][i % 4] = other;
            }
        }

        // s becomes pd, dp becomes dx (rows: queries row0, row0 + 8; columns: keys)
        const bool needs_mask = kind != INTERIOR;
        check_tile(kind, var, [&](auto check, const Var& v) {
            query_rows_backward<decltype(check)::value, APPROX>(v, s, dp, row0, n0, tq, scale_log2, lse2, delta_row,
                                                                dbias, f.var.dbias_sq, f.var.dbias_sk, row_sum);
        });
        if constexpr (!SUMS) {
            if (Var::hides_keys && needs_mask && seq.keys_nonfinite(p.k_nonfinite, f, hk, n0, BLOCK_N))
                gemm_rn_guarded<T, BLOCK_N, D_OUT>(dq_acc, dp, PaddedTile<T, LD>{cK + col0}, lane);
            else
                gemm_rn<T, BLOCK_N, D_OUT, LD, true>(dq_acc, dp, cK + col0, lane);
        }
    }

    A dq_scale[2] = {A(f.scale), A(f.scale)};
    if constexpr (!APPROX) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + 8 * r;
            const A factor = row_renormalizer(reduce_sum<4>(row_sum[r]), lse2[r], sink_log2<A>(f.var, h));
            dq_scale[r] *= factor;
            if (tq == 0 && role == 0 && row < seq.seqlen_q) static_cast<A*>(p.row_scale)[seq.stat_row0(f, h) + row] = factor;
        }
    }
    if (SUMS) return;
    store_slab(seq.query_rows(static_cast<T*>(p.dq), p.dq_st, h, m0) + col0, p.dq_st.s, dq_acc, dq_scale, slab * 16,
               seq.seqlen_q - m0, f.headdim - col0, lane);
}
