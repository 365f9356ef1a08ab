// Forward pass on tensor cores (FlashAttention-2 partitioning): float16 / bfloat16 (m16n8k16, float32
// accumulation), float32 (exact by three TF32 products per product, or TF32: tf32_t) and float64
// (m16n8k8 .f64), each accumulating in its compute dtype (mma.cuh).
//
// One block per (query tile, head, batch); each warp owns MT slabs of 16 query rows (every K/V
// fragment read from shared memory feeds all of them). Per key tile of the band the variant allows:
//   s = q k^T              gemm_nt (mma.sync m16n8k16, fragments through ldmatrix)
//   score, online softmax  in registers, on the s accumulators (rows g and g + 8 of each slab,
//                          each row split over the 4 lanes of a quad); element masks only on tiles
//                          the variant says need them
//   dropout                on p, after l has summed it (lse is of the softmax before dropout)
//   o = o * alpha + p v    gemm_rn: p straight from the s accumulators as the A operand
// K and V tiles are double-buffered in shared memory: the copy of tile t + 1 (cp.async)
// overlaps the arithmetic on tile t. Rows are padded (row_pad) so fragment reads are conflict-free.
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "mma.cuh"

template <typename T, int D_TILE, int BLOCK_N, int WARPS, int MT, typename Var, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32) flash_fwd_mma(const __grid_constant__ FwdParams p) {
    typedef typename Acc<T>::type A;
    constexpr bool APPROX = is_16bit<T>();
    constexpr int WARP_ROWS = 16 * MT, BLOCK_M = WARP_ROWS * WARPS, THREADS = 32 * WARPS, LD = D_TILE + row_pad<T>();
    constexpr int NT = BLOCK_N / 8, DT = D_TILE / 8;  // 8-wide column tiles of s and of o
    static_assert(D_TILE % 16 == 0 && BLOCK_N % 16 == 0, "tile shape");
    if (gated_off(p)) return;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BLOCK_M * LD;      // [2][BLOCK_N][LD]
    T* sV = sK + 2 * BLOCK_N * LD;  // [2][BLOCK_N][LD]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
    const Sequence seq = sequence<Var::packed>(p, b);
    if (m0 >= seq.seqlen_q) return;  // a packed sequence shorter than the longest
    const Var var = variant_of<Var>(p, seq, b, h);
    int t_first, t_last;
    var.template key_tiles<BLOCK_M, BLOCK_N>(m0, t_first, t_last);
    const int n_tiles = t_last - t_first, kv_rows = seq.seqlen_k - t_first * BLOCK_N;
    const T* q = seq.query_rows(static_cast<const T*>(p.q), p.q_st, h, m0);
    const T* k = seq.key_rows(static_cast<const T*>(p.k), p.k_st, hk, t_first * BLOCK_N);
    const T* v = seq.key_rows(static_cast<const T*>(p.v), p.v_st, hk, t_first * BLOCK_N);
    const A scale_log2 = A(p.scale) * A(LOG2E);

    if (n_tiles > 0) {
        load_tile_async<BLOCK_M, D_TILE, LD, THREADS, ALIGNED>(sQ, q, p.q_st.s, seq.seqlen_q - m0, p.headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, k, p.k_st.s, kv_rows, p.headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV, v, p.v_st.s, kv_rows, p.headdim);
        cp_async_commit();
    }

    A o[MT][DT][4];
    zero(o);
    OnlineSoftmax<A> stats[MT][2];  // rows g and g + 8 of each slab
    const int row0 = m0 + warp * WARP_ROWS + g;

    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = (t_first + t) * BLOCK_N;
        next_kv_tile<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK, sV, k, v, p.k_st.s, p.v_st.s, t, n_tiles, kv_rows,
                                                            p.headdim);
        const TileKind kind = var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
        if (kind == SKIP) continue;  // nothing of it is seen; its buffer is not read
        const T* cK = sK + (t & 1) * BLOCK_N * LD;
        const T* cV = sV + (t & 1) * BLOCK_N * LD;

        A s[MT][NT][4];
        zero(s);
        gemm_nt<T, D_TILE, BLOCK_N, LD>(s, sQ + warp * WARP_ROWS * LD, cK, lane);

        // scores -> probabilities; the masked version only where the variant says a tile needs it
        const bool needs_mask = kind != INTERIOR;
        check_tile(kind, var, [&](auto check, const Var& v) {
            softmax_tile<decltype(check)::value, APPROX>(v, s, o, stats, row0, n0, tq, scale_log2, WordsOnDemand{});
        });

        if constexpr (Var::hides_keys) {
            if (needs_mask && seq.keys_nonfinite(p.v_nonfinite, p, hk, n0, BLOCK_N)) {
                gemm_rn_guarded<T, BLOCK_N, D_TILE>(o, s, PaddedTile<T, LD>{cV}, lane);
            } else {
                gemm_rn<T, BLOCK_N, D_TILE, LD>(o, s, cV, lane);
            }
        } else {
            gemm_rn<T, BLOCK_N, D_TILE, LD>(o, s, cV, lane);
        }
    }

    A inv_l[MT][2];
    A* lse = static_cast<A*>(p.lse) + seq.stat_row0(p, h);
    const A sink = sink_log2<A>(p.var, h);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const auto end = stats[mt][r].end(reduce_sum<4>(stats[mt][r].l), sink);
            inv_l[mt][r] = end.o_factor;
            if (Var::dropout) inv_l[mt][r] *= A(var.dropout_scale);  // the kept probabilities' 1 / (1 - p)
            const int row = row0 + 16 * mt + 8 * r;
            if (tq == 0 && row < seq.seqlen_q) lse[row] = end.lse;
        }
    store_slab(seq.query_rows(static_cast<T*>(p.out), p.o_st, h, m0), p.o_st.s, o, inv_l, warp * WARP_ROWS,
               seq.seqlen_q - m0, p.headdim, lane);
}
