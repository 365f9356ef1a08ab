// Backward pass on Hopper (sm_90a): TMA, wgmma and warp specialisation, with FlashAttention-3's structure. A
// key block holds one key tile's k, v, dk and dv while the band's query tiles of every head of the GQA group
// stream through; dq is summed in float32 across key blocks. A main kernel's block takes key blocks in turn
// (for_each_key_block): one each, or on short key blocks a block per multiprocessor through many, loading
// the next one's k and v as the last one ends (_plan.sm90_backward_blocks).
//   flash_bwd_prepare_sm90  delta = rowsum(dout * out) and lse in log2 units, each head's rows padded to
//                           whole query tiles, and the float32 dq accumulator's tiles marked unwritten
//   flash_bwd_sm90          float16 / bfloat16, headdim up to 128: 128-key tiles, 64 keys per consumer
//                           warpgroup
//   flash_bwd_sm90_wide     float16 / bfloat16, headdim up to 256: 64-key tiles, each consumer warpgroup
//                           taking half of the keys for s and dp and half of the head's columns for dk, dv
//                           and dq
//   flash_bwd_sm90_row_sums float32 on bfloat16 parts (split.cuh): each query row's sum of the
//                           probabilities flash_bwd_sm90_split recomputes, for their renormalization (a
//                           block per 128 query rows, head and sequence)
//   flash_bwd_sm90_split    float32 on bfloat16 parts, headdim up to 128: 64-key tiles, one consumer
//                           warpgroup computing dv, the other dk and dq
//   flash_bwd_dq_convert    dq = accumulator * scale in the input dtype (0 in tiles no key block wrote)
// In the main kernels
//   producer   (warpgroup 0) thread 0 takes the key blocks and loads each one's k and v, and q, dout, lse
//              and delta of each of its query tiles into a ring of STAGES buffers (TMA and bulk copies,
//              each stage completing an mbarrier); thread 32 adds each tile's dq, which the consumers stage
//              in the buffers of its q and dout, to the accumulator with one bulk reduction
//              (cp.reduce.async.bulk), or stores it if it is the tile's first (add_dq_tile), then frees
//              the stage;
//              in the 16-bit kernels warps 2 and 3, for variants that hide keys, scan the masked tiles' q
//              and dout, and k, for NaN or inf
//   consumers  (warpgroups 1 and 2) of the 16-bit kernels, per query tile: s = q k^T and dp = dout v^T
//              (wgmma), pd and dx (mask.cuh; element masks on EDGE tiles only), dv += pd^T dout,
//              dk += dx^T q, dq = dx k (wgmma); the order of dq's additions varies from run to run.
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

constexpr int SM90_BWD_BLOCK_M = 64;        // query rows per streamed tile (16-bit)
constexpr int SM90_SPLIT_BWD_BLOCK_M = 32;  // and on split float32 operands

// The query tile of the main kernel of inputs T (float: split operands), the unit in which the accumulator
// takes dq (add_dq_tile, p.dq_tiles_written).
template <typename T> struct DqTile { static constexpr int ROWS = SM90_BWD_BLOCK_M; };
template <> struct DqTile<float> { static constexpr int ROWS = SM90_SPLIT_BWD_BLOCK_M; };

// The buffers padded to whole query tiles (delta, lse_log2, dq_accum) hold row i of (sequence b, head h) at
// padded_base(p, b) + h p.rows + i: (batch, nheads, rows) for a dense batch; (nheads, rows) for a packed one,
// sequence b from row (cu_seqlens_q[b] / BLOCK_M + b) BLOCK_M, which leaves each sequence its whole tiles.
template <bool PACKED>
__device__ __forceinline__ i64 padded_base(const BwdParamsSm90& p, int b) {
    if constexpr (PACKED) {
        const FwdParams& f = p.bwd.fwd;
        return (i64)(packed_start(f.cu_seqlens_q, b, f.total_q) / SM90_BWD_BLOCK_M + b) * SM90_BWD_BLOCK_M;
    }
    return (i64)b * p.bwd.fwd.nheads * p.rows;
}

// Query rows of the longest sequence padded to whole tiles.
__device__ __forceinline__ int padded_rows(int seqlen_q) {
    return (seqlen_q + SM90_BWD_BLOCK_M - 1) / SM90_BWD_BLOCK_M * SM90_BWD_BLOCK_M;
}

// LANES threads per padded row (head, row) of sequence blockIdx.y, VEC columns per load (16 bytes where the
// rows of dout and out are 16-byte aligned, else 1): delta = rowsum(dout o), lse in log2 units, and on a
// query tile's first row the tile of the dq accumulator marked unwritten; and the main kernel's count of key
// blocks taken. The accumulator itself is not zeroed: each tile's first sum is stored (add_dq_tile).
template <typename T, bool PACKED, int LANES, int VEC>
__global__ void __launch_bounds__(128) flash_bwd_prepare_sm90(const __grid_constant__ BwdParamsSm90 p) {
    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    if (gated_off(f)) return;
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *p.key_blocks_taken = 0;
    const int longest = padded_rows(f.seqlen_q), b = blockIdx.y, lane = threadIdx.x % LANES;
    const i64 at = (i64)blockIdx.x * (128 / LANES) + threadIdx.x / LANES;
    const int i = (int)(at % longest), h = (int)(at / longest);
    const Sequence seq = sequence<PACKED>(f, b);
    const bool padded = at < (i64)f.nheads * longest && i < padded_rows(seq.seqlen_q);  // a row of the accumulator
    float delta = 0.f;
    if (padded && i < seq.seqlen_q) {
        const T* dor = seq.query_rows(static_cast<const T*>(bp.dout), bp.do_st, h, i);
        const T* orow = seq.query_rows(static_cast<const T*>(f.out), f.o_st, h, i);
        add_row_dot<LANES, VEC>(delta, dor, orow, f.headdim, lane);
    }
    delta = reduce_sum<LANES>(delta);  // every lane of the warp takes part
    if (!padded) return;
    const i64 row = padded_base<PACKED>(p, b) + (i64)h * p.rows + i;
    if (lane == 0) {
        static_cast<float*>(bp.delta)[row] = delta;
        p.lse_log2[row] = i < seq.seqlen_q ? lse_log2(static_cast<const float*>(f.lse)[seq.stat_row0(f, h) + i]) : 0.f;
    }
    if (lane == 0 && row % DqTile<T>::ROWS == 0) p.dq_tiles_written[row / DqTile<T>::ROWS] = 0;
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

// Key block `block`: its first key n0, kv head and batch. Blocks are taken in the order of their index.
// Without a causal or window bound the key tiles of one kv head are the fastest axis: their blocks run side
// by side, read the same q and dout tiles and add into the same dq accumulator, in L2. With one, the
// (batch, kv head) pairs fall into sections whose q, dout and dq accumulator fit in L2 (SectionedOrder), the
// first key tiles first (under a causal bound they see the most query tiles).
struct KeyBlock {
    int n0, hk, b;
};
template <int BLOCK_N> __device__ __forceinline__ int key_block_count(const BwdParamsSm90& p) {
    const FwdParams& f = p.bwd.fwd;
    return (f.seqlen_k + BLOCK_N - 1) / BLOCK_N * (f.nheads / f.group) * p.batch;
}
template <typename Var, int BLOCK_N> __device__ __forceinline__ KeyBlock key_block(const BwdParamsSm90& p, int block) {
    const FwdParams& f = p.bwd.fwd;
    const int key_tiles = (f.seqlen_k + BLOCK_N - 1) / BLOCK_N, nheads_kv = f.nheads / f.group;
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
struct QueryTile {
    int t, within, head;  // the stream's t-th tile: t % per_head and its head
};
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
    // The stream's tiles in turn, each stepped from the last without a division (a division's reciprocal
    // in every role's loop, ahead of the consumers' first product of a tile, cost 5% at headdim 128).
    __device__ QueryTile first() const { return {0, 0, hk * group}; }
    __device__ void next(QueryTile& q) const {
        ++q.t;
        if (++q.within == per_head) {
            q.within = 0;
            ++q.head;
        }
    }
    __device__ int m0(const QueryTile& q) const {
        const int r = q.within + start;
        return (m_first + (r < per_head ? r : r - per_head)) * BLOCK_M;
    }
    __device__ i64 padded_row(const BwdParamsSm90& p, const QueryTile& q) const {
        return padded + (i64)q.head * p.rows + m0(q);
    }
};

// Shared memory of the main kernels: k and v ([PARTS][CHUNKS][BLOCK_N][64] each), STAGES stages of q and
// dout ([PARTS][CHUNKS][BLOCK_M][64] each, dout after q: at least BLOCK_M D_TILE 32-bit values, the size of a
// float32 dq tile, which is staged in q's place), the kernel's own OWN bytes, then lse and delta (and for
// split operands the rows' sums of probabilities, flash_bwd_sm90_row_sums) per stage and the barriers. T is
// what the tensor cores read: the input dtype, or float32's PARTS bfloat16 parts (split.cuh). Every tile the
// tensor cores read starts on a 1024-byte swizzle atom.
template <typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN, int PARTS = 1> struct BwdSmem {
    static constexpr int Q_ELEMS = BLOCK_M * D_TILE, KV_ELEMS = BLOCK_N * D_TILE;
    static_assert(OWN % 1024 == 0 && Q_ELEMS * sizeof(T) % 1024 == 0, "swizzle atoms");
    static constexpr int STATS = PARTS > 1 ? 3 : 2;  // floats per query row and stage
    T *k, *v, *stages;
    unsigned char *own, *barriers;
    float *lse2, *delta, *sums;
    __device__ explicit BwdSmem(unsigned char* smem_raw) {
        unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;
        k = reinterpret_cast<T*>(smem);
        v = k + PARTS * KV_ELEMS;
        stages = v + PARTS * KV_ELEMS;
        own = reinterpret_cast<unsigned char*>(stages + STAGES * 2 * PARTS * Q_ELEMS);
        lse2 = reinterpret_cast<float*>(own + OWN);
        delta = lse2 + STAGES * BLOCK_M;
        sums = delta + STAGES * BLOCK_M;
        barriers = reinterpret_cast<unsigned char*>(lse2 + STATS * STAGES * BLOCK_M);
    }
    __device__ T* q(int stage) const { return stages + stage * 2 * PARTS * Q_ELEMS; }
    __device__ T* dout(int stage) const { return q(stage) + PARTS * Q_ELEMS; }
    __device__ float* dq(int stage) const { return reinterpret_cast<float*>(q(stage)); }
};

// The barriers of the main kernels. Query tiles are counted across a block's key blocks (its i-th tile,
// whichever key block it belongs to, takes stage i % STAGES), and so are the key blocks whose k and v were
// loaded (`loaded`: the phase of kv_full, kv_free and k_scanned).
constexpr int KEY_BLOCK_SLOTS = 2;  // key blocks taken ahead of the roles that read them
template <int STAGES> struct BwdBarriers {
    unsigned long long* kv_full;  // k and v arrived
    unsigned long long* kv_free;  // every consumer (and scan_keys) is done with k and v: the next may load
    unsigned long long* q_full;   // [STAGES]: q, dout, lse and delta of a query tile arrived
    unsigned long long* dq_full;  // [STAGES]: the tile's dq staged (or nothing to add): every consumer thread
    unsigned long long* q_free;   // [STAGES]: the staged dq read by the reduction (and scan_queries done with
                                  // the tile): the stage may be refilled
    unsigned long long* k_scanned;  // k scanned (variants that hide keys: scan_keys)
    unsigned long long* q_scanned;  // [STAGES]: scan_queries is done with the query tile
    unsigned long long* block_full;  // [KEY_BLOCK_SLOTS]: the producer wrote the slot
    unsigned long long* block_free;  // [KEY_BLOCK_SLOTS]: every other role read it
    int* dq_staged;               // [STAGES]: whether the tile's dq was staged (a skipped tile has none)
    int* kinds;                   // [STAGES]: bool mask, the query tile's TileKind (load_tiles)
    int* k_scan;                  // k holds NaN or inf
    int* q_scan;                  // [STAGES]: a masked query tile's q or dout holds NaN or inf
    int* block_slots;             // [KEY_BLOCK_SLOTS]: the key blocks taken, -1 past the last
    __device__ explicit BwdBarriers(unsigned char* at) {
        kv_full = reinterpret_cast<unsigned long long*>(at);
        kv_free = kv_full + 1;
        q_full = kv_free + 1;
        dq_full = q_full + STAGES;
        q_free = dq_full + STAGES;
        k_scanned = q_free + STAGES;
        q_scanned = k_scanned + 1;
        block_full = q_scanned + STAGES;
        block_free = block_full + KEY_BLOCK_SLOTS;
        dq_staged = reinterpret_cast<int*>(block_free + KEY_BLOCK_SLOTS);
        kinds = dq_staged + STAGES;
        k_scan = kinds + STAGES;
        q_scan = k_scan + 1;
        block_slots = q_scan + STAGES;
    }
    // dq_full and kv_free complete on `consumers` arrivals, q_free on the reduction's, and each of kv_free and
    // q_free on `scanners` more; block_free on every reader of the slots (all but the producer thread).
    __device__ void init(int consumers, int scanners) const {
        mbar_init(kv_full, 1);
        mbar_init(kv_free, consumers + scanners);
        mbar_init(k_scanned, 32);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(q_full + s, 1);
            mbar_init(dq_full + s, consumers);
            mbar_init(q_free + s, 1 + scanners);
            mbar_init(q_scanned + s, 32);
        }
        for (int s = 0; s < KEY_BLOCK_SLOTS; ++s) {
            mbar_init(block_full + s, 1);
            mbar_init(block_free + s, consumers + 1 + 2 * scanners);
        }
        mbar_fence_init();
    }
    // Consumers, on a tile that hides keys: whether k, or query tile i's q or dout, holds NaN or inf, once
    // scanned. Every query tile's verdict is waited for, so that no phase of q_scanned goes by unobserved
    // (k_scanned's next phase waits for kv_free, which the consumers give after their last look).
    __device__ bool keys_nonfinite(int loaded) const {
        mbar_wait(k_scanned, loaded & 1);
        return *k_scan != 0;
    }
    __device__ bool queries_nonfinite(int i) const {
        mbar_wait(q_scanned + i % STAGES, (i / STAGES) & 1);
        return q_scan[i % STAGES] != 0;
    }
};

// Whether a main kernel's producer warps scan its tiles for NaN and inf (scan_keys, scan_queries): the 16-bit
// kernels (PARTS 1) for variants that hide keys; the float32 kernel on split parts takes finite inputs only
// (FwdParams::gate), and no verdict of a scan is waited for there.
template <typename Var, int PARTS> constexpr bool scans_inputs = PARTS == 1 && Var::hides_keys;

// Where a key block's work sits in its main block's sequence: its first query tile's index i (stage and
// phase) and the key blocks loaded before it (kv phase).
struct BlockStep {
    int tile0, loaded;
};

// The key blocks of a main block, each as a QueryStream with its BlockStep, to `work`. A persistent grid (a
// block per multiprocessor) takes them as its blocks free up, in the order of their index, as the hardware
// hands out blocks: the producer thread (PRODUCER) takes each from the counter that the prepare kernel zeroed,
// one ahead (a take's round trip to L2 would start each key block), and hands it to every other role through
// KEY_BLOCK_SLOTS slots. Key blocks without query tiles load nothing; a packed sequence's blocks past its
// keys are passed over.
template <typename Var, int BLOCK_M, int BLOCK_N, bool PRODUCER, int STAGES, typename Work>
__device__ __forceinline__ void for_each_key_block(const BwdParamsSm90& p, const BwdBarriers<STAGES>& bar,
                                                   Work&& work) {
    const FwdParams& f = p.bwd.fwd;
    const int count = key_block_count<BLOCK_N>(p);
    int taken = blockIdx.x;
    BlockStep step{0, 0};
    for (int i = 0;; ++i) {
        const int slot = i % KEY_BLOCK_SLOTS, phase = (i / KEY_BLOCK_SLOTS) & 1;
        int block;
        if constexpr (PRODUCER) {
            if (i >= KEY_BLOCK_SLOTS) mbar_wait(bar.block_free + slot, phase ^ 1);
            block = taken < count ? taken : -1;
            if (block >= 0) taken = gridDim.x + atomicAdd(p.key_blocks_taken, 1);
            bar.block_slots[slot] = block;
            mbar_arrive(bar.block_full + slot);
        } else {
            mbar_wait(bar.block_full + slot, phase);
            block = bar.block_slots[slot];
            mbar_arrive(bar.block_free + slot);
        }
        if (block < 0) return;
        const KeyBlock kb = key_block<Var, BLOCK_N>(p, block);
        const Sequence seq = sequence<Var::packed>(f, kb.b);
        if (kb.n0 >= seq.seqlen_k) continue;  // a packed sequence shorter than the longest
        const QueryStream<BLOCK_M, BLOCK_N> qs(p, seq, variant_of<Var>(f, seq, kb.b, kb.hk * f.group), kb.n0, kb.hk,
                                               kb.b);
        work(qs, step);
        step.tile0 += qs.tiles;
        step.loaded += qs.tiles > 0;
    }
}

// Producer thread 0, per key block: its first query tile, then k and v once the block's last key block is
// done with them, then its other query tiles, tile i into stage i % STAGES once the reduction has freed it;
// each of PARTS parts from batch entry p.parts_apart further. A bool mask's tile classification reads memory
// (its cells): the producer reads it while it waits and hands it over with the tile's arrival (which releases
// it).
template <typename Var, typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN, int PARTS>
__device__ __forceinline__ void load_tiles(const BwdParamsSm90& p, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                           BlockStep step,
                                           const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN, PARTS>& sm,
                                           const BwdBarriers<STAGES>& bar) {
    constexpr int CHUNKS = D_TILE / 64, Q_ELEMS = BLOCK_M * D_TILE, KV_ELEMS = BLOCK_N * D_TILE;
    const int k_row = int(qs.seq.k0) + qs.n0, q0 = int(qs.seq.q0), entry = qs.seq.entry;
    for (QueryTile q = qs.first(); q.t < qs.tiles; qs.next(q)) {
        const int i = step.tile0 + q.t, stage = i % STAGES, h = q.head, m0 = qs.m0(q);
        unsigned long long* full = bar.q_full + stage;
        const int kind = Var::bool_mask ? variant_of<Var>(p.bwd.fwd, qs.seq, qs.b, h).tile_kind(m0, BLOCK_M, qs.n0, BLOCK_N)
                                        : 0;
        if (i >= STAGES) mbar_wait(bar.q_free + stage, (i / STAGES - 1) & 1);
        if constexpr (Var::bool_mask) bar.kinds[stage] = kind;
        if (Var::bool_mask && kind == SKIP) {
            mbar_arrive(full);  // nobody reads the tile: its phase completes without a copy
        } else {
            constexpr int STATS = BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN, PARTS>::STATS;
            mbar_expect_tx(full, 2 * PARTS * Q_ELEMS * sizeof(T) + STATS * BLOCK_M * sizeof(float));
            for (int part = 0; part < PARTS; ++part)
                for (int c = 0; c < CHUNKS; ++c) {
                    const int at = part * Q_ELEMS + c * BLOCK_M * 64, from = entry + part * p.parts_apart;
                    tma_load(sm.q(stage) + at, p.tma_q, c * 64, q0 + m0, h, from, full);
                    tma_load(sm.dout(stage) + at, p.tma_do, c * 64, q0 + m0, h, from, full);
                }
            const i64 stats = qs.padded_row(p, q);
            bulk_load(sm.lse2 + stage * BLOCK_M, p.lse_log2 + stats, BLOCK_M * sizeof(float), full);
            bulk_load(sm.delta + stage * BLOCK_M, static_cast<const float*>(p.bwd.delta) + stats,
                      BLOCK_M * sizeof(float), full);
            if constexpr (STATS > 2)
                bulk_load(sm.sums + stage * BLOCK_M, static_cast<const float*>(p.bwd.row_scale) + stats,
                          BLOCK_M * sizeof(float), full);
        }
        if (q.t == 0) {  // k and v after the first query tile: that tile's stage frees up first
            if (step.loaded > 0) mbar_wait(bar.kv_free, (step.loaded - 1) & 1);
            mbar_expect_tx(bar.kv_full, 2 * PARTS * KV_ELEMS * sizeof(T));
            for (int part = 0; part < PARTS; ++part)
                for (int c = 0; c < CHUNKS; ++c) {
                    const int at = part * KV_ELEMS + c * BLOCK_N * 64, from = entry + part * p.parts_apart;
                    tma_load(sm.k + at, p.tma_k, c * 64, k_row, qs.hk, from, bar.kv_full);
                    tma_load(sm.v + at, p.tma_v, c * 64, k_row, qs.hk, from, bar.kv_full);
                }
        }
    }
}

// Producer thread 32: a query tile's staged dq into the accumulator, which holds nothing before the tile's
// first sum (zeros cost the prepare kernel 4 bytes of DRAM writes per element, which the bulk reductions
// read back). The tile's count (p.dq_tiles_written) picks its first writer, which stores the tile and marks
// it stored once the store has completed; any other waits for that mark, then adds with one bulk
// reduction. The first writer waits only for its own store, so no wait goes round.
constexpr int DQ_STORED = 1 << 30;  // p.dq_tiles_written: the first sum is in the accumulator
__device__ __forceinline__ void add_dq_tile(float* accum, const float* staged, unsigned bytes, int* written) {
    if (atomicAdd(written, 1) == 0) {
        bulk_store(accum, staged, bytes);
        bulk_wait_all();
        fence_async_global();
        release_or(written, DQ_STORED);
    } else {
        while (!(load_acquire(written) & DQ_STORED)) __nanosleep(100);
        fence_async_global();
        bulk_reduce_add(accum, staged, bytes);
    }
}

// Producer thread 32: each tile's staged dq into the accumulator (add_dq_tile; the 16-bit kernels keep each
// tile in the consumers' register order, the split kernel row by row, flash_bwd_dq_convert reads it back),
// then frees the stage.
template <typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN, int PARTS>
__device__ __forceinline__ void reduce_dq(const BwdParamsSm90& p, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                          BlockStep step,
                                          const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN, PARTS>& sm,
                                          const BwdBarriers<STAGES>& bar) {
    for (QueryTile q = qs.first(); q.t < qs.tiles; qs.next(q)) {
        const int i = step.tile0 + q.t, stage = i % STAGES;
        mbar_wait(bar.dq_full + stage, (i / STAGES) & 1);
        if (bar.dq_staged[stage]) {
            const i64 row = qs.padded_row(p, q);
            add_dq_tile(p.dq_accum + row * D_TILE, sm.dq(stage), BLOCK_M * D_TILE * sizeof(float),
                        p.dq_tiles_written + row / BLOCK_M);
            bulk_wait_read();
        }
        mbar_arrive(bar.q_free + stage);
    }
}

// Producer warps 2 and 3, for variants that hide keys: a tile that hides some keys from some queries
// multiplies zeros by data those queries or keys must not meet, and 0 * NaN is NaN, so the consumers take the
// guarded products where k, or the tile's q or dout, holds NaN or inf. Warp 3 scans k once; warp 2 each
// masked query tile's q and dout once they arrive (the sequence's rows: a packed sequence's next ones are
// zeroed by the consumers). Warp 2 signs off every tile in turn, to the consumers (who wait for every
// verdict, reading the masked tiles' only) and to the producer (a stage is refilled once warp 2 is done with
// it too, so that it never falls a phase behind).
template <typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN>
__device__ __forceinline__ void scan_keys(const QueryStream<BLOCK_M, BLOCK_N>& qs, BlockStep step,
                                          const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                          const BwdBarriers<STAGES>& bar, int lane) {
    if (qs.tiles == 0) return;
    mbar_wait(bar.kv_full, step.loaded & 1);
    const bool bad = rows_nonfinite<T, BLOCK_N, D_TILE / 64>(sm.k, min(BLOCK_N, qs.seq.seqlen_k - qs.n0), lane);
    if (lane == 0) *bar.k_scan = bad;
    mbar_arrive(bar.k_scanned);
    mbar_arrive(bar.kv_free);
}
template <typename Var, typename T, int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, int OWN>
__device__ __forceinline__ void scan_queries(const BwdParamsSm90& p, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                             BlockStep step,
                                             const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN>& sm,
                                             const BwdBarriers<STAGES>& bar, int lane) {
    constexpr int CHUNKS = D_TILE / 64;
    for (QueryTile q = qs.first(); q.t < qs.tiles; qs.next(q)) {
        const int i = step.tile0 + q.t, stage = i % STAGES, m0 = qs.m0(q), rows = min(BLOCK_M, qs.seq.seqlen_q - m0);
        const TileKind kind = variant_of<Var>(p.bwd.fwd, qs.seq, qs.b, q.head).tile_kind(m0, BLOCK_M, qs.n0, BLOCK_N);
        mbar_wait(bar.q_full + stage, (i / STAGES) & 1);
        const bool bad = kind != INTERIOR && kind != SKIP &&
                         (rows_nonfinite<T, BLOCK_M, CHUNKS>(sm.q(stage), rows, lane) ||
                          rows_nonfinite<T, BLOCK_M, CHUNKS>(sm.dout(stage), rows, lane));
        if (lane == 0) bar.q_scan[stage] = bad;
        mbar_arrive(bar.q_scanned + stage);
        mbar_arrive(bar.q_free + stage);
    }
}

// The producer warpgroup of the main kernels: thread 0 loads, thread 32 reduces dq, and with SCANS (the
// 16-bit kernels, for variants that hide keys) warps 2 and 3 scan the query tiles and k.
template <typename Var, int BLOCK_M, int BLOCK_N, bool SCANS, typename T, int D_TILE, int STAGES, int OWN, int PARTS>
__device__ __forceinline__ void produce(const BwdParamsSm90& p,
                                        const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN, PARTS>& sm,
                                        const BwdBarriers<STAGES>& bar) {
    regs_release<24>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0)
        for_each_key_block<Var, BLOCK_M, BLOCK_N, true>(p, bar, [&](const auto& qs, BlockStep step) {
            load_tiles<Var>(p, qs, step, sm, bar);
        });
    if (threadIdx.x == 32) {
        for_each_key_block<Var, BLOCK_M, BLOCK_N, false>(p, bar, [&](const auto& qs, BlockStep step) {
            reduce_dq(p, qs, step, sm, bar);
        });
        bulk_wait_all();
    }
    if constexpr (SCANS) {
        if (warp == 2)
            for_each_key_block<Var, BLOCK_M, BLOCK_N, false>(p, bar, [&](const auto& qs, BlockStep step) {
                scan_queries<Var>(p, qs, step, sm, bar, lane);
            });
        if (warp == 3)
            for_each_key_block<Var, BLOCK_M, BLOCK_N, false>(p, bar, [&](const auto& qs, BlockStep step) {
                scan_keys(qs, step, sm, bar, lane);
            });
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

// Consumers, before a key block's stream: k and v arrived, k's rows past a packed sequence's end zeroed (its
// neighbour's), in each of its PARTS parts.
template <typename Var, typename T, int D_TILE, int BLOCK_N, int STAGES, int BLOCK_M, int PARTS = 1>
__device__ __forceinline__ void wait_keys(const BwdBarriers<STAGES>& bar, const QueryStream<BLOCK_M, BLOCK_N>& qs,
                                          BlockStep step, T* k) {
    if (qs.tiles == 0) return;
    mbar_wait(bar.kv_full, step.loaded & 1);
    if (Var::packed && qs.n0 + BLOCK_N > qs.seq.seqlen_k) {
        for (int part = 0; part < PARTS; ++part)
            zero_rows<T, BLOCK_N, D_TILE / 64, 256>(k + part * BLOCK_N * D_TILE, qs.seq.seqlen_k - qs.n0,
                                                    threadIdx.x - 128);
        named_barrier<256>(1);
    }
}

// Consumers, after a key block's stream: done with its k and v.
template <int BLOCK_M, int BLOCK_N, int STAGES>
__device__ __forceinline__ void free_keys(const BwdBarriers<STAGES>& bar, const QueryStream<BLOCK_M, BLOCK_N>& qs) {
    if (qs.tiles > 0) mbar_arrive(bar.kv_free);
}

// Consumers, per query tile i: its classification, once its stage has arrived (every phase is waited for,
// skipped tiles too, so that no copy into a stage is in flight when the producer reuses it), with the rows
// of q and dout past a packed sequence's end zeroed. A skipped tile stages no dq.
template <int BLOCK_M, int BLOCK_N, int D_TILE, int STAGES, typename Var, typename T, int OWN, int PARTS>
__device__ __forceinline__ TileKind next_query_tile(const Var& var, const BwdBarriers<STAGES>& bar,
                                                    const BwdSmem<T, BLOCK_M, BLOCK_N, D_TILE, STAGES, OWN, PARTS>& sm,
                                                    int i, int m0, int n0) {
    const int stage = i % STAGES;
    TileKind kind = Var::bool_mask ? SKIP : var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
    mbar_wait(bar.q_full + stage, (i / STAGES) & 1);
    if constexpr (Var::bool_mask) kind = TileKind(bar.kinds[stage]);
    if (kind == SKIP) {
        stage_no_dq(bar, stage);
        if constexpr (scans_inputs<Var, PARTS>) bar.queries_nonfinite(i);
    } else if (Var::packed && m0 + BLOCK_M > var.seqlen_q) {
        for (int part = 0; part < PARTS; ++part) {
            zero_rows<T, BLOCK_M, D_TILE / 64, 256>(sm.q(stage) + part * BLOCK_M * D_TILE, var.seqlen_q - m0,
                                                    threadIdx.x - 128);
            zero_rows<T, BLOCK_M, D_TILE / 64, 256>(sm.dout(stage) + part * BLOCK_M * D_TILE, var.seqlen_q - m0,
                                                    threadIdx.x - 128);
        }
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
    if (threadIdx.x == 0) bar.init(CONSUMERS, scans_inputs<Var, 1> ? 32 : 0);
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer
        produce<Var, BLOCK_M, BLOCK_N, scans_inputs<Var, 1>>(p, sm, bar);
        return;
    }
    // ---- consumers
    regs_claim<240>();
    const int wg = warpgroup() - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, tq = lane % 4;
    const float scale_log2 = float(f.scale) * float(LOG2E);
    const T* k_rows = sm.k + 64 * wg * 64;  // this warpgroup's keys of each chunk
    const T* v_rows = sm.v + 64 * wg * 64;
    const int dq_col0 = wg * DQ_COLS;       // this warpgroup's columns of dq
    const T* k_cols = sm.k + (dq_col0 / 64) * BLOCK_N * 64 + dq_col0 % 64;
    unsigned* group_words = reinterpret_cast<unsigned*>(sm.own + 2 * DS_ELEMS * sizeof(T)) + wg * GROUP_WORDS;
    int computed = 0;
    for_each_key_block<Var, BLOCK_M, BLOCK_N, false>(p, bar, [&](const QueryStream<BLOCK_M, BLOCK_N>& qs, BlockStep step) {
        const int n0 = qs.n0, b = qs.b, key0 = n0 + 64 * wg + 16 * warp + g;
        const Sequence& seq = qs.seq;
        float dk[DT][4], dv[DT][4];
        zero(dk);
        zero(dv);
        float(&dk_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(dk);
        float(&dv_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(dv);

        wait_keys<Var, T, D_TILE>(bar, qs, step, sm.k);

        for (QueryTile q = qs.first(); q.t < qs.tiles; qs.next(q)) {
            const int i = step.tile0 + q.t, stage = i % STAGES, m0 = qs.m0(q);
            const Var var = variant_of<Var>(f, seq, b, q.head);
            const TileKind kind = next_query_tile<BLOCK_M, BLOCK_N, D_TILE>(var, bar, sm, i, m0, n0);
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
            for (int r = 0; r < MT * 2; ++r) {
                p_regs[r] = pack2<T>(st_regs[2 * r], st_regs[2 * r + 1]);
                ds_regs[r] = pack2<T>(dpt_regs[2 * r], dpt_regs[2 * r + 1]);
            }

            // A tile where hidden queries' q or dout is not finite takes the guarded products, after
            // the dq product (no wgmma in flight then).
            const bool guarded = Var::hides_keys && bar.queries_nonfinite(i) && needs_mask;
            if (!guarded) {
                const TileDesc do_desc = n_major_desc(do_buf, BLOCK_M * 128), q_desc = n_major_desc(q_buf, BLOCK_M * 128);
                fence_regs(dv_regs);
                fence_regs(dk_regs);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_rs<T, D_TILE>(dv_regs, reinterpret_cast<const unsigned(&)[4]>(p_regs[4 * kk]),
                                        do_desc.at(n_major_step(kk)), 1);
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_rs<T, D_TILE>(dk_regs, reinterpret_cast<const unsigned(&)[4]>(ds_regs[4 * kk]),
                                        q_desc.at(n_major_step(kk)), 1);
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
            const TileDesc ds_desc = n_major_desc(ds_buf, BLOCK_N * 128), k_cols_desc = n_major_desc(k_cols, BLOCK_N * 128);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                wgmma_ss_tt<T, DQ_COLS>(dq_regs, ds_desc.at(n_major_step(kk)), k_cols_desc.at(n_major_step(kk)), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(dq_regs);
            fence_regs(dv_regs);
            fence_regs(dk_regs);
            if (guarded) {
                gemm_rn_guarded<T, BLOCK_M, D_TILE>(dv, p_regs, SwizzledTile<T, BLOCK_M>{do_buf}, lane);
                gemm_rn_guarded<T, BLOCK_M, D_TILE>(dk, ds_regs, SwizzledTile<T, BLOCK_M>{q_buf}, lane);
            }
            if (Var::hides_keys && needs_mask && bar.keys_nonfinite(step.loaded)) {
                // Non-finite keys reach only the queries that see them: dq again, on CUDA cores.
                zero(dq);
                gemm_guarded_smem<BLOCK_N, DQ_COLS>(dq, Transposed<SwizzledTile<T, BLOCK_N>>{{ds_buf}},
                                                    Shifted<SwizzledTile<T, BLOCK_N>>{{sm.k}, dq_col0}, 16 * warp,
                                                    lane);
            }
            stage_dq<DQ_COLS>(bar, sm.dq(stage), stage, wg, dq);
        }
        free_keys(bar, qs);
        store_dk_dv<T, D_TILE>(bp, seq, n0, qs.hk, 64 * wg + 16 * warp, 0, dk, dv, lane);
    });
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
    if (threadIdx.x == 0) bar.init(CONSUMERS, scans_inputs<Var, 1> ? 32 : 0);
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer
        produce<Var, BLOCK_M, BLOCK_N, scans_inputs<Var, 1>>(p, sm, bar);
        return;
    }
    // ---- consumers
    regs_claim<240>();
    const int wg = warpgroup() - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int tq = lane % 4, row_in = 16 * warp + lane / 4;  // rows row_in and + 8 of a query tile
    const float scale_log2 = float(f.scale) * float(LOG2E);
    const int key_col0 = KEYS * wg;  // this warpgroup's keys of the tile, for s and dp
    const T* k_keys = sm.k + key_col0 * 64;
    const T* v_keys = sm.v + key_col0 * 64;
    const int chunk0 = wg * HALF / 64;  // this warpgroup's columns of the head, for dk, dv and dq
    int computed = 0;
    for_each_key_block<Var, BLOCK_M, BLOCK_N, false>(p, bar, [&](const QueryStream<BLOCK_M, BLOCK_N>& qs, BlockStep step) {
        const int n0 = qs.n0, b = qs.b;
        const Sequence& seq = qs.seq;
        float dk[HT][4], dv[HT][4];
        zero(dk);
        zero(dv);
        float(&dk_regs)[HT * 4] = reinterpret_cast<float(&)[HT * 4]>(dk);
        float(&dv_regs)[HT * 4] = reinterpret_cast<float(&)[HT * 4]>(dv);

        wait_keys<Var, T, D_TILE>(bar, qs, step, sm.k);

        for (QueryTile q = qs.first(); q.t < qs.tiles; qs.next(q)) {
            const int i = step.tile0 + q.t, stage = i % STAGES, m0 = qs.m0(q);
            const Var var = variant_of<Var>(f, seq, b, q.head);
            const TileKind kind = next_query_tile<BLOCK_M, BLOCK_N, D_TILE>(var, bar, sm, i, m0, n0);
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
            const bool queries_bad = Var::hides_keys && bar.queries_nonfinite(i);
            if (!(Var::hides_keys && needs_mask && (queries_bad || bar.keys_nonfinite(step.loaded)))) {
                float(&dq_regs)[HT * 4] = reinterpret_cast<float(&)[HT * 4]>(dq);
                const TileDesc p_desc = n_major_desc(p_buf, BLOCK_M * 128), do_desc = n_major_desc(do_half, BLOCK_M * 128),
                               ds_desc = n_major_desc(ds_buf, BLOCK_M * 128), q_desc = n_major_desc(q_half, BLOCK_M * 128),
                               ds_rows_desc = k_major_desc(ds_buf), k_desc = n_major_desc(k_half, BLOCK_N * 128);
                fence_regs(dv_regs);
                fence_regs(dk_regs);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_ss_tt<T, HALF>(dv_regs, p_desc.at(n_major_step(kk)), do_desc.at(n_major_step(kk)), 1);
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_ss_tt<T, HALF>(dk_regs, ds_desc.at(n_major_step(kk)), q_desc.at(n_major_step(kk)), 1);
#pragma unroll
                for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                    wgmma_ss_bt<T, HALF>(dq_regs, ds_rows_desc.at(k_major_step(kk, BLOCK_M)),
                                         k_desc.at(n_major_step(kk)), kk > 0);
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
        free_keys(bar, qs);
        store_dk_dv<T, HALF>(bp, seq, n0, qs.hk, 16 * warp, wg * HALF, dk, dv, lane);
    });
}

// float32's renormalization (mask.cuh, row_renormalizer) on Hopper: each query row's sum of the probabilities
// that flash_bwd_sm90_split recomputes, bitwise as it does (the same wgmma products of the same parts: s^T of
// 64 keys by SM90_SPLIT_BWD_BLOCK_M queries), into bwd.row_scale. A block owns SUM_ROWS query rows of a head,
// 64 per consumer warpgroup; its producer loads their q and lse once, then streams the band's key tiles. Each
// thread sums its keys over the tiles, then the warps' sums add up in a fixed order: the sums repeat bitwise.
constexpr int SUM_ROWS = 128;

template <int D_TILE, int STAGES, typename Var>
__global__ void __launch_bounds__(384, 1) flash_bwd_sm90_row_sums(const __grid_constant__ BwdParamsSm90 p) {
    using Op = bfloat16_t;
    constexpr int PARTS = Operands<float>::PARTS, BLOCK_M = SUM_ROWS, BLOCK_N = 64, SUB = SM90_SPLIT_BWD_BLOCK_M;
    constexpr int SUBS = 64 / SUB, CHUNKS = D_TILE / 64, MT = SUB / 8, Q_ELEMS = BLOCK_M * D_TILE;
    constexpr int KV_ELEMS = BLOCK_N * D_TILE;

    extern __shared__ unsigned char smem_raw[];
    Op* sQ = reinterpret_cast<Op*>(smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024);  // [PARTS][CHUNKS][BLOCK_M][64]
    Op* sK = sQ + PARTS * Q_ELEMS;                                           // [STAGES][PARTS][CHUNKS][BLOCK_N][64]
    float* sLse2 = reinterpret_cast<float*>(sK + STAGES * PARTS * KV_ELEMS);  // [BLOCK_M]
    float* sPartial = sLse2 + BLOCK_M;                                       // [4 warps][BLOCK_M]: sums of 16 keys
    unsigned long long* q_full = reinterpret_cast<unsigned long long*>(sPartial + 4 * BLOCK_M);
    unsigned long long* k_full = q_full + 1;       // [STAGES]
    unsigned long long* k_free = k_full + STAGES;  // [STAGES]: both consumer warpgroups are done with the tile
    int* kinds = reinterpret_cast<int*>(k_free + STAGES);  // [STAGES]: bool mask, the tile's TileKind

    const FwdParams& f = p.bwd.fwd;
    if (gated_off(f)) return;
    const int m0 = blockIdx.x * BLOCK_M, h = blockIdx.y, b = blockIdx.z, hk = h / f.group;
    const Sequence seq = sequence<Var::packed>(f, b);
    if (m0 >= seq.seqlen_q) return;
    const Var var = variant_of<Var>(f, seq, b, h);
    int first, last;
    var.template key_tiles<BLOCK_M, BLOCK_N>(m0, first, last);
    const i64 stats = padded_base<Var::packed>(p, b) + (i64)h * p.rows + m0;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full + s, 1);
            mbar_init(k_free + s, 256);
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer: q in boxes of SUB rows (the split kernel's tensor map)
        regs_release<24>();
        if (threadIdx.x != 0) return;
        const int q0 = int(seq.q0), k0 = int(seq.k0), rows = min(BLOCK_M, padded_rows(seq.seqlen_q) - m0);
        mbar_expect_tx(q_full, PARTS * Q_ELEMS * sizeof(Op) + rows * sizeof(float));
        for (int part = 0; part < PARTS; ++part)
            for (int c = 0; c < CHUNKS; ++c)
                for (int sub = 0; sub < BLOCK_M / SUB; ++sub)
                    tma_load(sQ + part * Q_ELEMS + (c * BLOCK_M + SUB * sub) * 64, p.tma_q, c * 64, q0 + m0 + SUB * sub,
                             h, seq.entry + part * p.parts_apart, q_full);
        bulk_load(sLse2, p.lse_log2 + stats, rows * sizeof(float), q_full);
        for (int n = first; n < last; ++n) {
            const int i = n - first, stage = i % STAGES;
            const int kind = Var::bool_mask ? var.tile_kind(m0, BLOCK_M, n * BLOCK_N, BLOCK_N) : 0;
            if (i >= STAGES) mbar_wait(k_free + stage, (i / STAGES - 1) & 1);
            if constexpr (Var::bool_mask) {
                kinds[stage] = kind;
                if (kind == SKIP) {
                    mbar_arrive(k_full + stage);
                    continue;
                }
            }
            mbar_expect_tx(k_full + stage, PARTS * KV_ELEMS * sizeof(Op));
            for (int part = 0; part < PARTS; ++part)
                for (int c = 0; c < CHUNKS; ++c)
                    tma_load(sK + (stage * PARTS + part) * KV_ELEMS + c * BLOCK_N * 64, p.tma_k, c * 64,
                             k0 + n * BLOCK_N, hk, seq.entry + part * p.parts_apart, k_full + stage);
        }
    } else {
        // ---- consumers: warpgroup wg's 64 queries, in SUBS products of SUB
        regs_claim<240>();
        const int wg = warpgroup() - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
        const int g = lane / 4, tq = lane % 4, row0 = 64 * wg;
        const float scale_log2 = float(f.scale) * float(LOG2E);
        float sums[SUBS][MT][2] = {};
        mbar_wait(q_full, 0);
        for (int n = first; n < last; ++n) {
            const int i = n - first, stage = i % STAGES, n0 = n * BLOCK_N, key0 = n0 + 16 * warp + g;
            TileKind kind = Var::bool_mask ? SKIP : var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
            mbar_wait(k_full + stage, (i / STAGES) & 1);
            if constexpr (Var::bool_mask) kind = TileKind(kinds[stage]);
            if (kind != SKIP) {
                float x[SUBS][MT][4];
                wgmma_fence();
#pragma unroll
                for (int sub = 0; sub < SUBS; ++sub)
                    wgmma_nt<Op, SUB, D_TILE, BLOCK_N, BLOCK_M, PARTS>(
                        reinterpret_cast<float(&)[MT * 4]>(x[sub]), sK + stage * PARTS * KV_ELEMS,
                        sQ + (row0 + SUB * sub) * 64, KV_ELEMS, Q_ELEMS);
                wgmma_commit();
                wgmma_wait<0>();
#pragma unroll
                for (int sub = 0; sub < SUBS; ++sub) fence_regs(reinterpret_cast<float(&)[MT * 4]>(x[sub]));
                check_tile(kind, var, [&](auto check, const Var& v) {
#pragma unroll
                    for (int sub = 0; sub < SUBS; ++sub)
#pragma unroll
                        for (int j = 0; j < MT; ++j)
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const int im = row0 + SUB * sub + 8 * j + 2 * tq + e % 2;
                                float dcap;
                                sums[sub][j][e % 2] += pair_probability<decltype(check)::value, false>(
                                    v, x[sub][j][e], scale_log2, sLse2[im], m0 + im, key0 + 8 * (e / 2), dcap);
                            }
                });
            }
            mbar_arrive(k_free + stage);
        }
        // the warp's 16 keys (lanes of equal tq hold the same queries), then the four warps in order
#pragma unroll
        for (int sub = 0; sub < SUBS; ++sub)
#pragma unroll
            for (int j = 0; j < MT; ++j)
#pragma unroll
                for (int ec = 0; ec < 2; ++ec) {
                    float sum = sums[sub][j][ec];
                    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
                    sum += __shfl_xor_sync(0xffffffffu, sum, 8);
                    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
                    if (g == 0) sPartial[warp * BLOCK_M + row0 + SUB * sub + 8 * j + 2 * tq + ec] = sum;
                }
        named_barrier<128>(1 + wg);
        const int thread = threadIdx.x % 128;  // the padded rows too: the split kernel reads whole tiles
        if (thread < 64 && m0 + row0 + thread < padded_rows(seq.seqlen_q)) {
            const int r = row0 + thread;
            static_cast<float*>(p.bwd.row_scale)[stats + r] =
                ((sPartial[r] + sPartial[BLOCK_M + r]) + sPartial[2 * BLOCK_M + r]) + sPartial[3 * BLOCK_M + r];
        }
    }
}

// float32 on bfloat16 parts (split.cuh): each product is six wgmma products of the parts. A block owns 64 keys
// (three parts of k and v fill a third of shared memory at headdim 128) and streams query tiles of
// SM90_SPLIT_BWD_BLOCK_M rows; its consumer warpgroups take the tile's two halves of the work, each over
// all 64 keys as rows:
//   warpgroup 0  s^T = k q^T; hands it to warpgroup 1, takes back pd^T; dv += pd^T dout
//   warpgroup 1  dp^T = v dout^T; pd^T and dx^T from both (mask.cuh), renormalized by the rows' sums of
//                flash_bwd_sm90_row_sums; dk += dx^T q; dq^T = k^T dx^T
// so that each holds one of dk and dv (headdim 128: 64 registers a thread). pd^T and dx^T are split in
// registers (A operands); dx^T's parts also go to shared memory for dq^T, which is staged row by row in the
// place of the tile's q (dout may still be read by dv). Each tile's dv and dk products sum in a fresh
// accumulator that is added to the running one rounded to nearest: the tensor cores truncate the sums they
// accumulate into. Inputs holding NaN or inf never get here (the gate of FwdParams takes them elsewhere).
template <int D_TILE, int STAGES, typename Var>
__global__ void __launch_bounds__(384, 1) flash_bwd_sm90_split(const __grid_constant__ BwdParamsSm90 p) {
    using Op = bfloat16_t;
    constexpr int PARTS = Operands<float>::PARTS, PAIRS = split_pairs(PARTS);
    constexpr int BLOCK_M = SM90_SPLIT_BWD_BLOCK_M, BLOCK_N = 64, CHUNKS = D_TILE / 64;
    constexpr int MT = BLOCK_M / 8, DT = D_TILE / 8, Q_ELEMS = BLOCK_M * D_TILE, KV_ELEMS = BLOCK_N * D_TILE;
    constexpr int DS_ELEMS = BLOCK_N * 64, EXCHANGE_BYTES = BLOCK_N * BLOCK_M * 4, DX_BYTES = PARTS * DS_ELEMS * 2;
    constexpr int SYNC_WG1 = 2;  // warpgroup 1's own named barrier (1 is next_query_tile's)
    static_assert(D_TILE % 64 == 0 && BLOCK_M % 16 == 0, "tile shape");

    extern __shared__ unsigned char smem_raw[];
    const BwdSmem<Op, BLOCK_M, BLOCK_N, D_TILE, STAGES, EXCHANGE_BYTES + DX_BYTES + 1024, PARTS> sm(smem_raw);
    float* exchange = reinterpret_cast<float*>(sm.own);          // [MT * 4][128]: a tile in register order
    Op* sDx = reinterpret_cast<Op*>(sm.own + EXCHANGE_BYTES);  // [PARTS][BLOCK_N][64]: dx^T, keys by queries
    // the exchange's handovers: scores from warpgroup 0, probabilities back from warpgroup 1
    unsigned long long* scores_full = reinterpret_cast<unsigned long long*>(sm.own + EXCHANGE_BYTES + DX_BYTES);
    unsigned long long* probs_full = scores_full + 1;
    const BwdBarriers<STAGES> bar(sm.barriers);

    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    if (gated_off(f)) return;
    if (threadIdx.x == 0) {
        mbar_init(scores_full, 128);
        mbar_init(probs_full, 128);
        bar.init(256, scans_inputs<Var, PARTS> ? 32 : 0);
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer
        produce<Var, BLOCK_M, BLOCK_N, scans_inputs<Var, PARTS>>(p, sm, bar);
        return;
    }
    // ---- consumers
    regs_claim<240>();
    const int wg = warpgroup() - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int thread = threadIdx.x % 128, g = lane / 4, tq = lane % 4;
    int computed = 0;  // tiles handed over so far
    const float scale_log2 = float(f.scale) * float(LOG2E);
    for_each_key_block<Var, BLOCK_M, BLOCK_N, false>(p, bar, [&](const QueryStream<BLOCK_M, BLOCK_N>& qs, BlockStep step) {
        const int n0 = qs.n0, b = qs.b, key0 = n0 + 16 * warp + g;
        const Sequence& seq = qs.seq;
        float grad[DT][4];  // dv (warpgroup 0) or dk (warpgroup 1) of the block's keys
        zero(grad);
        float(&grad_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(grad);

        wait_keys<Var, Op, D_TILE, BLOCK_N, STAGES, BLOCK_M, PARTS>(bar, qs, step, sm.k);

        for (QueryTile q = qs.first(); q.t < qs.tiles; qs.next(q)) {
            const int i = step.tile0 + q.t, stage = i % STAGES, m0 = qs.m0(q);
            const Var var = variant_of<Var>(f, seq, b, q.head);
            const TileKind kind = next_query_tile<BLOCK_M, BLOCK_N, D_TILE>(var, bar, sm, i, m0, n0);
            if (kind == SKIP) continue;
            const Op* q_buf = sm.q(stage);
            const Op* do_buf = sm.dout(stage);

            // s^T (warpgroup 0) or dp^T (warpgroup 1), keys by queries
            float x[MT][4];
            float(&x_regs)[MT * 4] = reinterpret_cast<float(&)[MT * 4]>(x);
            wgmma_fence();
            wgmma_nt<Op, BLOCK_M, D_TILE, BLOCK_N, BLOCK_M, PARTS>(x_regs, wg == 0 ? sm.k : sm.v, wg == 0 ? q_buf : do_buf,
                                                                   KV_ELEMS, Q_ELEMS);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(x_regs);

            // x becomes pd^T (warpgroup 0) or dx^T (warpgroup 1); lanes of the two warpgroups with the same
            // index hold the same elements
            const int parity = computed++ & 1;
            if (wg == 0) {
#pragma unroll
                for (int r = 0; r < MT * 4; ++r) exchange[r * 128 + thread] = x_regs[r];
                mbar_arrive(scores_full);
                mbar_wait(probs_full, parity);
#pragma unroll
                for (int r = 0; r < MT * 4; ++r) x_regs[r] = exchange[r * 128 + thread];
            } else {
                // each row's renormalizer in place of its sum
                float* sums = sm.sums + stage * BLOCK_M;
                if (thread < BLOCK_M) sums[thread] = row_renormalizer(sums[thread], sm.lse2[stage * BLOCK_M + thread],
                                                                    sink_log2<float>(f.var, q.head));
                float st[MT][4];
                mbar_wait(scores_full, parity);
                named_barrier<128>(SYNC_WG1);  // the renormalizers stored
#pragma unroll
                for (int r = 0; r < MT * 4; ++r) reinterpret_cast<float*>(st)[r] = exchange[r * 128 + thread];
                const float* lse2 = sm.lse2 + stage * BLOCK_M;
                const float* delta = sm.delta + stage * BLOCK_M;
                check_tile(kind, var, [&](auto check, const Var& v) {
                    key_rows_backward<decltype(check)::value, false>(v, st, x, m0, key0, warp, lane, scale_log2, lse2,
                                                                     delta, static_cast<const float*>(sums));
                });
#pragma unroll
                for (int r = 0; r < MT * 4; ++r) exchange[r * 128 + thread] = reinterpret_cast<float*>(st)[r];
                mbar_arrive(probs_full);
            }

            // its parts in the A layout of wgmma
            unsigned parts[PARTS][MT * 2];
            split_fragments(x_regs, parts);
            if (wg == 1) {  // dx^T's parts for dq^T
#pragma unroll
                for (int part = 0; part < PARTS; ++part)
#pragma unroll
                    for (int j = 0; j < MT; ++j)
#pragma unroll
                        for (int er = 0; er < 2; ++er)
                            *reinterpret_cast<unsigned*>(const_cast<Op*>(
                                swizzled(sDx + part * DS_ELEMS, BLOCK_N, 16 * warp + g + 8 * er, 8 * j + 2 * tq))) =
                                parts[part][2 * j + er];
                fence_async_shared();
            }

            // dv += pd^T dout (warpgroup 0) or dk += dx^T q (warpgroup 1), in a fresh accumulator
            float fresh[DT * 4];
            const TileDesc rows_desc = n_major_desc(wg == 0 ? do_buf : q_buf, BLOCK_M * 128);
            wgmma_fence();
#pragma unroll
            for (int pair = 0; pair < PAIRS; ++pair)
#pragma unroll
                for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                    wgmma_rs<Op, D_TILE>(fresh,
                                         reinterpret_cast<const unsigned(&)[4]>(parts[split_part_a(PARTS, pair)][4 * kk]),
                                         rows_desc.at(split_part_b(PARTS, pair) * Q_ELEMS * sizeof(Op) + n_major_step(kk)),
                                         pair > 0 || kk > 0);
            wgmma_commit();

            if (wg == 0) {
                wgmma_wait<0>();
                fence_regs(fresh);
#pragma unroll
                for (int r = 0; r < DT * 4; ++r) grad_regs[r] += fresh[r];
                mbar_arrive(bar.dq_full + stage);  // done with the stage's dout
                continue;
            }

            // dq^T = k^T dx^T, 64 of the head's columns at a time
            float dqt[CHUNKS][BLOCK_M / 2];
            named_barrier<128>(SYNC_WG1);  // dx^T's parts stored
            const TileDesc k_desc = n_major_desc(sm.k, BLOCK_N * 128), dx_desc = n_major_desc(sDx, BLOCK_N * 128);
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
                for (int pair = 0; pair < PAIRS; ++pair)
#pragma unroll
                    for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                        wgmma_ss_tt<Op, BLOCK_M>(
                            dqt[c],
                            k_desc.at((split_part_a(PARTS, pair) * KV_ELEMS + c * BLOCK_N * 64) * sizeof(Op) + n_major_step(kk)),
                            dx_desc.at(split_part_b(PARTS, pair) * DS_ELEMS * sizeof(Op) + n_major_step(kk)),
                            pair > 0 || kk > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(fresh);
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) fence_regs(dqt[c]);
#pragma unroll
            for (int r = 0; r < DT * 4; ++r) grad_regs[r] += fresh[r];

            // the tile's dq, [BLOCK_M][D_TILE] row by row, where its q was
            float* staged = sm.dq(stage);
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
                for (int j = 0; j < MT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        staged[(8 * j + 2 * tq + e % 2) * D_TILE + 64 * c + 16 * warp + g + 8 * (e / 2)] = dqt[c][4 * j + e];
            if (thread == 0) bar.dq_staged[stage] = 1;
            fence_async_shared();
            mbar_arrive(bar.dq_full + stage);
        }
        const float scale[2] = {wg == 0 ? 1.f : float(f.scale), wg == 0 ? 1.f : float(f.scale)};
        float* grad_out = static_cast<float*>(wg == 0 ? bp.dv : bp.dk);
        const Strides& st = wg == 0 ? bp.dv_st : bp.dk_st;
        free_keys(bar, qs);
        store_slab(seq.key_rows(grad_out, st, qs.hk, n0), st.s, grad, scale, 16 * warp, seq.seqlen_k - n0, f.headdim, lane);
    });
}

// One thread per four accumulator values of sequence blockIdx.y. The 16-bit kernels store each 64-row tile of
// the accumulator in the consumers' register order, [warpgroup][8-column group j][thread][4] with thread =
// 32 warp + 4 g + tq, values 2 er + ec at row 16 warp + 8 er + g, column 8 j + 2 tq + ec of the warpgroup's
// half of the head; the split kernel (ROW_MAJOR) row by row, in 32-row tiles. A tile no key block wrote
// (p.dq_tiles_written 0: no key reaches its rows) holds whatever the memory held, and its dq is 0.
template <typename T, bool PACKED, bool ROW_MAJOR>
__global__ void __launch_bounds__(256) flash_bwd_dq_convert(const __grid_constant__ BwdParamsSm90 p) {
    const BwdParams& bp = p.bwd;
    const FwdParams& f = bp.fwd;
    if (gated_off(f)) return;
    const int tile_quads = SM90_BWD_BLOCK_M * p.head_tile / 4, half = p.head_tile / 2, b = blockIdx.y;
    const int tiles = padded_rows(f.seqlen_q) / SM90_BWD_BLOCK_M;
    const i64 quad = (i64)blockIdx.x * 256 + threadIdx.x;
    if (quad >= (i64)f.nheads * tiles * tile_quads) return;
    const int tile = (int)(quad / tile_quads), h = tile / tiles, m0 = tile % tiles * SM90_BWD_BLOCK_M;
    const Sequence seq = sequence<PACKED>(f, b);
    if (m0 >= seq.seqlen_q) return;
    const int at = (int)(quad % tile_quads);
    const i64 row0 = padded_base<PACKED>(p, b) + (i64)h * p.rows + m0;
    // values 0, 1 at (row, col) and (row, col + 1); 2, 3 ROW_STEP rows and COL_STEP columns further
    constexpr int ROW_STEP = ROW_MAJOR ? 0 : 8, COL_STEP = ROW_MAJOR ? 2 : 0;
    int row, col;
    if constexpr (ROW_MAJOR) {
        row = m0 + at / (p.head_tile / 4), col = 4 * (at % (p.head_tile / 4));
    } else {
        const int thread = at % 128, j = at / 128 % (half / 8), wg = at / 128 / (half / 8);
        row = m0 + (thread / 32) * 16 + (thread % 32) / 4, col = wg * half + 8 * j + 2 * (thread % 4);
    }
    constexpr int TILE_ROWS = DqTile<T>::ROWS;  // T: float for the split kernel's accumulator
    static_assert(ROW_MAJOR == (TILE_ROWS == SM90_SPLIT_BWD_BLOCK_M), "the split kernel's tiles");
    const bool written = p.dq_tiles_written[row0 / TILE_ROWS + (row - m0) / TILE_ROWS] != 0;
    const float4 x = written ? reinterpret_cast<const float4*>(p.dq_accum + row0 * p.head_tile)[at]
                             : make_float4(0.f, 0.f, 0.f, 0.f);
    const float scale = float(f.scale);
    T* dq = seq.query_rows(static_cast<T*>(bp.dq), bp.dq_st, h, 0);
    const bool aligned = reinterpret_cast<unsigned long long>(dq) % 4 == 0 && bp.dq_st.s % 2 == 0;
    const float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int r = row + e * ROW_STEP, c = col + e * COL_STEP;
        if (r < seq.seqlen_q && c < f.headdim)
            store_pair(dq + (i64)r * bp.dq_st.s + c, v[2 * e] * scale, v[2 * e + 1] * scale, aligned, f.headdim - c);
    }
}
