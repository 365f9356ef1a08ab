// Backward pass for float16 / bfloat16 on Hopper (sm_90a): TMA, wgmma and warp specialisation, with
// FlashAttention-3's structure. Three kernels:
//   flash_bwd_prepare_sm90  delta = rowsum(dout * out), lse in log2 units, and a zeroed float32 dq
//                           accumulator, each head's rows padded to whole query tiles
//   flash_bwd_sm90          one block per (128-key tile, kv head, batch); it holds k, v, dk and dv, and
//                           the band's query tiles of every head of the GQA group stream through:
//     producer   (warpgroup 0) one thread loads k and v once, then q, dout, lse and delta of each query
//                tile into a ring of STAGES buffers (TMA; each arrival completes an mbarrier); another adds
//                each tile's dq to the float32 accumulator with one bulk reduction (cp.reduce.async.bulk)
//     consumers  (warpgroups 1 and 2, 64 keys each), per query tile:
//       s^T = k q^T, dp^T = v dout^T     wgmma, both operands in shared memory
//       pd^T, dx^T                       key_rows_backward (mask.cuh); element masks on EDGE tiles only
//       dv += pd^T dout, dk += dx^T q    wgmma, pd^T and dx^T from registers
//       dq = dx k                        dx^T through shared memory to both warpgroups, each taking half
//                                        of the head's columns; dq through shared memory to the reduction
//                                        (the order of the additions varies from run to run)
//   flash_bwd_dq_convert    dq = accumulator * scale in the input dtype
// Tiles sit in shared memory as TMA writes them (128-byte swizzle, sm90.cuh); rows and columns past the
// ends of the tensors arrive as zeros.
#include "common.cuh"
#include "mask.cuh"
#include "softmax.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "wgmma.cuh"

constexpr int SM90_BWD_BLOCK_M = 64;  // query rows per streamed tile

// One warp per padded row (batch, head, row < p.rows).
template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_prepare_sm90(const __grid_constant__ BwdParamsSm90 p) {
    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const i64 row = (i64)blockIdx.x * 4 + threadIdx.x / 32;
    if (row >= (i64)bp.batch * f.nheads * p.rows) return;
    const int lane = threadIdx.x % 32, i = (int)(row % p.rows), h = (int)((row / p.rows) % f.nheads),
              b = (int)(row / p.rows / f.nheads);
    float delta = 0.f, lse2 = 0.f;
    if (i < f.seqlen_q) {
        const T* dor = static_cast<const T*>(bp.dout) + b * bp.do_st.b + (i64)i * bp.do_st.s + h * bp.do_st.h;
        const T* orow = static_cast<const T*>(f.out) + b * f.o_st.b + (i64)i * f.o_st.s + h * f.o_st.h;
        for (int d = lane; d < f.headdim; d += 32) delta += to_acc(dor[d]) * to_acc(orow[d]);
        delta = reduce_sum<32>(delta);
        lse2 = lse_log2(static_cast<const float*>(f.lse)[((i64)b * f.nheads + h) * f.seqlen_q + i]);
    }
    if (lane == 0) {
        static_cast<float*>(bp.delta)[row] = delta;
        p.lse_log2[row] = lse2;
    }
    for (int d = lane; d < p.head_tile; d += 32) p.dq_accum[row * p.head_tile + d] = 0.f;
}

template <typename T, int D_TILE, int STAGES, typename Var>
__global__ void __launch_bounds__(384, 1) flash_bwd_sm90(const __grid_constant__ BwdParamsSm90 p) {
    constexpr int BLOCK_M = SM90_BWD_BLOCK_M, BLOCK_N = 128, CONSUMERS = 256, CHUNKS = D_TILE / 64;
    constexpr int MT = BLOCK_M / 8, DT = D_TILE / 8, DQ_COLS = D_TILE / 2;
    constexpr int Q_ELEMS = BLOCK_M * D_TILE, KV_ELEMS = BLOCK_N * D_TILE, DS_ELEMS = BLOCK_N * BLOCK_M;
    static_assert(D_TILE % 64 == 0 && DQ_COLS % 32 == 0, "tile shape");
    using Vote = ConsumerVote<CONSUMERS>;

    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;  // swizzle atoms: 1024-aligned
    T* sK = reinterpret_cast<T*>(smem);  // [CHUNKS][BLOCK_N][64]
    T* sV = sK + KV_ELEMS;               // [CHUNKS][BLOCK_N][64]
    T* sQ = sV + KV_ELEMS;               // [STAGES][CHUNKS][BLOCK_M][64]
    T* sdO = sQ + STAGES * Q_ELEMS;      // [STAGES][CHUNKS][BLOCK_M][64]
    T* sdS = sdO + STAGES * Q_ELEMS;     // [2][BLOCK_N][BLOCK_M]: dx^T, keys by queries
    float* sLse = reinterpret_cast<float*>(sdS + 2 * DS_ELEMS);  // [STAGES][BLOCK_M], log2 units
    float* sDelta = sLse + STAGES * BLOCK_M;                     // [STAGES][BLOCK_M]
    float* sdQ = sDelta + STAGES * BLOCK_M;  // [BLOCK_M * D_TILE]: this tile's dq in the accumulator's order
    unsigned long long* kv_full = reinterpret_cast<unsigned long long*>(sdQ + Q_ELEMS);
    unsigned long long* q_full = kv_full + 1;    // [STAGES]: q, dout, lse and delta of a query tile
    unsigned long long* q_free = q_full + STAGES;  // [STAGES]: every consumer thread arrives
    unsigned long long* dq_full = q_free + STAGES;  // sdQ written (or nothing to add): every consumer thread
    unsigned long long* dq_free = dq_full + 1;      // sdQ read by the reduction
    int* dq_written = reinterpret_cast<int*>(dq_free + 1);

    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const int n0 = blockIdx.x * BLOCK_N, hk = blockIdx.y, b = blockIdx.z;

    // The stream: the band's query tiles of head hk * group, then of the next head of the group (the
    // band depends on the head only through ALiBi and masks, never through its bounds).
    int m_first, m_last;
    Var(f, b, hk * f.group).template query_tiles<BLOCK_M, BLOCK_N>(n0, m_first, m_last);
    const int per_head = m_last - m_first, n_tiles = f.group * per_head;

    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);
        mbar_init(dq_full, CONSUMERS);
        mbar_init(dq_free, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(q_full + s, 1);
            mbar_init(q_free + s, CONSUMERS);
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer
        regs_release<24>();
        if (threadIdx.x == 0 && n_tiles > 0) {
            mbar_expect_tx(kv_full, 2 * KV_ELEMS * sizeof(T));
            for (int c = 0; c < CHUNKS; ++c) {
                tma_load(sK + c * BLOCK_N * 64, p.tma_k, c * 64, n0, hk, b, kv_full);
                tma_load(sV + c * BLOCK_N * 64, p.tma_v, c * 64, n0, hk, b, kv_full);
            }
            for (int t = 0; t < n_tiles; ++t) {
                const int stage = t % STAGES, h = hk * f.group + t / per_head, m0 = (m_first + t % per_head) * BLOCK_M;
                if (t >= STAGES) mbar_wait(q_free + stage, (t / STAGES - 1) & 1);
                mbar_expect_tx(q_full + stage, 2 * Q_ELEMS * sizeof(T) + 2 * BLOCK_M * sizeof(float));
                for (int c = 0; c < CHUNKS; ++c) {
                    tma_load(sQ + stage * Q_ELEMS + c * BLOCK_M * 64, p.tma_q, c * 64, m0, h, b, q_full + stage);
                    tma_load(sdO + stage * Q_ELEMS + c * BLOCK_M * 64, p.tma_do, c * 64, m0, h, b, q_full + stage);
                }
                const i64 stats = ((i64)b * f.nheads + h) * p.rows + m0;
                bulk_load(sLse + stage * BLOCK_M, p.lse_log2 + stats, BLOCK_M * sizeof(float), q_full + stage);
                bulk_load(sDelta + stage * BLOCK_M, static_cast<const float*>(bp.delta) + stats,
                          BLOCK_M * sizeof(float), q_full + stage);
            }
        } else if (threadIdx.x == 32) {
            // dq of each computed tile: one bulk reduction of sdQ into the float32 accumulator, whose tiles
            // are stored in the consumers' register order (flash_bwd_dq_convert reads them back).
            for (int t = 0; t < n_tiles; ++t) {
                const int h = hk * f.group + t / per_head, m0 = (m_first + t % per_head) * BLOCK_M;
                mbar_wait(dq_full, t & 1);
                if (*dq_written) {
                    bulk_reduce_add(p.dq_accum + (((i64)b * f.nheads + h) * p.rows + m0) * D_TILE, sdQ,
                                    Q_ELEMS * sizeof(float));
                    bulk_wait_read();
                }
                mbar_arrive(dq_free);
            }
            bulk_wait_all();
        }
    } else {
        // ---- consumers
        regs_claim<240>();
        const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
        const int g = lane / 4, tq = lane % 4, key0 = n0 + 64 * wg + 16 * warp + g;
        const float scale_log2 = float(f.scale) * float(LOG2E);
        const T* k_rows = sK + 64 * wg * 64;  // this warpgroup's keys of each chunk
        const T* v_rows = sV + 64 * wg * 64;
        const int dq_col0 = wg * DQ_COLS;    // this warpgroup's columns of dq
        const T* k_cols = sK + (dq_col0 / 64) * BLOCK_N * 64 + dq_col0 % 64;

        float dk[DT][4], dv[DT][4];
        zero(dk);
        zero(dv);
        float(&dk_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(dk);
        float(&dv_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(dv);

        if (n_tiles > 0) mbar_wait(kv_full, 0);
        // Keys whose data is not finite may reach dq only through the guarded path (Var::hides_keys).
        const bool k_nonfinite = Var::hides_keys && n_tiles > 0 && tile_has_nonfinite<BLOCK_N * CHUNKS, 64, 64, Vote>(sK);

        for (int t = 0, computed = 0; t < n_tiles; ++t) {
            const int stage = t % STAGES, parity = (t / STAGES) & 1;
            const int h = hk * f.group + t / per_head, m0 = (m_first + t % per_head) * BLOCK_M;
            const Var var(f, b, h);
            const TileKind kind = var.template tile_kind<Vote>(m0, BLOCK_M, n0, BLOCK_N);
            // Every phase is waited for, skipped tiles too, so that no copy into a buffer is in flight
            // when the producer reuses it.
            mbar_wait(q_full + stage, parity);
            if (kind != SKIP) {
                const T* q_buf = sQ + stage * Q_ELEMS;
                const T* do_buf = sdO + stage * Q_ELEMS;
                float st[MT][4], dpt[MT][4];
                float(&st_regs)[MT * 4] = reinterpret_cast<float(&)[MT * 4]>(st);
                float(&dpt_regs)[MT * 4] = reinterpret_cast<float(&)[MT * 4]>(dpt);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < D_TILE / 16; ++kk)
                    wgmma_ss<T, BLOCK_M>(st_regs, desc_k_major(k_rows + (kk / 4) * BLOCK_N * 64, kk),
                                         desc_k_major(q_buf + (kk / 4) * BLOCK_M * 64, kk), kk > 0);
#pragma unroll
                for (int kk = 0; kk < D_TILE / 16; ++kk)
                    wgmma_ss<T, BLOCK_M>(dpt_regs, desc_k_major(v_rows + (kk / 4) * BLOCK_N * 64, kk),
                                         desc_k_major(do_buf + (kk / 4) * BLOCK_M * 64, kk), kk > 0);
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(st_regs);
                fence_regs(dpt_regs);

                const bool needs_mask = kind == EDGE;
                const float* lse2 = sLse + stage * BLOCK_M;
                const float* delta = sDelta + stage * BLOCK_M;
                if (needs_mask) {
                    key_rows_backward<true>(var, st, dpt, m0, key0, warp, lane, scale_log2, lse2, delta);
                } else {
                    key_rows_backward<false>(var, st, dpt, m0, key0, warp, lane, scale_log2, lse2, delta);
                }
                // pd^T and dx^T in the A layout of wgmma: consecutive pairs of the accumulators
                unsigned p_regs[MT * 2], ds_regs[MT * 2];
#pragma unroll
                for (int i = 0; i < MT * 2; ++i) {
                    p_regs[i] = pack2<T>(st_regs[2 * i], st_regs[2 * i + 1]);
                    ds_regs[i] = pack2<T>(dpt_regs[2 * i], dpt_regs[2 * i + 1]);
                }

                // A tile where hidden queries' q or dout is not finite takes the guarded products, after
                // the dq product (no wgmma in flight then).
                const bool guarded = Var::hides_keys && needs_mask &&
                                     (tile_has_nonfinite<BLOCK_M * CHUNKS, 64, 64, Vote>(do_buf) ||
                                      tile_has_nonfinite<BLOCK_M * CHUNKS, 64, 64, Vote>(q_buf));
                if (!guarded) {
                    fence_regs(dv_regs);
                    fence_regs(dk_regs);
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                        wgmma_rs<T, D_TILE>(dv_regs, reinterpret_cast<const unsigned(&)[4]>(p_regs[4 * kk]),
                                            desc_n_major(do_buf, kk, BLOCK_M * 128), 1);
#pragma unroll
                    for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                        wgmma_rs<T, D_TILE>(dk_regs, reinterpret_cast<const unsigned(&)[4]>(ds_regs[4 * kk]),
                                            desc_n_major(q_buf, kk, BLOCK_M * 128), 1);
                    wgmma_commit();
                }

                // dx^T to shared memory for both warpgroups' dq (buffers alternate: the barrier below of
                // the next computed tile is passed only once every dq product of this one has finished).
                T* ds_buf = sdS + (computed % 2) * DS_ELEMS;
#pragma unroll
                for (int j = 0; j < MT; ++j)
#pragma unroll
                    for (int er = 0; er < 2; ++er)
                        *reinterpret_cast<unsigned*>(const_cast<T*>(
                            swizzled(ds_buf, BLOCK_N, 64 * wg + 16 * warp + g + 8 * er, 8 * j + 2 * tq))) =
                            ds_regs[2 * j + er];
                fence_async_shared();
                named_barrier<CONSUMERS>(2);

                float dq[DQ_COLS / 8][4];
                float(&dq_regs)[DQ_COLS / 2] = reinterpret_cast<float(&)[DQ_COLS / 2]>(dq);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                    wgmma_ss_tt<T, DQ_COLS>(dq_regs, desc_n_major(ds_buf, kk, BLOCK_N * 128),
                                            desc_n_major(k_cols, kk, BLOCK_N * 128), kk > 0);
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(dq_regs);
                fence_regs(dv_regs);
                fence_regs(dk_regs);
                if (guarded) {
                    gemm_rn_guarded<T, BLOCK_M, D_TILE>(dv, p_regs, SwizzledTile<T, BLOCK_M>{do_buf}, lane);
                    gemm_rn_guarded<T, BLOCK_M, D_TILE>(dk, ds_regs, SwizzledTile<T, BLOCK_M>{q_buf}, lane);
                }
                if (Var::hides_keys && needs_mask && k_nonfinite) {
                    // Non-finite keys reach only the queries that see them: the sums again, on CUDA cores.
#pragma unroll 1
                    for (int j = 0; j < DQ_COLS / 8; ++j)
#pragma unroll 1
                        for (int e = 0; e < 4; ++e) {
                            const int row = 16 * warp + g + 8 * (e / 2), col = dq_col0 + 8 * j + 2 * tq + e % 2;
                            float sum = 0.f;
                            for (int key = 0; key < BLOCK_N; ++key) {
                                const float dx = to_acc(*swizzled(ds_buf, BLOCK_N, key, row));
                                if (!is_masked_zero(dx)) sum += dx * to_acc(*swizzled(sK, BLOCK_N, key, col));
                            }
                            dq[j][e] = sum;
                        }
                }
                mbar_wait(dq_free, (t & 1) ^ 1);
                if (threadIdx.x == 128) *dq_written = 1;
                float* dq_out = sdQ + (wg * (DQ_COLS / 8) * 128 + threadIdx.x % 128) * 4;
#pragma unroll
                for (int j = 0; j < DQ_COLS / 8; ++j)
                    *reinterpret_cast<float4*>(dq_out + j * 128 * 4) = make_float4(dq[j][0], dq[j][1], dq[j][2], dq[j][3]);
                fence_async_shared();
                mbar_arrive(dq_full);
                ++computed;
            } else {
                mbar_wait(dq_free, (t & 1) ^ 1);
                if (threadIdx.x == 128) *dq_written = 0;
                mbar_arrive(dq_full);
            }
            mbar_arrive(q_free + stage);  // the producer may refill this stage
        }

        const float dk_scale[2] = {float(f.scale), float(f.scale)}, dv_scale[2] = {1.f, 1.f};
        store_slab(static_cast<T*>(bp.dk) + b * bp.dk_st.b + hk * bp.dk_st.h + (i64)n0 * bp.dk_st.s, bp.dk_st.s, dk,
                   dk_scale, 64 * wg + 16 * warp, f.seqlen_k - n0, f.headdim, lane);
        store_slab(static_cast<T*>(bp.dv) + b * bp.dv_st.b + hk * bp.dv_st.h + (i64)n0 * bp.dv_st.s, bp.dv_st.s, dv,
                   dv_scale, 64 * wg + 16 * warp, f.seqlen_k - n0, f.headdim, lane);
    }
}

// One warp per (batch, head, row < seqlen_q). The accumulator holds each 64-row tile in the consumers'
// register order: [warpgroup][8-column group j][thread][4], thread = 32 warp + 4 g + tq, element 2 er + ec
// of row 16 warp + 8 er + g, column 8 j + 2 tq + ec of the warpgroup's half of the head.
template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_dq_convert(const __grid_constant__ BwdParamsSm90 p) {
    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const i64 row = (i64)blockIdx.x * 4 + threadIdx.x / 32;
    if (row >= (i64)bp.batch * f.nheads * f.seqlen_q) return;
    const int i = (int)(row % f.seqlen_q), h = (int)((row / f.seqlen_q) % f.nheads), b = (int)(row / f.seqlen_q / f.nheads);
    const int r = i % SM90_BWD_BLOCK_M, half = p.head_tile / 2;
    const float* tile = p.dq_accum + (((i64)b * f.nheads + h) * p.rows + (i - r)) * p.head_tile;
    const int thread_row = (r / 16) * 32 + (r % 8) * 4, e_row = 2 * ((r % 16) / 8);
    T* dq = static_cast<T*>(bp.dq) + b * bp.dq_st.b + (i64)i * bp.dq_st.s + h * bp.dq_st.h;
    const float scale = float(f.scale);
    for (int d = threadIdx.x % 32; d < f.headdim; d += 32) {
        const int wg = d / half, c = d % half;
        const int idx = ((wg * (half / 8) + c / 8) * 128 + thread_row + (c % 8) / 2) * 4 + e_row + c % 2;
        dq[d] = from_acc<T>(tile[idx] * scale);
    }
}
