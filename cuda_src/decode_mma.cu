// Split-KV decoding on tensor cores for 16-bit caches (attention_with_kvcache): a few query rows against a
// long cache. The pass is bound by reading the cache, so it is shaped to keep many cache reads in flight.
//
// One block per (split, kv head and slab of its rows, sequence). A kv head's rows are the GQA group's query
// heads times seqlen_q, MT mma tiles of 16 a block (decode_slab; the last slab padded to whole tiles), so every
// key and value row read serves all of a block's rows: each slab reads the keys and values again (from L2 where
// its neighbours in the launch have just read them), so wider slabs read less. Warp w takes the
// key tiles w, w + WARPS, ... of its split through its own STAGES-deep ring, with no block barrier in the
// loop: with TMA (Hopper, a cache whose pages hold whole tiles) lane 0 loads each K and V tile as one box
// of its rows, completing an mbarrier of the ring, where 16-byte cp.async copies streamed the cache at
// 2.9 TB/s against TMA's 3.1 on an H100 (docs/performance.md); otherwise lane l copies key row l of a
// tile, found through the page table. Per tile:
//   s = q k^T               gemm_nt (mma.sync m16n8k16)
//   score, online softmax   per row: each row has its own head and query position (mask.cuh)
//   o = o * alpha + p v     gemm_rn; guarded where a partly hidden tile holds NaN or inf
// The warps' (m, l, o) then merge through shared memory. With one split the block writes out and lse;
// otherwise each split writes its normalised o and its lse in float32, and the last split of a (sequence,
// kv head, slab) to finish merges them (decode.cuh). The new rows of a call are appended before, by
// kvcache_append (decode.cu).
#include "async_copy.cuh"
#include "decode.cuh"
#include "softmax.cuh"
#include "mma.cuh"

// Whether a tile in shared memory holds NaN or inf, asked by the whole warp.
template <typename T, int ROWS, int D_TILE, int LD>
__device__ __forceinline__ bool warp_tile_nonfinite(const T* tile, int lane) {
    bool bad = false;
    for (int c = lane; c < ROWS * D_TILE / 2; c += 32) {
        const unsigned w = *reinterpret_cast<const unsigned*>(tile + (c / (D_TILE / 2)) * LD + (c % (D_TILE / 2)) * 2);
        bad |= nonfinite16<T>(w & 0xffffu) || nonfinite16<T>(w >> 16);
    }
    return __any_sync(0xffffffffu, bad);
}

template <typename T, int D_TILE, int BLOCK_N, int WARPS, int STAGES, bool TMA, int MT, typename Var>
__global__ void __launch_bounds__(WARPS * 32) flash_decode_mma(const __grid_constant__ DecodeParams p) {
    constexpr int LD = D_TILE + 8, NT = BLOCK_N / 8, DT = D_TILE / 8, CHUNKS = D_TILE / 8, ROWS = 16 * MT;
    // A K or V buffer: BLOCK_N rows padded to LD (copies), or with TMA boxes of 64 columns in 128-byte swizzle
    // (sm_90 TMA writes rows unpadded; the swizzle keeps ldmatrix free of bank conflicts)
    constexpr int BOXES = (D_TILE + 63) / 64, TILE = TMA ? BOXES * BLOCK_N * 64 : BLOCK_N * LD;
    static_assert(D_TILE % 16 == 0 && BLOCK_N % 16 == 0 && BLOCK_N <= 32 && STAGES >= 2, "tile shape");
    // the warps' merge reuses the rings, an mma tile at a time: o (rows padded to LD_O floats), m and l of 16
    // rows per warp
    constexpr int LD_O = D_TILE + 8;
    static_assert(WARPS * 16 * (LD_O + 2) * 4 <= WARPS * STAGES * 2 * TILE * 2, "merge buffer");
    const FwdParams& f = p.fwd;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // [ROWS][LD] q, and [WARPS][STAGES][K, V][TILE] rings; with TMA the rings first, from a 1024-byte boundary
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* rings = sQ + ROWS * LD;
    if constexpr (TMA) {
        rings = reinterpret_cast<T*>(smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024);
        sQ = rings + WARPS * STAGES * 2 * TILE;
    }
    __shared__ unsigned long long tile_full[TMA ? WARPS : 1][STAGES];  // TMA: a warp's ring slot has arrived
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int split = blockIdx.x, b = blockIdx.z;
    const DecodeSlab slab = decode_slab<ROWS>(f);
    const int hk = slab.hk, rows = slab.rows, seqlen_k = decode_seqlen(p, b), first_row = decode_first_row(p, b);

    // Padding rows repeat the slab's last row (their results are not written). This lane holds rows 16 m + g and
    // 16 m + g + 8 of each mma tile m.
    auto real = [&](int r) { return min(r, rows - 1); };
    auto head = [&](int r) { return slab.head(f, real(r)); };
    Var var[MT][2];
    int query[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            var[m][r] = Var(f, b, head(16 * m + g + 8 * r), seqlen_k);
            query[m][r] = slab.query(f, real(16 * m + g + 8 * r));
        }

    // The split's keys: a share of the band that some row may see (key_begin, key_end in mask.cuh).
    const int begin = var[0][0].key_begin(0) + split * p.keys_per_split;
    const int end = min(var[0][0].key_end(f.seqlen_q), begin + p.keys_per_split);
    const int n_tiles = end > begin ? (end - begin + BLOCK_N - 1) / BLOCK_N : 0;
    const int mine = n_tiles > warp ? (n_tiles - warp + WARPS - 1) / WARPS : 0;  // this warp's tiles
    T* ring = rings + warp * STAGES * 2 * TILE;
    const T* k_head = static_cast<const T*>(f.k) + hk * f.k_st.h;
    const T* v_head = static_cast<const T*>(f.v) + hk * f.v_st.h;
    auto tile_start = [&](int it) { return begin + (warp + it * WARPS) * BLOCK_N; };
    auto kv_tile = [](const T* tile) {  // a ring buffer as the products read it
        if constexpr (TMA) return SwizzledTile<T, BLOCK_N>{tile};
        else return PaddedTile<T, LD>{tile};
    };

    // Where this warp's tile `it` lies in the caches: lane l's key row (k and v offsets), or with TMA the page
    // and row of the tile's first key (k = page, v = row; calls with a left padding do not read by TMA).
    // Page-table reads are issued a tile ahead of their use, so the warp does not wait on them. load copies the tile into ring slot it % STAGES; keys
    // past the split's end are zeros (with TMA, once the tile has arrived: the box holds the cache's rows).
    struct Rows {
        i64 k, v;
    };
    auto rows_of = [&](int it) {
        const int key = tile_start(it) + (TMA ? 0 : lane);
        Rows at = {0, 0};
        if (it < mine && lane < BLOCK_N && key < end) {
            if constexpr (TMA) at = {p.block_table ? p.block_table[b * p.table_stride + key / p.page_size] : b, key % p.page_size};
            else at = {cache_row(p, f.k_st, b, first_row + key), cache_row(p, f.v_st, b, first_row + key)};
        }
        return at;
    };
    auto load = [&](int it, const Rows& at) {
        T* dK = ring + (it % STAGES) * 2 * TILE;
        T* dV = dK + TILE;
        if constexpr (TMA) {
            if (lane == 0) {
                unsigned long long* full = &tile_full[warp][it % STAGES];
                fence_async_shared();  // after the slot's ordinary reads and writes, a ring's turn ago
                mbar_expect_tx(full, 2 * TILE * sizeof(T));
                for (int box = 0; box < BOXES; ++box) {
                    tma_load(dK + box * BLOCK_N * 64, p.tma_k, box * 64, int(at.v), hk, int(at.k), full);
                    tma_load(dV + box * BLOCK_N * 64, p.tma_v, box * 64, int(at.v), hk, int(at.k), full);
                }
            }
        } else {
            const int n0 = tile_start(it);
#pragma unroll
            for (int c = lane; c < BLOCK_N * CHUNKS; c += 32) {  // a multiple of 32: every lane shuffles
                const int r = c / CHUNKS, d = (c % CHUNKS) * 8;
                const i64 ko = __shfl_sync(0xffffffffu, at.k, r), vo = __shfl_sync(0xffffffffu, at.v, r);
                const bool valid = n0 + r < end && d < f.headdim;
                cp_async_16(dK + r * LD + d, k_head + ko + d, valid);
                cp_async_16(dV + r * LD + d, v_head + vo + d, valid);
            }
        }
    };
    if constexpr (TMA) {
        if (lane == 0) {
            for (int s = 0; s < STAGES; ++s) mbar_init(&tile_full[warp][s], 1);
            mbar_fence_init();
        }
        __syncwarp();
    }
#pragma unroll
    for (int it = 0; it < STAGES - 1; ++it) {
        if (it < mine) load(it, rows_of(it));
        if (!TMA) cp_async_commit();  // empty groups keep the count uniform
    }
    Rows ahead = rows_of(STAGES - 1);

    // q, under the first tiles' copies
    for (int idx = threadIdx.x; idx < ROWS * D_TILE; idx += WARPS * 32) {
        const int r = idx / D_TILE, d = idx % D_TILE;
        T x;
        x.bits = 0;
        if (r < rows && d < f.headdim)
            x = static_cast<const T*>(f.q)[b * f.q_st.b + (i64)slab.query(f, r) * f.q_st.s + head(r) * f.q_st.h + d];
        sQ[r * LD + d] = x;
    }

    float o[MT][DT][4];
    zero(o);
    OnlineSoftmax<float> stats[MT][2];
    const float scale_log2 = float(f.scale) * float(LOG2E);
    __syncthreads();  // sQ

    for (int it = 0; it < mine; ++it) {
        if (it + STAGES - 1 < mine) load(it + STAGES - 1, ahead);
        ahead = rows_of(it + STAGES);
        T* slot = ring + (it % STAGES) * 2 * TILE;
        const int n0 = tile_start(it);
        if constexpr (TMA) {
            mbar_wait(&tile_full[warp][it % STAGES], (it / STAGES) & 1);
            if (n0 + BLOCK_N > end) {  // the rows past the split's end: zeros, as the copies make them
                for (int c = lane; c < BOXES * BLOCK_N * 8; c += 32) {  // 16-byte pieces, 8 a row of a box
                    const int r = (c / 8) % BLOCK_N;
                    if (n0 + r < end) continue;
                    reinterpret_cast<uint4*>(slot)[c] = make_uint4(0u, 0u, 0u, 0u);
                    reinterpret_cast<uint4*>(slot + TILE)[c] = make_uint4(0u, 0u, 0u, 0u);
                }
                __syncwarp();
            }
        } else {
            cp_async_commit();
            cp_async_wait<STAGES - 1>();
            __syncwarp();  // every lane's copies of this tile have landed
        }
        const T* cK = slot;
        const T* cV = cK + TILE;

        float s[MT][NT][4];
        zero(s);
        gemm_nt_16<T, D_TILE, BLOCK_N, LD>(s, sQ, kv_tile(cK), lane);

        const TileKind kind = var[0][0].tile_kind(0, f.seqlen_q, n0, BLOCK_N);
        auto softmax = [&](auto check) {
            constexpr bool CHECK = decltype(check)::value;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r = e / 2;
                        s[m][j][e] = var[m][r].template score<CHECK, true>(s[m][j][e], scale_log2, query[m][r],
                                                                           n0 + 8 * j + 2 * tq + e % 2);
                        tile_max[r] = fmax(tile_max[r], s[m][j][e]);
                    }
                float alpha[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) alpha[r] = stats[m][r].rescale(reduce_max<4>(tile_max[r]));
#pragma unroll
                for (int j = 0; j < DT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[m][j][e] *= alpha[e / 2];
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[m][j][e] = stats[m][e / 2].template prob<CHECK>(s[m][j][e]);
                        stats[m][e / 2].l += s[m][j][e];
                    }
            }
        };
        if (kind == INTERIOR) {
            softmax(Bool<false>());
        } else {
            softmax(Bool<true>());
        }

        // Keys outside the band are never read; inside it only several query positions can split a tile
        // into rows that see a key and rows that do not.
        // (a TMA tile's scan reads its boxes whole, as BOXES x BLOCK_N rows of 64 columns)
        if (Var::hides_keys && kind != INTERIOR && f.seqlen_q > 1 &&
            (TMA ? warp_tile_nonfinite<T, BOXES * BLOCK_N, 64, 64>(cV, lane)
                 : warp_tile_nonfinite<T, BLOCK_N, D_TILE, LD>(cV, lane)))
            gemm_rn_guarded<T, BLOCK_N, D_TILE, MT>(o, s, kv_tile(cV), lane);
        else
            gemm_rn_16<T, BLOCK_N, D_TILE>(o, s, kv_tile(cV), lane);
        __syncwarp();  // the slot is refilled by the next iteration's load
    }
    if constexpr (!TMA) cp_async_wait<0>();

    // ---- merge the warps, an mma tile of 16 rows at a time: each scales its o by exp2(m - M) / L, M and L its
    // rows' block max and sum; then the warps' sum goes into out (one split) or the split buffers
    float* s_o = reinterpret_cast<float*>(rings);  // [WARPS][16][LD_O]: a warp's pairs of columns fill 64 banks
    float* s_m = s_o + WARPS * 16 * LD_O;          // [WARPS][16]
    float* s_l = s_m + WARPS * 16;
    const bool direct = p.num_splits == 1;
    const i64 split_row0 = (i64)split * p.batch * f.nheads * f.seqlen_q;  // (split, b, h, i) rows
    auto out_row = [&](int row) { return ((i64)b * f.nheads + head(row)) * f.seqlen_q + slab.query(f, row); };  // (b, h, i)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        __syncthreads();  // every warp is done with its ring, or with the last tile's sums
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = reduce_sum<4>(stats[m][r].l);
            if (tq == 0) {
                s_m[warp * 16 + g + 8 * r] = stats[m][r].m;
                s_l[warp * 16 + g + 8 * r] = l;
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int tile_row = g + 8 * r, row = 16 * m + tile_row;
            OnlineSoftmax<float> block;  // a row no warp saw keeps m_use 0, as OnlineSoftmax::rescale
#pragma unroll
            for (int w = 0; w < WARPS; ++w) block.m = fmax(block.m, s_m[w * 16 + tile_row]);
            const float m_use = block.m == neg_inf<float>() ? 0.f : block.m;
            float l = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) l += s_l[w * 16 + tile_row] * fast_exp2(s_m[w * 16 + tile_row] - m_use);
            // a split's rows leave the learnable sink to the merge
            const auto end = block.end(l, direct ? sink_log2<float>(f.var, head(row)) : neg_inf<float>());
            const float factor = fast_exp2(stats[m][r].m - m_use) * end.o_factor;
#pragma unroll
            for (int j = 0; j < DT; ++j)
                *reinterpret_cast<float2*>(s_o + (warp * 16 + tile_row) * LD_O + 8 * j + 2 * tq) =
                    make_float2(o[m][j][2 * r] * factor, o[m][j][2 * r + 1] * factor);
            if (warp == 0 && tq == 0 && row < rows) {
                const float lse = end.lse;
                if (direct)
                    static_cast<float*>(f.lse)[out_row(row)] = lse;
                else
                    p.part_lse[split_row0 + out_row(row)] = lse;
            }
        }
        __syncthreads();

        // the tile's rows, four columns a thread
        const int tile_rows = min(16, rows - 16 * m);
        for (int idx = threadIdx.x; idx < tile_rows * D_TILE / 4; idx += WARPS * 32) {
            const int tile_row = idx / (D_TILE / 4), row = 16 * m + tile_row, d = idx % (D_TILE / 4) * 4;
            if (d >= f.headdim) continue;  // headdim is a multiple of 8 here
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float4 x = *reinterpret_cast<const float4*>(s_o + (w * 16 + tile_row) * LD_O + d);
                acc = make_float4(acc.x + x.x, acc.y + x.y, acc.z + x.z, acc.w + x.w);
            }
            if (direct) {
                T* dst = static_cast<T*>(f.out) + b * f.o_st.b + (i64)slab.query(f, row) * f.o_st.s +
                         head(row) * f.o_st.h + d;
                dst[0] = from_acc<T>(acc.x);
                dst[1] = from_acc<T>(acc.y);
                dst[2] = from_acc<T>(acc.z);
                dst[3] = from_acc<T>(acc.w);
            } else {
                *reinterpret_cast<float4*>(p.part_out + (split_row0 + out_row(row)) * f.headdim + d) = acc;
            }
        }
    }
    if (!direct) merge_splits_if_last<T, WARPS, ROWS>(p, b, slab);
}
