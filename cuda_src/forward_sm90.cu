// Forward pass for float16 / bfloat16 on Hopper (sm_90a): TMA, wgmma and warp specialisation.
//
// A persistent grid (a block per multiprocessor) walks the (128-row query tile, head, batch) work tiles;
// each block has three warpgroups:
//   producer   (warpgroup 0; one thread issues)  q once, then the K and V tiles of the band into a ring
//              of STAGES shared-memory buffers (TMA; each buffer's arrival completes an mbarrier); with a
//              bool mask, each K and V tile with its classification (Variant::tile_kind), no copy of a
//              tile the mask hides, and none of the tiles it hides at the end of a row
//   V warp     (producer warp 1, for packed batches and variants that hide keys) each V tile once it has
//              arrived: rows past a packed sequence's end zeroed, and whether a tile that hides some keys
//              from some rows holds NaN or inf, before handing it to the consumers
//   consumers  (warpgroups 1 and 2, 64 query rows each), per key tile t:
//       s = q k_t^T                  wgmma, both operands in shared memory; k_t's buffer handed back; ALiBi's
//                                    key term added by one more product (AlibiKeyTerm)
//       o += p_{t-1} v_{t-1}         wgmma, p from registers, in flight with s and then under the softmax
//       score, online softmax        softmax_scores (softmax.cuh) on the s fragments; element masks only
//                                    on the tiles the variant classifies as EDGE
//       o = o * alpha, p_t = s       once the product is done; v_{t-1}'s buffer handed back; dropout
//                                    applied to p_t packed
//     The last tile's o += p v stays pending into the next work tile: issued beside its first s, with its
//     first softmax under it, and o's rows stored after. A tile with nothing pending (a block's first, or
//     after a skipped or guarded one) waits for its s alone. A pending product whose V tile the V warp found
//     NaN or inf in (a tile that hides keys) is taken guarded instead, on the CUDA cores.
// float32 takes the same path on its operands' three bfloat16 parts (split.cuh, split.cu): each product is
// six wgmma products of parts, o's of each key tile summed in a fresh accumulator and added to o on the
// CUDA cores, which round to nearest (the tensor cores' float32 sums, chained over every tile, drift), and
// nothing in flight across the softmax. Its inputs are finite (FwdParams::gate), so the V warp has nothing
// to scan: a packed sequence's neighbour rows meet only zero probabilities.
// Tiles sit in shared memory as TMA writes them (128-byte swizzle, sm90.cuh); rows and columns past the
// ends of the tensors arrive as zeros. Rows past a packed sequence's end are its neighbour's: K's are masked
// and q's never stored, and V's are zeroed by the V warp before the consumers read them.
#include "common.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "split.cuh"
#include "wgmma.cuh"

// Work tile `tile` of a persistent block: (query tile, head, batch). Without a causal mask or a window every
// query tile of a head visits the same keys: the query tile is the fastest axis, so that the blocks running
// side by side read one head's K and V, from L2 after the first. Under one (BOUNDED), query tile i of T
// visits about i + 1 key tiles: tiles T - 1 - i and i go as a pair, T + 1 key tiles between them, the long
// one in a round of the grid and the short one in the next, so that the blocks stay balanced; a head's
// pairs are neighbours, so that the blocks running side by side share its K and V. A grid of a block per
// work tile takes them one each. A packed batch walks the list of its sequences by their keys, longest first
// (FwdParamsSm90::work, built by work_list.cu), each head's query tiles last first: only tiles that hold
// queries, which the blocks take as they free up (Schedule), the shortest last.
template <typename Var>
struct WorkTile {
    static constexpr bool BOUNDED = Var::window && !Var::packed;
    int m0, h, b;
    bool valid = true;  // the last rounds of pairs, and a middle tile's mirror, leave slots empty

    __device__ static bool paired(int query_tiles, int heads) { return BOUNDED && query_tiles * heads > gridDim.x; }
    // The bound of the persistent blocks' loop over `tile`.
    __device__ static int count(const FwdParamsSm90& p, int query_tiles) {
        if (Var::packed) return p.work[p.batch];
        const int heads = p.fwd.nheads * p.batch;
        if (!paired(query_tiles, heads)) return query_tiles * heads;
        const int pairs = (query_tiles + 1) / 2 * heads;
        return 2 * ((pairs + gridDim.x - 1) / gridDim.x) * gridDim.x;
    }
    // The divisors of a bounded batch's work tiles, fixed for the kernel: a paired work tile's start divides by
    // them in a multiply and a shift each, not in a chain of four divisions. Unbounded starts keep their two
    // divisions: with these the non-causal forward took 3% more time at 16k keys (H100), for no gain.
    struct Divisors {
        FastDiv grid, query_tiles, pairs, heads;
        __device__ Divisors(const FwdParamsSm90& p, int query_tiles_)
            : grid(gridDim.x), query_tiles(query_tiles_), pairs((query_tiles_ + 1) / 2), heads(p.fwd.nheads) {}
    };
    __device__ WorkTile(const FwdParamsSm90& p, int tile, const Divisors& div, int block_m) {
        const int nheads = p.fwd.nheads;
        int query_tiles = div.query_tiles.d, query_tile, head;  // head: h + nheads * b
        if constexpr (Var::packed) {
            int lo = 0, hi = p.batch;  // the listed sequence whose tiles hold `tile`: work[lo] <= tile < work[hi]
            while (hi - lo > 1) {
                const int mid = (lo + hi) / 2;
                (p.work[mid] <= tile ? lo : hi) = mid;
            }
            const int first = p.work[lo];
            query_tiles = (p.work[lo + 1] - first) / nheads;
            query_tile = query_tiles - 1 - (tile - first) % query_tiles;
            head = (tile - first) / query_tiles + nheads * p.work[p.batch + 1 + lo];
        } else if constexpr (BOUNDED) {
            head = div.query_tiles.div(tile);
            query_tile = tile - head * query_tiles;
            if (paired(query_tiles, nheads * p.batch)) {
                const int round = div.grid.div(tile), unit = round / 2 * gridDim.x + (tile - round * gridDim.x);
                head = div.pairs.div(unit);
                const int pair = unit - head * div.pairs.d;
                query_tile = round % 2 == 0 ? query_tiles - 1 - pair : pair;
                valid = head < nheads * p.batch && (round % 2 == 0 || 2 * pair + 1 != query_tiles);
            }
        } else {
            query_tile = tile % query_tiles;
            head = tile / query_tiles;
        }
        m0 = query_tile * block_m;
        b = BOUNDED ? div.heads.div(head) : head / nheads;
        h = head - b * nheads;
    }
};

// A block's work tiles in turn, -1 past its last: a stride of the grid over them, or (DYNAMIC, a packed batch)
// taken one at a time from the counter of FwdParamsSm90::work by the producer, which hands each to the V warp
// and the consumers through a ring of SCHEDULE_SLOTS in shared memory. A packed batch's tiles take times as
// varied as its sequences' lengths: at a stride the blocks ended 8% (non-causal) to 24% (causal) apart in a
// model of a batch of lengths 128-4096; taken as they free up, the longest first, about 0.1%. (Dense causal
// tiles taken so, in sections of heads whose K and V fit in L2 instead of in pairs, measured 1-14% slower at
// 1k-8k, the more so the wider the head.)
constexpr int SCHEDULE_SLOTS = 2;
template <bool DYNAMIC>
struct Schedule {
    int* slots;
    unsigned long long* full;  // [SCHEDULE_SLOTS]: the producer has written the slot
    unsigned long long* free;  // [SCHEDULE_SLOTS]: every reader has read it
    int count, step = 0;
    int taken = 0;  // the producer's next tile, taken a tile ahead: a take's round trip to L2 at a tile's start
                    // stalled the short ones

    __device__ int produce(const FwdParamsSm90& p) {
        int tile = blockIdx.x + step * gridDim.x;
        if constexpr (DYNAMIC) {
            const int slot = step % SCHEDULE_SLOTS;
            if (step >= SCHEDULE_SLOTS) mbar_wait(free + slot, (step / SCHEDULE_SLOTS - 1) & 1);
            if (step > 0) tile = taken;
            if (tile < count) taken = gridDim.x + atomicAdd(p.work + 2 * p.batch + 1, 1);
            slots[slot] = tile < count ? tile : -1;
            mbar_arrive(full + slot);
        }
        ++step;
        return tile < count ? tile : -1;
    }
    __device__ int consume() {
        int tile = blockIdx.x + step * gridDim.x;
        if constexpr (DYNAMIC) {
            const int slot = step % SCHEDULE_SLOTS;
            mbar_wait(full + slot, (step / SCHEDULE_SLOTS) & 1);
            tile = slots[slot];
            mbar_arrive(free + slot);
        }
        ++step;
        return tile < count ? tile : -1;
    }
};

// The key tiles [first, last) of a work tile: none past the end of a packed sequence's queries.
template <typename Var, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void key_tiles(const FwdParams& f, const Sequence& seq, const WorkTile<Var>& w,
                                          int& first, int& last) {
    variant_of<Var>(f, seq, w.b, w.h).template key_tiles<BLOCK_M, BLOCK_N>(w.m0, first, last);
    if (Var::packed && w.m0 >= seq.seqlen_q) last = first;
}

// A KV cache's pages read in place (FwdParamsSm90::block_table) come in boxes of at least this many rows, at
// most BLOCK_N / PAGE_BOX_ROWS a key tile, whose page ids the producer reads at once (read one box after
// another, pages of 16 and 32 rows took 2.2x and 1.3x the time of the pages gathered at headdim 128, H100);
// with boxes of 16 rows, up to 12 a tile, the producer's registers spill.
[[maybe_unused]] constexpr int PAGE_BOX_ROWS = 32;  // read by the plan, which sends the pages

// The row of k and v that holds key n of packed sequence b (its position k0 + n), through a KV cache's pages
// (FwdParamsSm90::block_table), n a multiple of the page box. A box past the sequence's last key reads that key's
// box again (the V warp zeroes its rows, the masks hide them): only the pages the sequence uses are looked up.
template <bool PAGES>
__device__ __forceinline__ int key_row(const FwdParamsSm90& p, const Sequence& seq, int b, int n) {
    const int pos = int(seq.k0) + n;
    if (!PAGES || !p.block_table) return pos;
    const int at = min(pos, int(seq.k0) + seq.seqlen_k - 1) & -p.page_box, page = at / p.page_size;
    return p.block_table[b * p.table_stride + page] * p.page_size + (at - page * p.page_size);
}

// ALiBi's key term on the tensor cores (16-bit inputs, no softcap). On a tile without element checks a score is
// s scale + slope (n - n0) + a term of its row (TileScores, mask.cuh), the sign of slope the tile's side of the
// diagonals. One more k16 product per tile adds a (n - n0) to s, a = slope / scale: A holds a's three 16-bit
// parts (a0 + a1 + a2 is a to float32's precision) in columns 0-2, B the column offsets n - n0 (exact in 16
// bits) in rows 0-2, so that the exponent's FMA takes s as it takes a plain tile's (one FMA an element
// fewer). float16 holds a only below 65504: past that, `fits` is false and the tiles take element checks,
// which form each score whole.
template <typename Op, int BLOCK_N> struct AlibiKeyTerm {
    unsigned before, after;  // this lane's A register for keys at or before the rows' diagonals, and after
    bool fits;

    // B ([BLOCK_N / 64][16][64], as TMA writes a tile), written by every thread of the block before they first sync.
    __device__ static void fill_offsets(Op* tile) {
        unsigned char* bytes = reinterpret_cast<unsigned char*>(tile);
        for (int i = threadIdx.x; i < 16 * BLOCK_N / 2; i += blockDim.x) {
            const int k = i / (BLOCK_N / 2), n = 2 * (i % (BLOCK_N / 2)), col = n % 64;
            *reinterpret_cast<unsigned*>(bytes + (n / 64) * 2048 + k * 128 + ((col / 8) ^ (k % 8)) * 16 + (col % 8) * 2) =
                k < 3 ? pack2<Op>(float(n), float(n + 1)) : 0u;
        }
        fence_async_shared();
    }
    // A's rows g and g + 8, columns 2 tq and 2 tq + 1 (the mma.sync layout): a0, a1 in lane tq 0, a2 in 1.
    __device__ static unsigned lane_parts(float a, int tq) {
        const float a0 = to_acc(from_acc<Op>(a)), r1 = a - a0, a1 = to_acc(from_acc<Op>(r1));
        return tq == 0 ? pack2<Op>(a0, a1) : tq == 1 ? pack2<Op>(r1 - a1, 0.f) : 0u;
    }
    __device__ AlibiKeyTerm(float slope, float scale, int tq) {
        const float a = slope / scale;
        fits = fabsf(a) < (Half16<Op>::EXP == 0x7c00u ? 65504.f : 3.0e38f);  // NaN does not fit
        before = lane_parts(a, tq);
        after = lane_parts(-a, tq);
    }
    // A's registers for a tile whose keys lie at or before (before_diagonal) or after its rows' diagonals: set
    // ahead of the products' fence (registers set after it make ptxas fence again).
    __device__ __forceinline__ void fragment(bool before_diagonal, unsigned (&a)[4]) const {
        a[0] = a[1] = before_diagonal ? before : after;
        a[2] = a[3] = 0u;
        fence_regs(a);
    }
    // s += a (n - n0), issued into s's product (not committed).
    __device__ __forceinline__ static void issue(float (&s)[BLOCK_N / 2], const unsigned (&a)[4], const Op* offsets) {
        wgmma_rs<Op, BLOCK_N>(s, a, n_major_desc(offsets, 16 * 128).at(0), 1);
    }
};

// Where o holds more columns than a key tile (head tile 192 and 256, 64 keys), rescaling it costs more
// than the tile's softmax: there the 16-bit consumers' running max may lag a row's by this much (log2
// units; OnlineSoftmax), and o is rescaled only for the tiles that raise it further, the first few of a row
// (head tile 256: 8% less time at 4 x 4096; at 128 no gain beyond the runs' 2-3% noise).
constexpr int MAX_SLACK = 8;

// A bool mask's key tile as the producer hands it to the V warp and the consumers: its TileKind, and ROW_END
// on the last tile the row visits (those the mask hides after it are not visited).
constexpr int KIND_BITS = 3, ROW_END = 4;

// BOUNDED: bfloat16 softcapped scores (no ALiBi or bias) with cap log2(e) <= BOUNDED_LIMIT, shifted by a
// constant instead of a running max (bounded_shift, softmax.cuh).
template <typename T, int D_TILE, int BLOCK_N, int STAGES, int Q_STAGES, typename Var, bool BOUNDED>
__global__ void __launch_bounds__(384, 1) flash_fwd_sm90(const __grid_constant__ FwdParamsSm90 p) {
    using Op = typename Operands<T>::type;
    constexpr int PARTS = Operands<T>::PARTS;
    constexpr int BLOCK_M = 128, CONSUMERS = 256, CHUNKS = D_TILE / 64, NT = BLOCK_N / 8, DT = D_TILE / 8;
    constexpr int Q_ELEMS = BLOCK_M * D_TILE, KV_ELEMS = BLOCK_N * D_TILE;  // of a part
    static_assert(D_TILE % 64 == 0 && BLOCK_N % 16 == 0, "tile shape");
    static_assert(!BOUNDED || (PARTS == 1 && Half16<Op>::EXP == 0x7f80u && Var::softcap && !Var::alibi && !Var::bias),
                  "bounded scores: bfloat16 softcap");
    if (gated_off(p.fwd)) return;

    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;  // swizzle atoms: 1024-aligned
    Op* sQ = reinterpret_cast<Op*>(smem);          // [Q_STAGES][PARTS][CHUNKS][BLOCK_M][64]
    Op* sK = sQ + Q_STAGES * PARTS * Q_ELEMS;      // [STAGES][PARTS][CHUNKS][BLOCK_N][64]
    Op* sV = sK + STAGES * PARTS * KV_ELEMS;       // [STAGES][PARTS][CHUNKS][BLOCK_N][64]
    // ALiBi's key term on the tensor cores (AlibiKeyTerm), where the tile's width is a product's
    constexpr bool ALIBI_PRODUCT = PARTS == 1 && Var::alibi && !Var::softcap && BLOCK_N % 64 == 0;
    Op* sOffsets = sV + STAGES * PARTS * KV_ELEMS;  // [BLOCK_N / 64][16][64]: ALIBI_PRODUCT only
    unsigned long long* q_full =
        reinterpret_cast<unsigned long long*>(sOffsets + (ALIBI_PRODUCT ? 16 * BLOCK_N : 0));  // [Q_STAGES]
    // [Q_STAGES], with two or more q buffers: every consumer thread arrives. One buffer goes back with the
    // work tile's last k buffer (k_free).
    unsigned long long* q_free = q_full + Q_STAGES;
    unsigned long long* k_full = q_free + (Q_STAGES > 1 ? Q_STAGES : 0);  // [STAGES]
    unsigned long long* v_full = k_full + STAGES;  // [STAGES]
    unsigned long long* k_free = v_full + STAGES;  // [STAGES]: every consumer thread arrives
    unsigned long long* v_free = k_free + STAGES;  // [STAGES]: every consumer thread arrives (and the V warp's)
    unsigned long long* v_clean = v_free + STAGES; // [STAGES]: the V warp is done with the tile
    unsigned long long* sched_full = v_clean + STAGES;  // [SCHEDULE_SLOTS]
    unsigned long long* sched_free = sched_full + SCHEDULE_SLOTS;  // [SCHEDULE_SLOTS]
    int* kinds = reinterpret_cast<int*>(sched_free + SCHEDULE_SLOTS);  // [STAGES]: bool mask: kind, ROW_END
    int* v_kinds = kinds + STAGES;  // [STAGES]: the same, for the V warp (written once it has freed the slot)
    int* v_scan = v_kinds + STAGES;  // [STAGES]: the V warp found NaN or inf in a tile that hides keys
    int* sched_slots = v_scan + STAGES;  // [SCHEDULE_SLOTS]
    constexpr int V_WARP = PARTS == 1 && (Var::packed || Var::hides_keys) ? 32 : 0;  // its threads
    constexpr bool DYNAMIC = Var::packed;

    const FwdParams& f = p.fwd;
    const int query_tiles = (f.seqlen_q + BLOCK_M - 1) / BLOCK_M;
    Schedule<DYNAMIC> schedule{sched_slots, sched_full, sched_free, WorkTile<Var>::count(p, query_tiles)};
    const typename WorkTile<Var>::Divisors work_divisors(p, query_tiles);

    if (threadIdx.x == 0) {
        for (int s = 0; s < Q_STAGES; ++s) {
            mbar_init(q_full + s, 1);
            if (Q_STAGES > 1) mbar_init(q_free + s, CONSUMERS);
        }
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full + s, 1);
            mbar_init(v_full + s, 1);
            mbar_init(k_free + s, CONSUMERS);
            mbar_init(v_free + s, CONSUMERS + V_WARP);
            if (V_WARP) mbar_init(v_clean + s, V_WARP);
        }
        for (int s = 0; DYNAMIC && s < SCHEDULE_SLOTS; ++s) {
            mbar_init(sched_full + s, 1);
            mbar_init(sched_free + s, CONSUMERS + V_WARP);
        }
        mbar_fence_init();
    }
    if constexpr (ALIBI_PRODUCT) AlibiKeyTerm<Op, BLOCK_N>::fill_offsets(sOffsets);
    __syncthreads();

    // Producer and consumers walk the same work tiles and count the same key tiles (kv_step, across work
    // tiles) and loaded query tiles (q_step), from which each buffer and barrier phase follows. With two
    // query buffers the next work tile's q arrives while this one runs.
    if (threadIdx.x < 128) {
        // ---- producer
        regs_release<40>();  // 128 x 128 registers freed here make the consumers' 256 x 64 more
        if (threadIdx.x == 0) {
            int kv_step = 0, q_step = 0;
            constexpr bool PAGES = PARTS == 1 && Var::packed;  // a KV cache's pages: 16-bit packed batches only
            constexpr int BOXES = PAGES ? BLOCK_N / PAGE_BOX_ROWS : 1;  // at most, a key tile
            for (int tile = schedule.produce(p); tile >= 0; tile = schedule.produce(p)) {
                const WorkTile<Var> w(p, tile, work_divisors, BLOCK_M);
                if (!w.valid) continue;
                const Sequence seq = sequence<Var::packed>(f, w.b);
                const Var var = variant_of<Var>(f, seq, w.b, w.h);
                int t_first, t_last;
                key_tiles<Var, BLOCK_M, BLOCK_N>(f, seq, w, t_first, t_last);
                if (t_last == t_first) continue;
                // The key tiles a bool mask hides at the end of the row are not visited: the last visited
                // one carries ROW_END, on which the V warp and the consumers end the row too.
                if constexpr (Var::bool_mask)
                    while (t_last - 1 > t_first && var.tile_kind(w.m0, BLOCK_M, (t_last - 1) * BLOCK_N, BLOCK_N) == SKIP)
                        --t_last;
                const int hk = w.h / f.group;
                const int q_slot = q_step % Q_STAGES;
                if constexpr (Q_STAGES > 1) {
                    if (q_step >= Q_STAGES) mbar_wait(q_free + q_slot, (q_step / Q_STAGES - 1) & 1);
                } else if (q_step > 0) {  // the consumers free the last key tile's k once its s = q k^T is done
                    const int last = kv_step - 1;
                    mbar_wait(k_free + last % STAGES, (last / STAGES) & 1);
                }
                mbar_expect_tx(q_full + q_slot, PARTS * Q_ELEMS * sizeof(Op));
                for (int part = 0; part < PARTS; ++part)
                    for (int c = 0; c < CHUNKS; ++c)
                        tma_load(sQ + (q_slot * PARTS + part) * Q_ELEMS + c * BLOCK_M * 64, p.tma_q, c * 64,
                                 int(seq.q0) + w.m0, w.h, seq.entry + part * p.parts_apart, q_full + q_slot);
                ++q_step;
                for (int t = t_first; t < t_last; ++t, ++kv_step) {
                    const int stage = kv_step % STAGES, n0 = t * BLOCK_N, free_parity = (kv_step / STAGES - 1) & 1;
                    Op* k_buf = sK + stage * PARTS * KV_ELEMS;
                    Op* v_buf = sV + stage * PARTS * KV_ELEMS;
                    // A bool mask's tile classification reads memory (its cells): it travels with k (the
                    // arrival releases it), read while the producer waits rather than by the consumers
                    // before their products. The consumers classify by arithmetic themselves: handing every
                    // kind over made plain 5-10% slower.
                    const int kind = Var::bool_mask ? var.tile_kind(w.m0, BLOCK_M, n0, BLOCK_N) : 0;
                    const int word = kind | (t == t_last - 1 ? ROW_END : 0);
                    // Where the tile's rows lie: a KV cache's pages (PAGES) in boxes that each lie
                    // within a page, their page ids read while the producer waits, all at once.
                    const int box_rows = PAGES && p.block_table ? p.page_box : BLOCK_N;
                    int rows[BOXES];
#pragma unroll
                    for (int r = 0; r < BOXES; ++r)
                        if (r * box_rows < BLOCK_N) rows[r] = key_row<PAGES>(p, seq, w.b, n0 + r * box_rows);
                    // k's buffer comes back after its s, v's a tile later, after its product
                    if (kv_step >= STAGES) mbar_wait(k_free + stage, free_parity);
                    if constexpr (Var::bool_mask) {
                        kinds[stage] = word;
                        if (kind == SKIP) {  // nobody reads the tile: its phases complete without a copy
                            mbar_arrive(k_full + stage);
                            if (kv_step >= STAGES) mbar_wait(v_free + stage, free_parity);
                            v_kinds[stage] = word;
                            mbar_arrive(v_full + stage);
                            continue;
                        }
                    }
                    mbar_expect_tx(k_full + stage, PARTS * KV_ELEMS * sizeof(Op));
#pragma unroll
                    for (int r = 0; r < BOXES; ++r)
                        if (r * box_rows < BLOCK_N)
                            for (int part = 0; part < PARTS; ++part)
                                for (int c = 0; c < CHUNKS; ++c)
                                    tma_load(k_buf + part * KV_ELEMS + (c * BLOCK_N + r * box_rows) * 64, p.tma_k,
                                             c * 64, rows[r], hk, seq.entry + part * p.parts_apart, k_full + stage);
                    if (kv_step >= STAGES) mbar_wait(v_free + stage, free_parity);
                    if constexpr (Var::bool_mask) v_kinds[stage] = word;
                    mbar_expect_tx(v_full + stage, PARTS * KV_ELEMS * sizeof(Op));
#pragma unroll
                    for (int r = 0; r < BOXES; ++r)
                        if (r * box_rows < BLOCK_N)
                            for (int part = 0; part < PARTS; ++part)
                                for (int c = 0; c < CHUNKS; ++c)
                                    tma_load(v_buf + part * KV_ELEMS + (c * BLOCK_N + r * box_rows) * 64, p.tma_v,
                                             c * 64, rows[r], hk, seq.entry + part * p.parts_apart, v_full + stage);
                }
            }
        } else if (V_WARP && threadIdx.x / 32 == 1) {
            // the V warp: every V tile in turn (so that it is never a phase off), then handed to the
            // consumers and back to the producer. A tile that hides some keys from some rows multiplies
            // zero probabilities by V's rows, and 0 * NaN is NaN: the consumers take the guarded product
            // where it holds NaN or inf. Scanned here, off the consumers' path, once it has arrived.
            const int lane = threadIdx.x % 32;
            int kv_step = 0;
            for (int tile = schedule.consume(); tile >= 0; tile = schedule.consume()) {
                const WorkTile<Var> w(p, tile, work_divisors, BLOCK_M);
                if (!w.valid) continue;
                const Sequence seq = sequence<Var::packed>(f, w.b);
                const Var var = variant_of<Var>(f, seq, w.b, w.h);
                int t_first, t_last;
                key_tiles<Var, BLOCK_M, BLOCK_N>(f, seq, w, t_first, t_last);
                bool row_end = false;
                for (int t = t_first; t < t_last && !row_end; ++t, ++kv_step) {
                    const int stage = kv_step % STAGES, n0 = t * BLOCK_N;
                    Op* v_buf = sV + stage * PARTS * KV_ELEMS;
                    mbar_wait(v_full + stage, (kv_step / STAGES) & 1);
                    if (Var::packed && n0 + BLOCK_N > seq.seqlen_k)
                        zero_rows<Op, BLOCK_N, CHUNKS, 32>(v_buf, seq.seqlen_k - n0, lane);
                    if constexpr (Var::hides_keys) {
                        TileKind kind;
                        if constexpr (Var::bool_mask) {
                            const int word = v_kinds[stage];
                            kind = TileKind(word & KIND_BITS);
                            row_end = word & ROW_END;
                        } else {
                            kind = var.tile_kind(w.m0, BLOCK_M, n0, BLOCK_N);
                        }
                        const int rows = min(BLOCK_N, seq.seqlen_k - n0);  // the sequence's (the rest are zeros)
                        const bool bad = kind != INTERIOR && kind != SKIP &&
                                         rows_nonfinite<Op, BLOCK_N, CHUNKS>(v_buf, rows, lane);
                        if (lane == 0) v_scan[stage] = bad;
                    }
                    mbar_arrive(v_clean + stage);
                    mbar_arrive(v_free + stage);
                }
            }
        }
    } else {
        // ---- consumers
        regs_claim<232>();
        const int wg = warpgroup() - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
        const float scale_log2 = float(f.scale) * float(LOG2E);
        int kv_step = 0, q_step = 0;
        // Bounded scores on the deeper ring (long rows, _plan.SM90_BOUNDED_STAGES): the warpgroups take turns
        // to issue their products (named barriers 2 and 3), so that one's softmax, whose two multi-function
        // unit operations a score pace it, runs under the other's products. Every work tile visits the same
        // key tiles in both warpgroups, so their turns pair up.
        constexpr bool TURNS = BOUNDED && STAGES > 2 && !Var::window;
        if (TURNS && wg == 1) named_barrier_arrive<256>(2);  // warpgroup 0 takes the first turn

        float o[1][DT][4];
        zero(o);
        float(&o_regs)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(o);
        unsigned p_regs[NT * 2];  // p of the pending tile (kv_step - 1) in the A layout of wgmma, unmarked
        bool pending = false;
        struct { int h, b, row0, n0; } pending_at{};  // its work tile's head and batch, this thread's row, its keys
        // A work tile's last product stays pending into the next work tile (CARRY; output rows of 4-byte
        // aligned pairs), whose first s = q k^T issues beside it, and whose first softmax runs under it; the
        // finished rows are stored after that. A short work tile (causal 1k: 1-8 key tiles) otherwise waits
        // out its last product, its store and the next tile's first product and softmax alone.
        constexpr bool CARRY = PARTS == 1 && Q_STAGES > 1;
        const bool carry = CARRY && reinterpret_cast<unsigned long long>(f.out) % 4 == 0 && f.o_st.b % 2 == 0 &&
                           f.o_st.s % 2 == 0 && f.o_st.h % 2 == 0 && f.headdim % 2 == 0;  // from the parameters: uniform
        struct Finished {
            T* rows;
            int nrows;
            float inv_l[1][2];
            bool open = false;  // o holds these rows, not yet stored
        } done;
        auto finish = [&]() {
            if constexpr (CARRY)
                store_slab_predicated<true>(done.rows, f.o_st.s, o, done.inv_l, 64 * wg + 16 * warp, done.nrows,
                                            f.headdim, lane);
            zero(o);
            done.open = false;
        };

        // o += p v with the V buffer of step `step`, issued (not waited for)
        auto issue_pv = [&](int step) {
            const TileDesc v_desc = n_major_desc(sV + (step % STAGES) * PARTS * KV_ELEMS, BLOCK_N * 128);
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                wgmma_rs<Op, D_TILE>(o_regs, reinterpret_cast<const unsigned(&)[4]>(p_regs[4 * kk]),
                                     v_desc.at(n_major_step(kk)), 1);
            wgmma_commit();
        };
        auto v_ready = [&](int step) { mbar_wait((V_WARP ? v_clean : v_full) + step % STAGES, (step / STAGES) & 1); };
        // Whether the V tile of step `step` (ready) holds NaN or inf that some rows must not see: the V warp
        // scans a tile that hides keys from some rows once it has arrived, and the consumers look when they
        // come to its product, a tile later, rather than wait for the scan after the tile's softmax.
        auto dirty = [&](int step) { return V_WARP && Var::hides_keys && v_scan[step % STAGES] != 0; };
        // the pending product on a dirty tile: each NaN or inf reaches only the rows that see its key. The
        // probabilities are computed unmarked (a hidden one is +0.0, as an underflow is): the guarded product
        // marks the hidden ones from the variant first.
        auto guarded = [&](int step) {
            const Sequence seq = sequence<Var::packed>(f, pending_at.b);
            gemm_rn_guarded<Op, BLOCK_N, D_TILE>(o[0], p_regs, SwizzledTile<Op, BLOCK_N>{sV + (step % STAGES) * PARTS * KV_ELEMS},
                                                 variant_of<Var>(f, seq, pending_at.b, pending_at.h), pending_at.row0,
                                                 pending_at.n0, lane);
            mbar_arrive(v_free + step % STAGES);
            pending = false;
        };
        // the pending product, alone
        auto flush = [&](int step) {
            v_ready(step);
            if (dirty(step)) {
                guarded(step);
                return;
            }
            fence_regs(o_regs);
            wgmma_fence();
            issue_pv(step);
            wgmma_wait<0>();
            fence_regs(o_regs);
            mbar_arrive(v_free + step % STAGES);
            pending = false;
        };

        for (int tile = schedule.consume(); tile >= 0; tile = schedule.consume()) {
            const WorkTile<Var> w(p, tile, work_divisors, BLOCK_M);
            if (!w.valid) continue;
            const Sequence seq = sequence<Var::packed>(f, w.b);
            const Var var = variant_of<Var>(f, seq, w.b, w.h);
            int t_first, t_last;
            key_tiles<Var, BLOCK_M, BLOCK_N>(f, seq, w, t_first, t_last);
            const int m0 = w.m0, row0 = m0 + 64 * wg + 16 * warp + lane / 4;
            const AlibiKeyTerm<Op, BLOCK_N> alibi(var.slope, float(f.scale), tq);

            constexpr int SLACK = PARTS == 1 && D_TILE > BLOCK_N ? MAX_SLACK : 0;
            OnlineSoftmax<float, SLACK> stats[1][2];
            if constexpr (BOUNDED)
                stats[0][0] = stats[0][1] = OnlineSoftmax<float, SLACK>(bounded_shift(float(var.cap) * float(LOG2E)));

            const int q_slot = q_step % Q_STAGES;
            const Op* q_rows = sQ + q_slot * PARTS * Q_ELEMS + 64 * wg * 64;  // this warpgroup's rows of each chunk
            // A key tile of split operands (PARTS > 1), start to end: s = q k^T of the parts, the softmax, and
            // o += p v of the parts (p split in registers) in a fresh accumulator, added on the CUDA cores.
            auto split_tile = [&](TileKind kind, const Var& var, int stage, int n0) {
                float s[1][NT][4];
                float(&s_regs)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(s);
                TileWords<1, NT> words;
                check_tile(kind, var, [&](auto check, const Var& v) {
                    wgmma_fence();
                    wgmma_nt<Op, BLOCK_N, D_TILE, BLOCK_M, BLOCK_N, PARTS>(s_regs, q_rows, sK + stage * PARTS * KV_ELEMS,
                                                                           Q_ELEMS, KV_ELEMS);
                    wgmma_commit();
                    if constexpr (Var::dropout) {
                        words.draw(v, row0, n0, tq);
                        fence_regs(reinterpret_cast<unsigned(&)[sizeof(words) / 4]>(words));
                    }
                    wgmma_wait<0>();
                    fence_regs(s_regs);
                    mbar_arrive(k_free + stage);
                    float alpha[1][2];
                    softmax_scores<decltype(check)::value, false>(v, s, stats, alpha, row0, n0, tq, scale_log2, words);
                    rescale_rows(o, alpha);
                });
                unsigned p_parts[PARTS][NT * 2];
                split_fragments(s_regs, p_parts);
                float pv[DT * 4];
                const TileDesc v_desc = n_major_desc(sV + stage * PARTS * KV_ELEMS, BLOCK_N * 128);
                v_ready(kv_step);
                wgmma_fence();
#pragma unroll
                for (int pair = 0; pair < split_pairs(PARTS); ++pair)
#pragma unroll
                    for (int kk = 0; kk < BLOCK_N / 16; ++kk)
                        wgmma_rs<Op, D_TILE>(
                            pv, reinterpret_cast<const unsigned(&)[4]>(p_parts[split_part_a(PARTS, pair)][4 * kk]),
                            v_desc.at(split_part_b(PARTS, pair) * KV_ELEMS * sizeof(Op) + n_major_step(kk)),
                            pair > 0 || kk > 0);
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(pv);
                mbar_arrive(v_free + stage);
#pragma unroll
                for (int i = 0; i < DT * 4; ++i) o_regs[i] += pv[i];
            };
            if (t_last > t_first) mbar_wait(q_full + q_slot, (q_step / Q_STAGES) & 1);
            bool row_end = false;
            for (int t = t_first; t < t_last && !row_end; ++t, ++kv_step) {
                const int stage = kv_step % STAGES, parity = (kv_step / STAGES) & 1, n0 = t * BLOCK_N;
                // Every phase is waited for, skipped tiles too, so that no copy into a buffer is in flight
                // when the producer reuses it.
                TileKind kind = Var::bool_mask ? SKIP : var.tile_kind(m0, BLOCK_M, n0, BLOCK_N);
                mbar_wait(k_full + stage, parity);
                if constexpr (Var::bool_mask) {  // once: the slot is refilled after s
                    const int word = kinds[stage];
                    kind = TileKind(word & KIND_BITS);
                    row_end = word & ROW_END;
                }
                if (ALIBI_PRODUCT && kind == INTERIOR && !alibi.fits) kind = EDGE;
                if (kind == SKIP) {
                    if (pending) flush(kv_step - 1);
                    if (done.open) finish();
                    mbar_arrive(k_free + stage);
                    v_ready(kv_step);
                    mbar_arrive(v_free + stage);
                    continue;
                }
                if constexpr (PARTS > 1) {
                    split_tile(kind, var, stage, n0);
                    continue;
                }
                if (pending) {
                    v_ready(kv_step - 1);
                    if (dirty(kv_step - 1)) {
                        guarded(kv_step - 1);
                        if (done.open) finish();
                    }
                }
                float s[1][NT][4];
                float(&s_regs)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(s);
                TileWords<1, NT> words;  // dropout's: ptxas draws them among the exponentials (SASS)
                [[maybe_unused]] PackedKeep<NT> keep;  // and makes these masks of p's pairs from them there
                // One body per (element checks, product pending): no branch while products are in flight.
                check_tile(kind, var, [&](auto check, const Var& v) {
                    constexpr bool KEY_TERM = ALIBI_PRODUCT && !decltype(check)::value;
                    auto body = [&](auto overlap) {
                        [[maybe_unused]] unsigned key_a[4];
                        if constexpr (KEY_TERM) alibi.fragment(n0 <= m0 + v.offset, key_a);
                        if constexpr (TURNS) named_barrier<256>(2 + wg);
                        fence_regs(o_regs);
                        wgmma_fence();
                        wgmma_nt<Op, BLOCK_N, D_TILE, BLOCK_M, BLOCK_N>(s_regs, q_rows, sK + stage * KV_ELEMS);
                        if constexpr (KEY_TERM) alibi.issue(s_regs, key_a, sOffsets);
                        wgmma_commit();
                        if constexpr (decltype(overlap)::value) issue_pv(kv_step - 1);
                        if constexpr (TURNS) named_barrier_arrive<256>(3 - wg);  // the other's turn
                        if constexpr (Var::dropout && PARTS == 1) {
                            words.draw(v, row0, n0, tq);
                            keep.make(v, words);
                            fence_regs(keep.halves);
                        }
                        wgmma_wait<decltype(overlap)::value ? 1 : 0>();
                        fence_regs(s_regs);
                        mbar_arrive(k_free + stage);  // with one q buffer, the last tile's also frees q
                        float alpha[1][2];
                        softmax_scores<decltype(check)::value, true, false, false, KEY_TERM, BOUNDED>(v, s, stats, alpha, row0, n0, tq,
                                                                                      scale_log2, words);
                        if constexpr (decltype(overlap)::value) {
                            // The exponentials run under the product: a branch on the row sums they feed (never
                            // taken: a sum of exponentials is not negative) keeps ptxas from placing the wait first.
                            if (stats[0][0].l < 0.f || stats[0][1].l < 0.f) __trap();
                            wgmma_wait<0>();
                            fence_regs(o_regs);
                            mbar_arrive(v_free + (kv_step - 1) % STAGES);
                            if (done.open) finish();  // o was the previous work tile's
                        }
                        if (!BOUNDED && (SLACK == 0 || alpha[0][0] != 1.f || alpha[0][1] != 1.f)) rescale_rows(o, alpha);
                    };
                    if (pending) body(Bool<true>());
                    else body(Bool<false>());
                });
#pragma unroll
                for (int i = 0; i < NT * 2; ++i) p_regs[i] = pack2<Op>(s_regs[2 * i], s_regs[2 * i + 1]);
                if constexpr (Var::dropout && PARTS == 1) keep.apply(p_regs);
                pending = true;
                pending_at = {w.h, w.b, row0, n0};
            }
            if (t_last > t_first) {
                if constexpr (Q_STAGES > 1) mbar_arrive(q_free + q_slot);  // the producer may refill this q buffer
                ++q_step;
            }
            if (done.open) {  // no key tile of this work tile has run: the previous one's product is pending
                if (pending) flush(kv_step - 1);
                finish();
            }

            // lse now; o's rows once its last product is done. Both overlap the producer's loads for the next
            // work tile.
            float* lse = static_cast<float*>(f.lse) + seq.stat_row0(f, w.h);
            float inv_l[1][2];
            const float sink = sink_log2<float>(f.var, w.h);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const auto end = stats[0][r].end(reduce_sum<4>(stats[0][r].l), sink);
                inv_l[0][r] = end.o_factor;
                if (Var::dropout) inv_l[0][r] *= float(var.dropout_scale);  // the kept probabilities' 1 / (1 - p)
                const int row = row0 + 8 * r;
                if (tq == 0 && row < seq.seqlen_q) lse[row] = end.lse;
            }
            T* rows = seq.query_rows(static_cast<T*>(f.out), f.o_st, w.h, m0);
            if (carry) {
                done = {rows, seq.seqlen_q - m0, {{inv_l[0][0], inv_l[0][1]}}, true};
                if (!pending) finish();
            } else {  // stored here, any alignment
                if (pending) flush(kv_step - 1);
                const int out_row0 = 64 * wg + 16 * warp;
                if constexpr (CARRY) store_slab_predicated<false>(rows, f.o_st.s, o, inv_l, out_row0, seq.seqlen_q - m0, f.headdim, lane);
                else store_slab(rows, f.o_st.s, o, inv_l, out_row0, seq.seqlen_q - m0, f.headdim, lane);
                zero(o);
            }
        }
        if (pending) flush(kv_step - 1);
        if (done.open) finish();
    }
}
