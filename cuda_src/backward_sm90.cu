// Backward pass for float16 / bfloat16 on Hopper (sm_90a): TMA, wgmma and warp specialisation, with
// FlashAttention-3's structure. A block holds one key tile's k, v, dk and dv while the band's query tiles
// of every head of the GQA group stream through; dq is summed in float32 across blocks.
//   flash_bwd_prepare_sm90  delta = rowsum(dout * out), lse in log2 units, and a zeroed float32 dq
//                           accumulator, each head's rows padded to whole query tiles
//   flash_bwd_sm90          headdim up to 128: 128-key tiles, 64 keys per consumer warpgroup
//                           (a block per key tile, kv head and batch, in the order of key_block)
//   flash_bwd_sm90_wide     headdim up to 256: 64-key tiles, each consumer warpgroup taking half of the
//                           keys for s and dp and half of the head's columns for dk, dv and dq
//   flash_bwd_dq_convert    dq = accumulator * scale in the input dtype
// In both main kernels
//   producer   (warpgroup 0) thread 0 loads k and v once, then q, dout, lse and delta of each query tile
//              into a ring of STAGES buffers (TMA and bulk copies, each stage completing an mbarrier);
//              thread 32 adds each tile's dq, which the consumers stage in the buffers of its q and dout,
//              to the accumulator with one bulk reduction (cp.reduce.async.bulk), then frees the stage;
//              warps 2 and 3, for variants that hide keys, scan the masked tiles' q and dout, and k, for
//              NaN or inf
//   consumers  (warpgroups 1 and 2), per query tile: s = q k^T and dp = dout v^T (wgmma), pd and dx
//              (mask.cuh; element masks on EDGE tiles only), dv += pd^T dout, dk += dx^T q, dq = dx k
//              (wgmma); the order of dq's additions varies from run to run.
// Tiles sit in shared memory as TMA writes them (128-byte swizzle, sm90.cuh); rows and columns past the
// ends of the tensors arrive as zeros; rows of k, q and dout past a packed sequence's end are its
// neighbour's, and the consumers zero them. Tiles whose hidden pairs meet data that is not finite take the
// guarded products (mma.cuh) instead; which do, producer warps find out off the consumers' path.
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "wgmma.cuh"

constexpr int SM90_BWD_BLOCK_M = 64;  // query rows per streamed tile

// The buffers padded to whole query tiles (delta, lse_log2, dq_accum) hold row i of (sequence b, head h) at
// padded_base(p, b) + h p.rows + i: (batch, nheads, rows) for a dense batch; (nheads, rows) for a packed one,
// sequence b from row (cu_seqlens_q[b] / BLOCK_M + b) BLOCK_M, which leaves each sequence its whole tiles.
template <bool PACKED>
__device__ __forceinline__ i64 padded_base(const BwdParamsSm90& p, int b) {
    if constexpr (PACKED) return (i64)(p.bwd.fwd.cu_seqlens_q[b] / SM90_BWD_BLOCK_M + b) * SM90_BWD_BLOCK_M;
    return (i64)b * p.bwd.fwd.nheads * p.rows;
}

// Query rows of the longest sequence padded to whole tiles.
__device__ __forceinline__ int padded_rows(int seqlen_q) {
    return (seqlen_q + SM90_BWD_BLOCK_M - 1) / SM90_BWD_BLOCK_M * SM90_BWD_BLOCK_M;
}

// LANES threads per padded row (head, row) of sequence blockIdx.y, VEC columns per load (16 bytes where the
// rows of dout and out are 16-byte aligned, else 1): delta = rowsum(dout o), lse in log2 units, and the
// row's dq accumulator zeroed.
template <typename T, bool PACKED, int LANES, int VEC>
__global__ void __launch_bounds__(128) flash_bwd_prepare_sm90(const __grid_constant__ BwdParamsSm90 p) {
    struct alignas(sizeof(T) * VEC) Vec { T x[VEC]; };
    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const int longest = padded_rows(f.seqlen_q), b = blockIdx.y, lane = threadIdx.x % LANES;
    const i64 at = (i64)blockIdx.x * (128 / LANES) + threadIdx.x / LANES;
    const int i = (int)(at % longest), h = (int)(at / longest);
    const Sequence seq = sequence<PACKED>(f, b);
    const bool padded = at < (i64)f.nheads * longest && i < padded_rows(seq.seqlen_q);  // a row of the accumulator
    float delta = 0.f;
    if (padded && i < seq.seqlen_q) {
        const T* dor = seq.query_rows(static_cast<const T*>(bp.dout), bp.do_st, h, i);
        const T* orow = seq.query_rows(static_cast<const T*>(f.out), f.o_st, h, i);
        for (int d = VEC * lane; d < f.headdim; d += VEC * LANES) {
            const Vec x = *reinterpret_cast<const Vec*>(dor + d), y = *reinterpret_cast<const Vec*>(orow + d);
#pragma unroll
            for (int e = 0; e < VEC; ++e) delta += to_acc(x.x[e]) * to_acc(y.x[e]);
        }
    }
    delta = reduce_sum<LANES>(delta);  // every lane of the warp takes part
    if (!padded) return;
    const i64 row = padded_base<PACKED>(p, b) + (i64)h * p.rows + i;
    if (lane == 0) {
        static_cast<float*>(bp.delta)[row] = delta;
        p.lse_log2[row] = i < seq.seqlen_q ? lse_log2(static_cast<const float*>(f.lse)[seq.stat_row0(f, h) + i]) : 0.f;
    }
    float4* accum = reinterpret_cast<float4*>(p.dq_accum + row * p.head_tile);
    for (int c = lane; c < p.head_tile / 4; c += LANES) accum[c] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// Item `index` of a grid under a causal or window bound, of `tiles` tiles for each of `pairs` (batch, head)
// pairs: the pairs fall into sections of `section` (the last one may be shorter) whose operands fit in L2
// together. Within a section the tile is the slowest axis, so that the blocks running at once meet tiles of
// nearly equal work, and the pair the fastest, so that every pair's operands stay in L2 for the section.
struct SectionedOrder {
    int tile, pair;
    __device__ SectionedOrder(int index, int tiles, int pairs, int section) {
        const int first = index / (tiles * section) * section, rank = index % (tiles * section);
        const int in_section = min(section, pairs - first);
        tile = rank / in_section;
        pair = first + rank % in_section;
    }
};

// The first key n0, kv head and batch of this block, from its index. Blocks start in the order of their
// index. Without a causal or window bound the key tiles of one kv head are the fastest axis: their blocks
// run side by side, read the same q and dout tiles and add into the same dq accumulator, in L2. With one,
// the (batch, kv head) pairs fall into sections whose q, dout and dq accumulator fit in L2
// (SectionedOrder), the first key tiles first (under a causal bound they see the most query tiles).
struct KeyBlock {
    int n0, hk, b;
};
template <typename Var, int BLOCK_N> __device__ __forceinline__ KeyBlock key_block(const BwdParamsSm90& p) {
    const FwdParams& f = p.bwd.fwd;
    const int key_tiles = (f.seqlen_k + BLOCK_N - 1) / BLOCK_N, nheads_kv = f.nheads / f.group, block = blockIdx.x;
    if constexpr (Var::window) {
        const SectionedOrder order(block, key_tiles, nheads_kv * p.batch, p.section);
        return {order.tile * BLOCK_N, order.pair % nheads_kv, order.pair / nheads_kv};
    }
    return {block % key_tiles * BLOCK_N, block / key_tiles % nheads_kv, block / key_tiles / nheads_kv};
}

// The query tiles a block streams: the band's tiles of head hk * group, then of the next head of the
// group (the band depends on the head only through ALiBi and masks, never through its bounds). Without a
// causal or window bound every key tile starts at another query tile, so that the blocks running side by
// side add their dq to different tiles of the accumulator (with one, the bands start apart already, and
// keeping the order measured faster).
template <int BLOCK_M, int BLOCK_N> struct QueryStream {
    Sequence seq;
    i64 padded;  // padded_base of the sequence
    int n0, hk, b, group, m_first, per_head, tiles, start;
    template <typename Var>
    __device__ QueryStream(const BwdParamsSm90& p, const Sequence& seq_, const Var& var, int n0_, int hk_, int b_)
        : seq(seq_), padded(padded_base<Var::packed>(p, b_)), n0(n0_), hk(hk_), b(b_), group(p.bwd.fwd.group) {
        int m_last;
        var.template query_tiles<BLOCK_M, BLOCK_N>(n0, m_first, m_last);
        per_head = m_last - m_first;
        tiles = group * per_head;
        start = !Var::window && per_head > 0 ? n0 / BLOCK_N % per_head : 0;
    }
    __device__ int head(int t) const { return hk * group + t / per_head; }
    __device__ int m0(int t) const { return (m_first + (t % per_head + start) % per_head) * BLOCK_M; }
    __device__ i64 padded_row(const BwdParamsSm90& p, int t) const { return padded + (i64)head(t) * p.rows + m0(t); }
};

// Shared memory of both main kernels: k and v ([CHUNKS][BLOCK_N][64] each), STAGES stages of q and dout
// ([CHUNKS][BLOCK_M][64] each, dout after q: 2 BLOCK_M D_TILE 16-bit values, the size of a float32 dq
// tile, which is staged there), the kernel's own OWN bytes, then lse and delta per stage and the barriers.
// Every tile the tensor cores read starts on a 1024-byte swizzle atom.
template <typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN> struct BwdSmem {
    static constexpr int Q_ELEMS = BLOCK_M * D_TILE, KV_ELEMS = BLOCK_N * D_TILE;
    static_assert(OWN % 1024 == 0 && Q_ELEMS * sizeof(T) % 1024 == 0, "swizzle atoms");
    T *k, *v, *stages;
    unsigned char *own, *barriers;
    float *lse2, *delta;
    __device__ explicit BwdSmem(unsigned char* smem_raw) {
        unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;
        k = reinterpret_cast<T*>(smem);
        v = k + KV_ELEMS;
        stages = v + KV_ELEMS;
        own = reinterpret_cast<unsigned char*>(stages + STAGES * 2 * Q_ELEMS);
        lse2 = reinterpret_cast<float*>(own + OWN);
        delta = lse2 + STAGES * BLOCK_M;
        barriers = reinterpret_cast<unsigned char*>(delta + STAGES * BLOCK_M);
    }
    __device__ T* q(int stage) const { return stages + stage * 2 * Q_ELEMS; }
    __device__ T* dout(int stage) const { return q(stage) + Q_ELEMS; }
    __device__ float* dq(int stage) const { return reinterpret_cast<float*>(q(stage)); }
};

// The barriers of both main kernels.
template <int STAGES> struct BwdBarriers {
    unsigned long long* kv_full;  // k and v arrived
    unsigned long long* q_full;   // [STAGES]: q, dout, lse and delta of a query tile arrived
    unsigned long long* dq_full;  // [STAGES]: the tile's dq staged (or nothing to add): every consumer thread
    unsigned long long* q_free;   // [STAGES]: the staged dq read by the reduction (and scan_queries done with
                                  // the tile): the stage may be refilled
    unsigned long long* k_scanned;  // k scanned (variants that hide keys: scan_keys)
    unsigned long long* q_scanned;  // [STAGES]: scan_queries is done with the query tile
    int* dq_staged;               // [STAGES]: whether the tile's dq was staged (a skipped tile has none)
    int* kinds;                   // [STAGES]: bool mask, the query tile's TileKind (load_tiles)
    int* k_scan;                  // k holds NaN or inf
    int* q_scan;                  // [STAGES]: a masked query tile's q or dout holds NaN or inf
    __device__ explicit BwdBarriers(unsigned char* at) {
        kv_full = reinterpret_cast<unsigned long long*>(at);
        q_full = kv_full + 1;
        dq_full = q_full + STAGES;
        q_free = dq_full + STAGES;
        k_scanned = q_free + STAGES;
        q_scanned = k_scanned + 1;
        dq_staged = reinterpret_cast<int*>(q_scanned + STAGES);
        kinds = dq_staged + STAGES;
        k_scan = kinds + STAGES;
        q_scan = k_scan + 1;
    }
    __device__ void init(int consumers, int scanners) const {
        mbar_init(kv_full, 1);
        mbar_init(k_scanned, 32);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(q_full + s, 1);
            mbar_init(dq_full + s, consumers);
            mbar_init(q_free + s, 1 + scanners);
            mbar_init(q_scanned + s, 32);
        }
        mbar_fence_init();
    }
    // Consumers, on a tile that hides keys: whether k, or query tile t's q or dout, holds NaN or inf, once
    // scanned. Every query tile's verdict is waited for, so that no phase of q_scanned goes by unobserved.
    __device__ bool keys_nonfinite() const {
        mbar_wait(k_scanned, 0);
        return *k_scan != 0;
    }
    __device__ bool queries_nonfinite(int t) const {
        mbar_wait(q_scanned + t % STAGES, (t / STAGES) & 1);
        return q_scan[t % STAGES] != 0;
    }
};

// Producer thread 0: k and v once, then query tile t into stage t % STAGES once the reduction has freed it.
// A bool mask's tile classification reads memory (its cells): the producer reads it while it waits and hands
// it over with the tile's arrival (which releases it).
template <typename Var, typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN>
__device__ __forceinline__ void load_tiles(const BwdParamsSm90& p, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                           const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                           const BwdBarriers<STAGES>& bar) {
    constexpr int CHUNKS = D_TILE / 64;
    const int k_row = int(qs.seq.k0) + qs.n0, q0 = int(qs.seq.q0), entry = qs.seq.entry;
    mbar_expect_tx(bar.kv_full, 2 * BLOCK_N * D_TILE * sizeof(T));
    for (int c = 0; c < CHUNKS; ++c) {
        tma_load(sm.k + c * BLOCK_N * 64, p.tma_k, c * 64, k_row, qs.hk, entry, bar.kv_full);
        tma_load(sm.v + c * BLOCK_N * 64, p.tma_v, c * 64, k_row, qs.hk, entry, bar.kv_full);
    }
    for (int t = 0; t < qs.tiles; ++t) {
        const int stage = t % STAGES, h = qs.head(t), m0 = qs.m0(t);
        unsigned long long* full = bar.q_full + stage;
        const int kind = Var::bool_mask ? variant_of<Var>(p.bwd.fwd, qs.seq, qs.b, h).tile_kind(m0, BLOCK_M, qs.n0, BLOCK_N)
                                        : 0;
        if (t >= STAGES) mbar_wait(bar.q_free + stage, (t / STAGES - 1) & 1);
        if constexpr (Var::bool_mask) {
            bar.kinds[stage] = kind;
            if (kind == SKIP) {  // nobody reads the tile: its phase completes without a copy
                mbar_arrive(full);
                continue;
            }
        }
        mbar_expect_tx(full, 2 * BLOCK_M * D_TILE * sizeof(T) + 2 * BLOCK_M * sizeof(float));
        for (int c = 0; c < CHUNKS; ++c) {
            tma_load(sm.q(stage) + c * BLOCK_M * 64, p.tma_q, c * 64, q0 + m0, h, entry, full);
            tma_load(sm.dout(stage) + c * BLOCK_M * 64, p.tma_do, c * 64, q0 + m0, h, entry, full);
        }
        const i64 stats = qs.padded_row(p, t);
        bulk_load(sm.lse2 + stage * BLOCK_M, p.lse_log2 + stats, BLOCK_M * sizeof(float), full);
        bulk_load(sm.delta + stage * BLOCK_M, static_cast<const float*>(p.bwd.delta) + stats, BLOCK_M * sizeof(float),
                  full);
    }
}

// Producer thread 32: each tile's staged dq into the accumulator (one bulk reduction; the accumulator keeps
// each tile in the consumers' register order, flash_bwd_dq_convert reads it back), then frees the stage.
template <typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN>
__device__ __forceinline__ void reduce_dq(const BwdParamsSm90& p, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                          const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                          const BwdBarriers<STAGES>& bar) {
    for (int t = 0; t < qs.tiles; ++t) {
        const int stage = t % STAGES;
        mbar_wait(bar.dq_full + stage, (t / STAGES) & 1);
        if (bar.dq_staged[stage]) {
            bulk_reduce_add(p.dq_accum + qs.padded_row(p, t) * D_TILE,
                            sm.dq(stage), BLOCK_M * D_TILE * sizeof(float));
            bulk_wait_read();
        }
        mbar_arrive(bar.q_free + stage);
    }
    bulk_wait_all();
}

// Producer warps 2 and 3, for variants that hide keys: a tile that hides some keys from some queries
// multiplies zeros by data those queries or keys must not meet, and 0 * NaN is NaN, so the consumers take the
// guarded products where k, or the tile's q or dout, holds NaN or inf. Warp 3 scans k once; warp 2 each
// masked query tile's q and dout once they arrive (the sequence's rows: a packed sequence's next ones are
// zeroed by the consumers). Warp 2 signs off every tile in turn, to the consumers (who wait for every
// verdict, reading the masked tiles' only) and to the producer (a stage is refilled once warp 2 is done with
// it too, so that it never falls a phase behind).
template <typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN>
__device__ __forceinline__ void scan_keys(const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                          const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                          const BwdBarriers<STAGES>& bar, int lane) {
    mbar_wait(bar.kv_full, 0);
    const bool bad = rows_nonfinite<T, BLOCK_N, D_TILE / 64>(sm.k, min(BLOCK_N, qs.seq.seqlen_k - qs.n0), lane);
    if (lane == 0) *bar.k_scan = bad;
    mbar_arrive(bar.k_scanned);
}
template <typename Var, typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN>
__device__ __forceinline__ void scan_queries(const BwdParamsSm90& p, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                             const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                             const BwdBarriers<STAGES>& bar, int lane) {
    constexpr int CHUNKS = D_TILE / 64;
    for (int t = 0; t < qs.tiles; ++t) {
        const int stage = t % STAGES, m0 = qs.m0(t), rows = min(BLOCK_M, qs.seq.seqlen_q - m0);
        const TileKind kind = variant_of<Var>(p.bwd.fwd, qs.seq, qs.b, qs.head(t)).tile_kind(m0, BLOCK_M, qs.n0, BLOCK_N);
        mbar_wait(bar.q_full + stage, (t / STAGES) & 1);
        const bool bad = kind != INTERIOR && kind != SKIP &&
                         (rows_nonfinite<T, BLOCK_M, CHUNKS>(sm.q(stage), rows, lane) ||
                          rows_nonfinite<T, BLOCK_M, CHUNKS>(sm.dout(stage), rows, lane));
        if (lane == 0) bar.q_scan[stage] = bad;
        mbar_arrive(bar.q_scanned + stage);
        mbar_arrive(bar.q_free + stage);
    }
}

// Consumers: a computed tile's dq (this warpgroup's N columns) into its stage, once no consumer reads the
// stage's q or dout any more; or, for a skipped tile, nothing.
template <int N, int STAGES>
__device__ __forceinline__ void stage_dq(const BwdBarriers<STAGES>& bar, float* staged, int stage, int wg,
                                         const float (&dq)[N / 8][4]) {
    named_barrier<256>(3);
    if (threadIdx.x == 128) bar.dq_staged[stage] = 1;
    float* mine = staged + (wg * (N / 8) * 128 + threadIdx.x % 128) * 4;
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
        *reinterpret_cast<float4*>(mine + j * 128 * 4) = make_float4(dq[j][0], dq[j][1], dq[j][2], dq[j][3]);
    fence_async_shared();
    mbar_arrive(bar.dq_full + stage);
}
template <int STAGES> __device__ __forceinline__ void stage_no_dq(const BwdBarriers<STAGES>& bar, int stage) {
    if (threadIdx.x == 128) bar.dq_staged[stage] = 0;
    mbar_arrive(bar.dq_full + stage);
}

// Consumers, before the stream: k and v arrived, k's rows past a packed sequence's end zeroed (its
// neighbour's).
template <typename Var, typename T, int D_TILE, int BLOCK_N, int STAGES, int BLOCK_M>
__device__ __forceinline__ void wait_keys(const BwdBarriers<STAGES>& bar, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                          T* k) {
    if (qs.tiles == 0) return;
    mbar_wait(bar.kv_full, 0);
    if (Var::packed && qs.n0 + BLOCK_N > qs.seq.seqlen_k) {
        zero_rows<T, BLOCK_N, D_TILE / 64, 256>(k, qs.seq.seqlen_k - qs.n0, threadIdx.x - 128);
        named_barrier<256>(1);
    }
}

// Consumers, per query tile t: its classification, once its stage has arrived (every phase is waited for,
// skipped tiles too, so that no copy into a stage is in flight when the producer reuses it), with the rows
// of q and dout past a packed sequence's end zeroed. A skipped tile stages no dq.
template <int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, typename Var, typename T, int OWN>
__device__ __forceinline__ TileKind next_query_tile(const Var& var, const BwdBarriers<STAGES>& bar,
                                                    const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                                    int t, int m0, int n0) {
    TileKind kind = Var::bool_mask ? SKIP : var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
    mbar_wait(bar.q_full + t % STAGES, (t / STAGES) & 1);
    if constexpr (Var::bool_mask) kind = TileKind(bar.kinds[t % STAGES]);
    if (kind == SKIP) {
        stage_no_dq(bar, t % STAGES);
        if constexpr (Var::hides_keys) bar.queries_nonfinite(t);
    } else if (Var::packed && m0 + BLOCK_M > var.seqlen_q) {
        zero_rows<T, BLOCK_M, D_TILE / 64, 256>(sm.q(t % STAGES), var.seqlen_q - m0, threadIdx.x - 128);
        zero_rows<T, BLOCK_M, D_TILE / 64, 256>(sm.dout(t % STAGES), var.seqlen_q - m0, threadIdx.x - 128);
        named_barrier<256>(1);
    }
    return kind;
}

// dk (times the softmax scale) and dv of this warp's rows of the key tile at n0, columns from col0.
template <typename T, int N>
__device__ __forceinline__ void store_dk_dv(const BwdParams& bp, const Sequence& seq, int n0, int hk, int row0,
                                            int col0, const float (&dk)[N / 8][4], const float (&dv)[N / 8][4],
                                            int lane) {
    const FwdParams& f = bp.fwd;
    const float dk_scale[2] = {float(f.scale), float(f.scale)}, dv_scale[2] = {1.f, 1.f};
    store_slab(seq.key_rows(static_cast<T*>(bp.dk), bp.dk_st, hk, n0) + col0, bp.dk_st.s, dk, dk_scale, row0,
               seq.seqlen_k - n0, f.headdim - col0, lane);
    store_slab(seq.key_rows(static_cast<T*>(bp.dv), bp.dv_st, hk, n0) + col0, bp.dv_st.s, dv, dv_scale, row0,
               seq.seqlen_k - n0, f.headdim - col0, lane);
}

// Headdim up to 128. Each consumer warpgroup owns 64 of the 128 keys: s^T = k q^T and dp^T = v dout^T with
// keys as rows, so that pd^T and dx^T feed dv and dk from registers; dx^T goes through shared memory to
// both warpgroups, each computing half of dq's columns.
template <typename T, int D_TILE, int STAGES, typename Var>
__global__ void __launch_bounds__(384, 1) flash_bwd_sm90(const __grid_constant__ BwdParamsSm90 p) {
    constexpr int BLOCK_M = SM90_BWD_BLOCK_M, BLOCK_N = 128, CONSUMERS = 256;
    constexpr int MT = BLOCK_M / 8, DT = D_TILE / 8, DQ_COLS = D_TILE / 2, DS_ELEMS = BLOCK_N * BLOCK_M;
    // dropout: each consumer warpgroup's Philox words of a tile, [MT][32 lanes][4] (draw_group_words)
    constexpr int GROUP_WORDS = MT * 32 * 4, WORDS_BYTES = Var::dropout ? 2 * GROUP_WORDS * 4 : 0;
    static_assert(D_TILE % 64 == 0 && DQ_COLS % 32 == 0, "tile shape");

    extern __shared__ unsigned char smem_raw[];
    const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, 2 * DS_ELEMS * sizeof(T) + WORDS_BYTES> sm(smem_raw);
    T* sdS = reinterpret_cast<T*>(sm.own);  // [2][BLOCK_N][BLOCK_M]: dx^T, keys by queries
    const BwdBarriers<STAGES> bar(sm.barriers);

    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const KeyBlock kb = key_block<Var, BLOCK_N>(p);
    const int n0 = kb.n0, hk = kb.hk, b = kb.b;
    const Sequence seq = sequence<Var::packed>(f, b);
    if (n0 >= seq.seqlen_k) return;  // a packed sequence shorter than the longest
    const QueryStream<BLOCK_M, BLOCK_N> qs(p, seq, variant_of<Var>(f, seq, b, hk * f.group), n0, hk, b);

    if (threadIdx.x == 0) bar.init(CONSUMERS, Var::hides_keys ? 32 : 0);
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer
        regs_release<24>();
        if (threadIdx.x == 0 && qs.tiles > 0) load_tiles<Var>(p, qs, sm, bar);
        if (threadIdx.x == 32 && qs.tiles > 0) reduce_dq(p, qs, sm, bar);
        if (Var::hides_keys && threadIdx.x / 32 == 2 && qs.tiles > 0) scan_queries<Var>(p, qs, sm, bar, threadIdx.x % 32);
        if (Var::hides_keys && threadIdx.x / 32 == 3 && qs.tiles > 0) scan_keys(qs, sm, bar, threadIdx.x % 32);
    } else {
        // ---- consumers
        regs_claim<240>();
        const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
        const int g = lane / 4, tq = lane % 4, key0 = n0 + 64 * wg + 16 * warp + g;
        const float scale_log2 = float(f.scale) * float(LOG2E);
        const T* k_rows = sm.k + 64 * wg * 64;  // this warpgroup's keys of each chunk
        const T* v_rows = sm.v + 64 * wg * 64;
        const int dq_col0 = wg * DQ_COLS;       // this warpgroup's columns of dq
        const T* k_cols = sm.k + (dq_col0 / 64) * BLOCK_N * 64 + dq_col0 % 64;
        unsigned* group_words = reinterpret_cast<unsigned*>(sm.own + 2 * DS_ELEMS * sizeof(T)) + wg * GROUP_WORDS;

        float dk[DT][4], dv[DT][4];
        zero(dk);
        zero(dv);
        float(&dk_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(dk);
        float(&dv_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(dv);

        wait_keys<Var, T, D_TILE>(bar, qs, sm.k);

        for (int t = 0, computed = 0; t < qs.tiles; ++t) {
            const int stage = t % STAGES, m0 = qs.m0(t);
            const Var var = variant_of<Var>(f, seq, b, qs.head(t));
            const TileKind kind = next_query_tile<BLOCK_M, BLOCK_N, D_TILE>(var, bar, sm, t, m0, n0);
            if (kind == SKIP) continue;
            const T* q_buf = sm.q(stage);
            const T* do_buf = sm.dout(stage);
            float st[MT][4], dpt[MT][4];
            float(&st_regs)[MT * 4] = reinterpret_cast<float(&)[MT * 4]>(st);
            float(&dpt_regs)[MT * 4] = reinterpret_cast<float(&)[MT * 4]>(dpt);
            wgmma_fence();
            wgmma_nt<T, BLOCK_M, D_TILE, BLOCK_N, BLOCK_M>(st_regs, k_rows, q_buf);
            wgmma_nt<T, BLOCK_M, D_TILE, BLOCK_N, BLOCK_M>(dpt_regs, v_rows, do_buf);
            wgmma_commit();
            if constexpr (Var::dropout)  // under the products; the last tile's words were read before barrier 2
                draw_group_words<MT>(var, group_words, m0, key0, warp, lane, [&] { named_barrier<128>(4 + wg); });
            wgmma_wait<0>();
            fence_regs(st_regs);
            fence_regs(dpt_regs);

            const bool needs_mask = kind != INTERIOR;
            const float* lse2 = sm.lse2 + stage * BLOCK_M;
            const float* delta = sm.delta + stage * BLOCK_M;
            check_tile(kind, var, [&](auto check, const Var& v) {
                key_rows_backward<decltype(check)::value, true, true>(v, st, dpt, m0, key0, warp, lane, scale_log2, lse2,
                                                                delta, static_cast<const float*>(nullptr), group_words);
            });
            // pd^T and dx^T in the A layout of wgmma: consecutive pairs of the accumulators
            unsigned p_regs[MT * 2], ds_regs[MT * 2];
#pragma unroll
            for (int i = 0; i < MT * 2; ++i) {
                p_regs[i] = pack2<T>(st_regs[2 * i], st_regs[2 * i + 1]);
                ds_regs[i] = pack2<T>(dpt_regs[2 * i], dpt_regs[2 * i + 1]);
            }

            // A tile where hidden queries' q or dout is not finite takes the guarded products, after
            // the dq product (no wgmma in flight then).
            const bool guarded = Var::hides_keys && bar.queries_nonfinite(t) && needs_mask;
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

            // dx^T to shared memory for both warpgroups' dq (buffers alternate: the barrier below of the
            // next computed tile is passed only once every dq product of this one has finished).
            T* ds_buf = sdS + (computed++ % 2) * DS_ELEMS;
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
            if (Var::hides_keys && needs_mask && bar.keys_nonfinite()) {
                // Non-finite keys reach only the queries that see them: dq again, on CUDA cores.
                zero(dq);
                gemm_guarded_smem<BLOCK_N, DQ_COLS>(dq, Transposed<SwizzledTile<T, BLOCK_N>>{{ds_buf}},
                                                    Shifted<SwizzledTile<T, BLOCK_N>>{{sm.k}, dq_col0}, 16 * warp,
                                                    lane);
            }
            stage_dq<DQ_COLS>(bar, sm.dq(stage), stage, wg, dq);
        }
        store_dk_dv<T, D_TILE>(bp, seq, n0, hk, 64 * wg + 16 * warp, 0, dk, dv, lane);
    }
}

// Headdim up to 256: 64-key tiles, the products split between the consumer warpgroups as
//   s, dp (queries by keys)    each warpgroup 32 of the keys, all of the head
//   pd, dx                     to shared memory, for both warpgroups
//   dv, dk (keys by head)      each warpgroup half of the head's columns, pd^T and dx^T from shared memory
//   dq (queries by head)       each warpgroup half of the head's columns
// so that dk, dv and dq of 128 columns each stay in registers.
template <typename T, int D_TILE, int STAGES, typename Var>
__global__ void __launch_bounds__(384, 1) flash_bwd_sm90_wide(const __grid_constant__ BwdParamsSm90 p) {
    constexpr int BLOCK_M = SM90_BWD_BLOCK_M, BLOCK_N = 64, CONSUMERS = 256;
    constexpr int KEYS = BLOCK_N / 2, NT = KEYS / 8, HALF = D_TILE / 2, HT = HALF / 8, PS_ELEMS = BLOCK_M * BLOCK_N;
    static_assert(D_TILE % 128 == 0, "tile shape: each warpgroup's half of the head is whole 64-column chunks");

    extern __shared__ unsigned char smem_raw[];
    const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, 4 * PS_ELEMS * sizeof(T)> sm(smem_raw);
    T* sP = reinterpret_cast<T*>(sm.own);  // [2][BLOCK_M][BLOCK_N]: pd, queries by keys
    T* sdS = sP + 2 * PS_ELEMS;             // [2][BLOCK_M][BLOCK_N]: dx
    const BwdBarriers<STAGES> bar(sm.barriers);

    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const KeyBlock kb = key_block<Var, BLOCK_N>(p);
    const int n0 = kb.n0, hk = kb.hk, b = kb.b;
    const Sequence seq = sequence<Var::packed>(f, b);
    if (n0 >= seq.seqlen_k) return;  // a packed sequence shorter than the longest
    const QueryStream<BLOCK_M, BLOCK_N> qs(p, seq, variant_of<Var>(f, seq, b, hk * f.group), n0, hk, b);

    if (threadIdx.x == 0) bar.init(CONSUMERS, Var::hides_keys ? 32 : 0);
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer
        regs_release<24>();
        if (threadIdx.x == 0 && qs.tiles > 0) load_tiles<Var>(p, qs, sm, bar);
        if (threadIdx.x == 32 && qs.tiles > 0) reduce_dq(p, qs, sm, bar);
        if (Var::hides_keys && threadIdx.x / 32 == 2 && qs.tiles > 0) scan_queries<Var>(p, qs, sm, bar, threadIdx.x % 32);
        if (Var::hides_keys && threadIdx.x / 32 == 3 && qs.tiles > 0) scan_keys(qs, sm, bar, threadIdx.x % 32);
    } else {
        // ---- consumers
        regs_claim<240>();
        const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
        const int g = lane / 4, tq = lane % 4, row_in = 16 * warp + g;  // rows row_in and + 8 of a query tile
        const float scale_log2 = float(f.scale) * float(LOG2E);
        const int key_col0 = KEYS * wg;  // this warpgroup's keys of the tile, for s and dp
        const T* k_keys = sm.k + key_col0 * 64;
        const T* v_keys = sm.v + key_col0 * 64;
        const int chunk0 = wg * HALF / 64;  // this warpgroup's columns of the head, for dk, dv and dq

        float dk[HT][4], dv[HT][4];
        zero(dk);
        zero(dv);
        float(&dk_regs)[HT * 4] = reinterpret_cast<float(&)[HT * 4]>(dk);
        float(&dv_regs)[HT * 4] = reinterpret_cast<float(&)[HT * 4]>(dv);

        wait_keys<Var, T, D_TILE>(bar, qs, sm.k);

        for (int t = 0, computed = 0; t < qs.tiles; ++t) {
            const int stage = t % STAGES, m0 = qs.m0(t);
            const Var var = variant_of<Var>(f, seq, b, qs.head(t));
            const TileKind kind = next_query_tile<BLOCK_M, BLOCK_N, D_TILE>(var, bar, sm, t, m0, n0);
            if (kind == SKIP) continue;
            const T* q_buf = sm.q(stage);
            const T* do_buf = sm.dout(stage);
            float s[NT][4], dp[NT][4];
            float(&s_regs)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(s);
            float(&dp_regs)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(dp);
            wgmma_fence();
            wgmma_nt<T, KEYS, D_TILE, BLOCK_M, BLOCK_N>(s_regs, q_buf, k_keys);
            wgmma_nt<T, KEYS, D_TILE, BLOCK_M, BLOCK_N>(dp_regs, do_buf, v_keys);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(s_regs);
            fence_regs(dp_regs);

            const float* lse_tile = sm.lse2 + stage * BLOCK_M;
            const float* delta_tile = sm.delta + stage * BLOCK_M;
            const float lse2[2] = {lse_tile[row_in], lse_tile[row_in + 8]};
            const float delta[2] = {delta_tile[row_in], delta_tile[row_in + 8]};
            const bool needs_mask = kind != INTERIOR;
            check_tile(kind, var, [&](auto check, const Var& v) {
                query_rows_backward<decltype(check)::value, true>(v, s, dp, m0 + row_in, n0 + key_col0, tq, scale_log2, lse2,
                                                                  delta, static_cast<float*>(nullptr), 0, 0);
            });
            // pd and dx to shared memory for both warpgroups (buffers alternate, as in flash_bwd_sm90)
            T* p_buf = sP + (computed % 2) * PS_ELEMS;
            T* ds_buf = sdS + (computed++ % 2) * PS_ELEMS;
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = row_in + 8 * r, col = key_col0 + 8 * j + 2 * tq;
                    *reinterpret_cast<unsigned*>(const_cast<T*>(swizzled(p_buf, BLOCK_M, row, col))) =
                        pack2<T>(s[j][2 * r], s[j][2 * r + 1]);
                    *reinterpret_cast<unsigned*>(const_cast<T*>(swizzled(ds_buf, BLOCK_M, row, col))) =
                        pack2<T>(dp[j][2 * r], dp[j][2 * r + 1]);
                }
            fence_async_shared();
            named_barrier<CONSUMERS>(2);

            const T* do_half = do_buf + chunk0 * BLOCK_M * 64;
            const T* q_half = q_buf + chunk0 * BLOCK_M * 64;
            const T* k_half = sm.k + chunk0 * BLOCK_N * 64;
            float dq[HT][4];
            const bool queries_bad = Var::hides_keys && bar.queries_nonfinite(t);
            if (!(Var::hides_keys && needs_mask && (queries_bad || bar.keys_nonfinite()))) {
                float(&dq_regs)[HT * 4] = reinterpret_cast<float(&)[HT * 4]>(dq);
                fence_regs(dv_regs);
                fence_regs(dk_regs);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_ss_tt<T, HALF>(dv_regs, desc_n_major(p_buf, kk, BLOCK_M * 128),
                                         desc_n_major(do_half, kk, BLOCK_M * 128), 1);
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_ss_tt<T, HALF>(dk_regs, desc_n_major(ds_buf, kk, BLOCK_M * 128),
                                         desc_n_major(q_half, kk, BLOCK_M * 128), 1);
#pragma unroll
                for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                    wgmma_ss_bt<T, HALF>(dq_regs, desc_k_major(ds_buf, kk), desc_n_major(k_half, kk, BLOCK_N * 128),
                                         kk > 0);
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(dq_regs);
                fence_regs(dv_regs);
                fence_regs(dk_regs);
            } else {
                // Data hidden from some pair is not finite: every product on CUDA cores, masked pairs kept out.
                zero(dq);
                gemm_guarded_smem<BLOCK_M, HALF>(dv, Transposed<SwizzledTile<T, BLOCK_M>>{{p_buf}},
                                                 SwizzledTile<T, BLOCK_M>{do_half}, 16 * warp, lane);
                gemm_guarded_smem<BLOCK_M, HALF>(dk, Transposed<SwizzledTile<T, BLOCK_M>>{{ds_buf}},
                                                 SwizzledTile<T, BLOCK_M>{q_half}, 16 * warp, lane);
                gemm_guarded_smem<BLOCK_N, HALF>(dq, SwizzledTile<T, BLOCK_M>{ds_buf},
                                                 SwizzledTile<T, BLOCK_N>{k_half}, 16 * warp, lane);
            }
            stage_dq<HALF>(bar, sm.dq(stage), stage, wg, dq);
        }
        store_dk_dv<T, HALF>(bp, seq, n0, hk, 16 * warp, wg * HALF, dk, dv, lane);
    }
}

// One thread per four accumulator values of sequence blockIdx.y: each 64-row tile of the accumulator is stored
// in the consumers' register order, [warpgroup][8-column group j][thread][4] with thread = 32 warp + 4 g + tq,
// values 2 er + ec at row 16 warp + 8 er + g, column 8 j + 2 tq + ec of the warpgroup's half of the head.
template <typename T, bool PACKED>
__global__ void __launch_bounds__(256) flash_bwd_dq_convert(const __grid_constant__ BwdParamsSm90 p) {
    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    const int tile_quads = SM90_BWD_BLOCK_M * p.head_tile / 4, half = p.head_tile / 2, b = blockIdx.y;
    const int tiles = padded_rows(f.seqlen_q) / SM90_BWD_BLOCK_M;
    const i64 quad = (i64)blockIdx.x * 256 + threadIdx.x;
    if (quad >= (i64)f.nheads * tiles * tile_quads) return;
    const int tile = (int)(quad / tile_quads), h = tile / tiles, m0 = tile % tiles * SM90_BWD_BLOCK_M;
    const Sequence seq = sequence<PACKED>(f, b);
    if (m0 >= seq.seqlen_q) return;
    const int at = (int)(quad % tile_quads), thread = at % 128, j = at / 128 % (half / 8), wg = at / 128 / (half / 8);
    const i64 row0 = padded_base<PACKED>(p, b) + (i64)h * p.rows + m0;
    const float4 x = reinterpret_cast<const float4*>(p.dq_accum + row0 * p.head_tile)[at];
    const int row = m0 + (thread / 32) * 16 + (thread % 32) / 4;
    const int col = wg * half + 8 * j + 2 * (thread % 4);
    const float scale = float(f.scale);
    T* dq = seq.query_rows(static_cast<T*>(bp.dq), bp.dq_st, h, 0);
    const bool aligned = reinterpret_cast<unsigned long long>(dq) % 4 == 0 && bp.dq_st.s % 2 == 0;
    const float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int er = 0; er < 2; ++er)
        if (row + 8 * er < seq.seqlen_q && col < f.headdim)
            store_pair(dq + (i64)(row + 8 * er) * bp.dq_st.s + col, v[2 * er] * scale, v[2 * er + 1] * scale, aligned,
                       f.headdim - col);
}
