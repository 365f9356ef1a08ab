// The variants of the score, for every kernel: what they read (VariantParams), which tiles a row needs
// (tile ranges), whether a tile needs element-wise visibility at all, and per element the visibility, the
// transformed score (with its derivative for the backward) and the dropout bits. Its NumPy twin is
// cupyflash/_variants.py, which also maps a call to its Feature bits and VariantParams members; the host
// reads enum Feature, VariantParams and NONFINITE_ROWS from this file (cupyflash/_csource.py), so a new
// variant is a change here and there (docs/variants.md, "Adding a variant", with the rules).
//
// A kernel takes one Variant type as a template argument; FEATURES is a bit set of the features
// compiled in, so the plain kernel (FEATURES = 0) contains none of this code.
#pragma once
#include "common.cuh"
#include "philox.cuh"

// WINDOW: bounds on the keys each row sees (causal, window_size); WINDOW_LEFT, with WINDOW: a left bound
// among them (window_size's left >= 0), whose compare a causal tile's elements then do not pay. PACKED: the
// batch is packed sequences of their own lengths (params.cuh, Sequence).
enum Feature : int {
    WINDOW = 1, SOFTCAP = 2, ALIBI = 4, BOOL_MASK = 8, BIAS = 16, DROPOUT = 32, PACKED = 64, WINDOW_LEFT = 128
};

// What the variants read, a member of every pass's parameters (params.cuh). A tensor at pointer x has its
// element strides along (batch, heads, queries, keys) in x_sb, x_sh, x_sq, x_sk, zero where it broadcasts.
struct VariantParams {
    int window_left, window_right;  // -1: unbounded on that side (causal: right = 0)
    double softcap;                 // > 0 with the SOFTCAP feature
    double dropout_scale;           // 1 / (1 - dropout_p)
    unsigned dropout_threshold;     // keep a probability when its 8-bit random value is >= this
    unsigned seed_lo, seed_hi;      // Philox key
    int batch_offset;               // dropout draws the bits of batch index batch_offset + b
    const float* alibi;             // slope of (b, h) at alibi[b * alibi_sb + h * alibi_sh]
    i64 alibi_sb, alibi_sh;
    const void* mask;               // bool (1 byte) or float mask
    i64 mask_sb, mask_sh, mask_sq, mask_sk;
    unsigned char* mask_cells;      // a bool mask's CellKind per cell of 2^cell_log2 queries x keys (mask_cells.cu),
    i64 cells_sb, cells_sh, cells_sq, cells_sk;  // zero strides where the mask broadcasts
    int cell_log2;
    void* dbias;                    // backward: accumulation buffer of the bias gradient (zero strides where
    i64 dbias_sb, dbias_sh, dbias_sq, dbias_sk;  // the mask broadcasts), in the accumulation type
    const void* sink;               // a learnable sink's logit per query head (accumulation type), or null
    i64 sink_sh;                    // its element stride
};

// The learnable sink of query head h: a logit whose term exp(sink) joins its rows' softmax sums and adds
// nothing to o (OnlineSoftmax::end, the decode's merge). -inf: none.
template <typename A> __device__ __forceinline__ A sink_logit(const VariantParams& v, int h) {
    return v.sink ? static_cast<const A*>(v.sink)[h * v.sink_sh] : neg_inf<A>();
}
// The same in log2 units.
template <typename A> __device__ __forceinline__ A sink_log2(const VariantParams& v, int h) {
    return sink_logit<A>(v, h) * A(LOG2E);
}

// Keys lo ... hi (inclusive; empty when hi < lo) of a row.
struct KeySpan { int lo, hi; };

// What a tile needs: nothing (SKIP), no element checks (INTERIOR), element checks (EDGE), or element checks
// of the bounds and the window alone (EDGE_UNMASKED: a bool mask shows every element of it).
enum TileKind : int { SKIP, INTERIOR, EDGE, EDGE_UNMASKED };
// A bool mask's cell: every entry false, every entry true, or both (mask_cells.cu classifies them).
enum CellKind : unsigned char { CELL_HIDDEN, CELL_VISIBLE, CELL_MIXED };

// Rows per NaN/inf flag of RowFlags (params.cuh), written by nonfinite.cu.
constexpr int NONFINITE_ROWS = 16;

// Whether rows [row0, row0 + rows) of head h of sequence b hold NaN or inf, by the RowFlags of
// nonfinite.cu. Asked only by the tiles that hide some keys from some rows: the guarded products then
// keep masked pairs out (mma.cuh).
__device__ __forceinline__ bool rows_nonfinite(const unsigned char* flags, int seqlen, int heads, int b, int h,
                                               int row0, int rows) {
    const int chunks = (seqlen + NONFINITE_ROWS - 1) / NONFINITE_ROWS,
              last = min(chunks, (row0 + rows + NONFINITE_ROWS - 1) / NONFINITE_ROWS);
    const unsigned char* f = flags + ((i64)b * heads + h) * chunks;
    bool bad = false;
    for (int c = row0 / NONFINITE_ROWS; c < last; ++c) bad |= f[c] != 0;
    return bad;
}

__device__ __forceinline__ float tanh_approx(float x) {
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(x));
    return t;
}
__device__ __forceinline__ double tanh_approx(double x) { return tanh(x); }

// d tanh(u) / du of t = tanh(u), as the NumPy backend takes it (_variants.scores): 4 e / (1 + e)^2 with
// e = exp(-2 |u|), whose rounding stays relative where 1 - t * t cancels (t near ±1, where it keeps only
// t's rounding), and 0 where t rounds to ±1 (the capped score no longer moves with s). APPROX (16-bit
// inputs) keeps 1 - t * t: the hardware tanh's own error is the larger there, and the exponential would
// cost the backward's softcap tiles two more MUFU operations a score.
template <bool APPROX, typename A> __device__ __forceinline__ A tanh_slope(A u, A t) {
    if constexpr (APPROX) return A(1) - t * t;
    const A e = exp(A(-2) * fabs(u));
    return fabs(t) == A(1) ? A(0) : A(4) * e / ((A(1) + e) * (A(1) + e));
}

template <int FEATURES, typename MaskT = unsigned char>
struct Variant {
    static constexpr bool window = FEATURES & WINDOW, softcap = FEATURES & SOFTCAP, alibi = FEATURES & ALIBI,
                          bool_mask = FEATURES & BOOL_MASK, bias = FEATURES & BIAS, dropout = FEATURES & DROPOUT,
                          packed = FEATURES & PACKED, bounded_left = FEATURES & WINDOW_LEFT;
    // A bool mask or a bias (whose -inf entries mask too) can hide any element of any tile.
    static constexpr bool masks_everywhere = bool_mask || bias;
    // Whether some row may not see a key whose data it multiplies (beyond the ends, which loads zero).
    static constexpr bool hides_keys = window || masks_everywhere;
    // Whether a score is the product times the scale and nothing else.
    static constexpr bool scaled_product = !softcap && !alibi && !bias;

    int seqlen_q, seqlen_k, offset, left, right, b, h;
    double cap, dropout_scale;  // converted to the accumulation type where used
    float slope;
    const MaskT* mask;  // row i, column j at mask[i * mask_sq + j * mask_sk]; a null bool mask shows everything
    i64 mask_sq, mask_sk;
    const unsigned char* cells;  // a bool mask's cell (i >> cell_log2, j >> cell_log2) at cells[.. * cells_sq + .. * cells_sk]
    i64 cells_sq, cells_sk;
    int cell_log2;
    unsigned seed_lo, seed_hi, threshold;
    int batch_offset;

    Variant() = default;  // for arrays of rows' variants, assigned before use
    // Sequence b has seqlen_k_ keys (a KV cache's sequences differ in length).
    __device__ Variant(const VariantParams& v, int seqlen_q_, int seqlen_k_, int b_, int h_)
        : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), offset(seqlen_k_ - seqlen_q_),
          left(bounded_left ? v.window_left : -1), right(window ? v.window_right : -1), b(b_), h(h_),
          cap(v.softcap), dropout_scale(v.dropout_scale),
          slope(alibi ? v.alibi[b_ * v.alibi_sb + h_ * v.alibi_sh] : 0.f),
          mask(masks_everywhere ? static_cast<const MaskT*>(v.mask) + b_ * v.mask_sb + h_ * v.mask_sh : nullptr),
          mask_sq(v.mask_sq), mask_sk(v.mask_sk),
          cells(bool_mask ? v.mask_cells + b_ * v.cells_sb + h_ * v.cells_sh : nullptr),
          cells_sq(v.cells_sq), cells_sk(v.cells_sk), cell_log2(v.cell_log2), seed_lo(v.seed_lo), seed_hi(v.seed_hi),
          threshold(v.dropout_threshold), batch_offset(v.batch_offset) {}
    // From a pass's parameters (params.cuh): their variant and queries, seqlen_k_ keys of its own.
    template <typename Params>
    __device__ Variant(const Params& p, int b_, int h_, int seqlen_k_)
        : Variant(p.var, p.seqlen_q, seqlen_k_, b_, h_) {}

    // ---- tile ranges (bounds and window): [begin, end) of keys that rows [m0, m1) may see, and of
    // queries that may see keys [n0, n1). Tiles outside are skipped, not masked.
    __device__ __forceinline__ int key_begin(int m0) const { return left >= 0 ? max(0, m0 + offset - left) : 0; }
    __device__ __forceinline__ int key_end(int m1) const {
        return right >= 0 ? max(0, min(seqlen_k, m1 + offset + right)) : seqlen_k;
    }
    __device__ __forceinline__ int query_begin(int n0) const { return right >= 0 ? max(0, n0 - offset - right) : 0; }
    __device__ __forceinline__ int query_end(int n1) const {
        return left >= 0 ? max(0, min(seqlen_q, n1 - offset + left)) : seqlen_q;
    }
    // Key tiles [first, last) of width BLOCK_N for the query tile at m0 of BLOCK_M rows.
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ void key_tiles(int m0, int& first, int& last) const {
        const int begin = key_begin(m0), end = key_end(min(m0 + BLOCK_M, seqlen_q));
        first = begin / BLOCK_N;
        last = end > begin ? (end + BLOCK_N - 1) / BLOCK_N : first;
    }
    // Query tiles [first, last) of height BLOCK_M for the key tile at n0 of BLOCK_N keys.
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ void query_tiles(int n0, int& first, int& last) const {
        const int begin = query_begin(n0), end = query_end(min(n0 + BLOCK_N, seqlen_k));
        first = begin / BLOCK_M;
        last = end > begin ? (end + BLOCK_M - 1) / BLOCK_M : first;
    }

    // What the tile [m0, m0 + bm) x [n0, n0 + bn) of the band needs: SKIP (a bool mask hides all of it),
    // INTERIOR (every element visible: no element masks) or EDGE (element-wise visibility: it crosses
    // the end of the queries or keys, a window edge or a bool mask's edge, or a bias may hide any
    // element); EDGE_UNMASKED where a bool mask shows all of it and only the rest needs element checks.
    // A bool mask is read through its cells, classified before the launch: a few bytes per tile, the
    // same for every thread, instead of the tile's entries.
    // ALiBi makes EDGE the tiles with keys on both sides of a row's diagonal, so that the others take its
    // distance as a term of the key plus one of the row (TileScores).
    __device__ __forceinline__ TileKind tile_kind(int m0, int bm, int n0, int bn) const {
        const bool edge = bias || m0 + bm > seqlen_q || n0 + bn > seqlen_k ||
                          (left >= 0 && n0 < m0 + bm - 1 + offset - left) ||
                          (right >= 0 && n0 + bn - 1 > m0 + offset + right) ||
                          (alibi && n0 + bn - 1 > m0 + offset && n0 < m0 + bm - 1 + offset);
        if constexpr (bool_mask) {
            // the cells the tile's rows and keys touch (one along an axis the mask broadcasts)
            const int q0 = cells_sq == 0 ? 0 : m0 >> cell_log2, k0 = cells_sk == 0 ? 0 : n0 >> cell_log2;
            const int q1 = cells_sq == 0 ? 0 : (min(m0 + bm, seqlen_q) - 1) >> cell_log2;
            const int k1 = cells_sk == 0 ? 0 : (min(n0 + bn, seqlen_k) - 1) >> cell_log2;
            bool on = false, off = false;
            for (int cq = q0; cq <= q1; ++cq)
                for (int ck = k0; ck <= k1; ++ck) {
                    const unsigned char cell = cells[cq * cells_sq + ck * cells_sk];
                    on |= cell != CELL_HIDDEN;
                    off |= cell != CELL_VISIBLE;
                }
            if (!on) return SKIP;
            if (off) return EDGE;
            return edge ? EDGE_UNMASKED : INTERIOR;
        }
        return edge ? EDGE : INTERIOR;
    }

    // ---- elements
    // The keys [lo, hi] that row i may see by the bounds and the window (a bool mask may hide more); none
    // past the end of the queries. Computed once per row, it leaves two compares per element (one
    // without a left bound: lo is 0).
    __device__ __forceinline__ KeySpan key_span(int i) const {
        const int lo = left >= 0 ? i + offset - left : 0;
        const int hi = i >= seqlen_q ? -1 : right >= 0 ? min(seqlen_k - 1, i + offset + right) : seqlen_k - 1;
        return {lo, hi};
    }
    // The mask's entry of row i, column j (a bool mask's or a bias's).
    __device__ __forceinline__ MaskT entry(int i, int j) const { return mask[i * mask_sq + j * mask_sk]; }
    __device__ __forceinline__ bool visible(int i, int j) const {
        const KeySpan span = key_span(i);
        bool vis = (!bounded_left || j >= span.lo) && j <= span.hi;
        if constexpr (bool_mask) vis = vis && (mask == nullptr || entry(i, j) != 0);
        return vis;
    }
    // Whether the pair (i, j) adds nothing whatever the data: not visible, or a float mask's -inf there (the
    // masked zeros of a tile's probabilities, mark_hidden).
    __device__ __forceinline__ bool hidden(int i, int j) const {
        if (!visible(i, j)) return true;
        if constexpr (bias) {
            const auto x = to_acc(entry(i, j));
            return x == neg_inf<decltype(x)>();
        }
        return false;
    }

    // Score of the raw product s = q.k of (i, j) in log2 units (times log2 e), -inf where masked when
    // CHECK; dcap receives d(capped)/d(uncapped) for the softcap backward. APPROX (16-bit inputs)
    // takes tanh from the hardware approximation, whose 2^-11 relative error is below the rounding
    // of a 16-bit score.
    template <bool CHECK, bool APPROX, typename A>
    __device__ __forceinline__ A score(A s, A scale_log2, int i, int j, A& dcap) const {
        if (CHECK && !visible(i, j)) return neg_inf<A>();
        A x;
        if constexpr (softcap) {
            const A u = s * (scale_log2 * A(LN2) / A(cap)), t = APPROX ? tanh_approx(u) : tanh(u);
            dcap = tanh_slope<APPROX>(u, t);
            x = A(cap) * A(LOG2E) * t;
        } else {
            x = s * scale_log2;
        }
        if constexpr (alibi) x -= A(slope) * A(LOG2E) * A(abs(i + offset - j));
        if constexpr (bias) x += to_acc(entry(i, j)) * A(LOG2E);
        return x;
    }
    template <bool CHECK, bool APPROX, typename A>
    __device__ __forceinline__ A score(A s, A scale_log2, int i, int j) const {
        A dcap;
        return score<CHECK, APPROX>(s, scale_log2, i, j, dcap);
    }

    // ---- dropout: the Philox words of row i for the 64-column group holding column j; one call serves
    // every column 8w + 2q + {0, 1} of the group with q = (j % 8) / 2.
    __device__ __forceinline__ void random_words(int i, int j, unsigned (&r)[4]) const {
        philox4x32(seed_lo, seed_hi, unsigned((j >> 6) * 4 + ((j & 7) >> 1)), unsigned(i), unsigned(h),
                   unsigned(b + batch_offset), r);
    }
    __device__ __forceinline__ bool keep(const unsigned (&r)[4], int j) const {
        return dropout_keep_bit(r, j, threshold);
    }
    // Column 8 w + 2 q + odd of the group (w, odd known at compile time).
    __device__ __forceinline__ bool keep_at(const unsigned (&r)[4], int w, int odd) const {
        return dropout_keep_at(r, w, odd, threshold);
    }
    // The keep bits of the packed pair of columns 8 w + 2 q + {0, 1}, from word r[w / 2] (dropout_keep_halves).
    __device__ __forceinline__ unsigned keep_halves(unsigned word, int w) const {
        return dropout_keep_halves(word, w, threshold);
    }
    __device__ __forceinline__ bool keep(int i, int j) const {
        unsigned r[4];
        random_words(i, j, r);
        return keep(r, j);
    }
};

// A bool mask's entries of this lane's elements of a key tile, for two rows (row0 and row0 + 8), loaded
// together ahead of the tile's scores: bit 2 (j % 16) + ec of bits[r][j / 16] is the entry of row row0 + 8 r,
// column n0 + 8 j + 2 tq + ec (j < NT); set where nothing is read: a null mask (EDGE_UNMASKED), rows past the
// queries and columns past the keys, which the span hides. A row's pointer is formed once and steps by the
// key stride; a mask that broadcasts over the queries is read for one row.
template <int NT> struct MaskEntries {
    unsigned bits[2][(NT + 15) / 16];

    template <typename Var> __device__ __forceinline__ MaskEntries(const Var& var, int row0, int n0, int tq) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int w = 0; w < (NT + 15) / 16; ++w) bits[r][w] = ~0u;
        if (var.mask == nullptr) return;
        const int col0 = n0 + 2 * tq, cols = var.seqlen_k - col0;  // this lane's columns col0 + c, c < cols
        const bool shared_rows = var.mask_sq == 0 && row0 + 8 < var.seqlen_q;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + 8 * r;
            if (r == 1 && shared_rows) {
#pragma unroll
                for (int w = 0; w < (NT + 15) / 16; ++w) bits[1][w] = bits[0][w];
                continue;
            }
            if (row >= var.seqlen_q) continue;
            const auto* entries = var.mask + row * var.mask_sq + col0 * var.mask_sk;
            if (var.mask_sk == 1 && cols >= 8 * NT) read(entries, 1, cols, r);  // loads at constant offsets
            else read(entries, var.mask_sk, cols, r);
        }
    }
    template <typename MaskT> __device__ __forceinline__ void read(const MaskT* entries, i64 step, int cols, int r) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int ec = 0; ec < 2; ++ec) {
                const int c = 8 * j + ec;
                if (c < cols && entries[c * step] == 0) bits[r][j / 16] &= ~(1u << (2 * (j % 16) + ec));
            }
    }
    __device__ __forceinline__ bool at(int r, int j, int ec) const { return (bits[r][j / 16] >> (2 * (j % 16) + ec)) & 1u; }
};

// The scores of a key tile as the forward's online softmax takes them (softmax.cuh): in log2 units,
// score(i, j) = exp_scale u(i, j) + shift(i), with the least work per element in u; exp_scale and shift go
// into the exponent's FMA. On a tile without element checks:
//   the scaled product alone: u = s, exp_scale = scale;
//   softcap:  u = tanh(s scale / cap), exp_scale = cap (tanh increases, so the max of u gives the max);
//   ALiBi:    every key lies on one side of every row's diagonal (tile_kind), where -slope |i + offset - j|
//             is a term of the key plus one of the row, both taken from the tile's first key n0 so that
//             neither grows with the sequence: one FMA per element, from a base per column parity; or
//             none (KEY_TERM_IN_PRODUCT: the Hopper forward adds the key's term to s on the tensor cores,
//             AlibiKeyTerm), u = s then holding it in units of the scaled product.
// A tile with element checks forms each score whole (Variant::score).
template <bool CHECK, bool APPROX, typename Var, typename A, bool KEY_TERM_IN_PRODUCT = false>
struct TileScores {
    static_assert(!KEY_TERM_IN_PRODUCT || (Var::alibi && !Var::softcap), "a key term added to the product");
    static constexpr bool split_alibi = Var::alibi && !CHECK;
    static constexpr bool key_term_in_u = split_alibi && !KEY_TERM_IN_PRODUCT;
    // u leaves the scale (or the cap) to the exponent: nothing is added to the product or its tanh
    static constexpr bool bare = !CHECK && !key_term_in_u && !Var::bias;
    A exp_scale, product_scale, slope, key_base[2], row_base;
    int col_base;

    __device__ __forceinline__ TileScores(const Var& var, int row0, int n0, int tq, A scale_log2) : col_base(n0 + 2 * tq) {
        if constexpr (CHECK) {
            product_scale = Var::scaled_product ? A(1) : scale_log2;
            exp_scale = scale_log2 / product_scale;
        } else {
            product_scale = Var::softcap ? scale_log2 * A(LN2) / A(var.cap) : scale_log2;  // tanh's argument
            exp_scale = !bare ? A(1) : Var::softcap ? A(var.cap) * A(LOG2E) : scale_log2;
        }
        if constexpr (split_alibi) {
            // +: the tile's keys lie at or before the diagonals of row0 and the rows below; -: at or after
            slope = (n0 <= row0 + var.offset ? A(1) : A(-1)) * A(var.slope) * A(LOG2E);
            key_base[0] = slope * A(2 * tq);
            key_base[1] = slope * A(2 * tq + 1);
            row_base = -slope * A(row0 + var.offset - n0);
        }
    }
    // u of the product s at row row0 + d, column n0 + 8 jj + 2 tq + ec (row, col: the same, absolute);
    // entry: a bool mask's entry there (MaskEntries), true without one
    __device__ __forceinline__ A u(const Var& var, A s, int row, int col, int jj, int ec, bool entry = true) const {
        if constexpr (CHECK) {
            // the row's span relative to this lane's first column, against the column's offset in the
            // tile, a constant of the unrolled loops
            const KeySpan span = var.key_span(row);
            const int c = 8 * jj + ec;
            if ((Var::bounded_left && c < span.lo - col_base) || c > span.hi - col_base || !entry) return neg_inf<A>();
            return var.template score<false, APPROX>(s, product_scale, row, col);
        } else {
            A x;
            if constexpr (Var::softcap) {
                const A t = APPROX ? tanh_approx(s * product_scale) : tanh(s * product_scale);
                x = bare ? t : A(var.cap) * A(LOG2E) * t;
            } else {
                x = bare ? s : s * product_scale;
            }
            if constexpr (key_term_in_u) x += key_base[ec] + A(8 * jj) * slope;
            if constexpr (Var::bias) x += to_acc(var.entry(row, col)) * A(LOG2E);
            return x;
        }
    }
    // shift of row row0 + d; -0.0 without one, which adding and subtracting fold away (x + -0.0 is x)
    __device__ __forceinline__ A shift(int d) const { return split_alibi ? row_base - slope * A(d) : -A(0); }
};

// Runs f(Bool<CHECK>(), v) for a tile of kind `kind` that is not skipped: CHECK false for an INTERIOR tile;
// otherwise true, with v the variant itself or, for an EDGE_UNMASKED tile, a copy that reads no bool-mask
// entry.
template <typename Var, typename F>
__device__ __forceinline__ void check_tile(TileKind kind, const Var& var, F&& f) {
    if (kind == INTERIOR) {
        f(Bool<false>(), var);
        return;
    }
    Var checked = var;
    if (Var::bool_mask && kind == EDGE_UNMASKED) checked.mask = nullptr;
    f(Bool<true>(), checked);
}

// A masked probability is stored as -0.0: it weighs nothing in any product, and the guarded products
// (mma.cuh, gemm_rn_guarded) read it as "this row must not see that key" when the key's data is not
// finite.
template <typename A> __device__ __forceinline__ A masked_zero();
template <> __device__ __forceinline__ float masked_zero<float>() { return -0.f; }
template <> __device__ __forceinline__ double masked_zero<double>() { return -0.0; }
__device__ __forceinline__ bool is_masked_zero(float x) { return __float_as_uint(x) == 0x80000000u; }
__device__ __forceinline__ bool is_masked_zero(double x) {
    return __double_as_longlong(x) == (long long)0x8000000000000000ULL;
}

// Marks the probabilities of a tile (mma / wgmma accumulator fragments: element e of tile j at row
// row0 + 8 (e / 2), column n0 + 8 j + 2 tq + e % 2) of the pairs `var` hides (Variant::hidden) as masked
// zeros, for a guarded product of probabilities computed unmarked (softmax_scores without MARK: +0.0 there).
// A score made -inf by the data stays +0.0, as in a tile without element checks. Out of line and rolled:
// only tiles whose hidden data is not finite take it.
template <int NT, typename Var>
__device__ __noinline__ void mark_hidden(const Var& var, float (&p)[NT][4], int row0, int n0, int tq) {
#pragma unroll 1
    for (int j = 0; j < NT; ++j)
#pragma unroll 1
        for (int e = 0; e < 4; ++e)
            if (var.hidden(row0 + 8 * (e / 2), n0 + 8 * j + 2 * tq + e % 2)) p[j][e] = masked_zero<float>();
}

// Renormalized recomputation (wide inputs: float32, float64). p = exp2(x - lse2) carries lse's rounding,
// |lse| eps, in every probability of the row, where naive attention's exp(x - max) / sum is exact for a
// one-hot row; at large logits that dominates the gradients' error. The rounding is one factor per row,
// so the dQ pass sums each row's recomputed probabilities and divides by the sum, and the dK/dV pass
// multiplies by the same factor. Only a sum within that rounding of 1 is divided out: an lse of more
// keys than these (a blockwise or ring backward) leaves the probabilities as recomputed. float64 rows with
// |lse2| <= RENORMALIZED_LSE2 are left alone too: their rounding, at most 32 unit roundoffs, lies 30 times
// below the fidelity floor (1e-13 of the largest gradient), and the backward then needs no sums for them.
// With a learnable sink (sink2, log2 units) the row holds the sink's probability 2^(sink2 - lse2) too, which
// carries the same rounding: the keys' sum and it are divided by their total. (Taking 1 - 2^(sink2 - lse2) as
// the keys' share would instead divide lse's rounding by that share where the sink takes most of the row.)
template <typename A> __device__ __forceinline__ A unit_roundoff();
template <> __device__ __forceinline__ float unit_roundoff<float>() { return 5.9604645e-8f; }
template <> __device__ __forceinline__ double unit_roundoff<double>() { return 1.1102230246251565e-16; }
template <typename A> __device__ __forceinline__ bool renormalizes_row(A lse2) {
    constexpr int RENORMALIZED_LSE2 = 32;
    return sizeof(A) != 8 || fabs(lse2) > A(RENORMALIZED_LSE2);
}
template <typename A> __device__ __forceinline__ A row_renormalizer(A sum, A lse2, A sink2) {
    const A tolerance = A(8) * unit_roundoff<A>() * (A(1) + fabs(lse2));
    const A total = sink2 == neg_inf<A>() ? sum : sum + exp2(sink2 - lse2);
    return renormalizes_row(lse2) && sum > A(0) && fabs(total - A(1)) <= tolerance ? A(1) / total : A(1);
}

// The recomputed probability of the (query i, key j) pair from its raw product s = q.k, before
// renormalization and dropout (-0.0 where masked), and the score transform's derivative dcap.
template <bool CHECK, bool APPROX, typename Var, typename A>
__device__ __forceinline__ A pair_probability(const Var& var, A s, A scale_log2, A lse2, int i, int j, A& dcap) {
    dcap = A(1);
    // A scaled product leaves its scale to the exponent's FMA, as the forward does (OnlineSoftmax::prob):
    // one rounding, of the difference from lse, where x = s scale would round every score by |x| eps.
    const A x = var.template score<CHECK, APPROX>(s, Var::scaled_product ? A(1) : scale_log2, i, j, dcap);
    const A exponent = Var::scaled_product ? fma(x, scale_log2, -lse2) : x - lse2;
    return CHECK && x == neg_inf<A>() ? masked_zero<A>() : fast_exp2(exponent);
}

// pair_probability on a 16-bit tile without element checks, whose exponent's other terms the caller has
// summed in `shift` (-lse2 and ALiBi's, AlibiShifts): one FMA from the product, or from softcap's tanh.
template <typename Var>
__device__ __forceinline__ float split_pair_probability(const Var& var, float s, float scale_log2, float shift,
                                                        float& dcap) {
    if constexpr (Var::softcap) {
        const float t = tanh_approx(s * (scale_log2 * float(LN2) / float(var.cap)));
        dcap = tanh_slope<true>(0.f, t);
        return fast_exp2(fma(t, float(var.cap) * float(LOG2E), shift));
    }
    dcap = 1.f;
    return fast_exp2(fma(s, scale_log2, shift));
}

// The gradients of one (query i, key j) pair from its probability pr before dropout and dcap
// (pair_probability) and the raw product dp = dout.v: the dropped probability pd (for dv) and the score
// gradients ds (for dbias) and dx = ds dcap (for dq, dk); returns pr, renormalized. row_scale: the row's
// renormalizer (1 where the dQ pass has not found it yet, and for 16-bit inputs). Masked pairs give -0.0
// everywhere.
template <bool CHECK, bool APPROX, typename Var, typename A>
__device__ __forceinline__ A pair_gradients(const Var& var, A pr, A dcap, A dp, A row_scale, A delta, bool keep, A& pd,
                                            A& ds, A& dx) {
    if (CHECK && is_masked_zero(pr)) {
        pd = ds = dx = pr;
        return pr;
    }
    if constexpr (!APPROX) pr *= row_scale;
    pd = pr;
    if constexpr (Var::dropout) {
        const A kept = keep ? A(var.dropout_scale) : A(0);
        pd *= kept;
        dp *= kept;
    }
    ds = pr * (dp - delta);
    dx = Var::softcap ? ds * dcap : ds;
    return pr;
}

// The per-element backward of one (query i, key j) pair from the raw products s = q.k and dp = dout.v
// (pair_probability, then pair_gradients).
template <bool CHECK, bool APPROX, typename Var, typename A>
__device__ __forceinline__ A pair_backward(const Var& var, A s, A dp, A scale_log2, A lse2, A row_scale, A delta,
                                           int i, int j, bool keep, A& pd, A& ds, A& dx) {
    A dcap;
    const A pr = pair_probability<CHECK, APPROX>(var, s, scale_log2, lse2, i, j, dcap);
    return pair_gradients<CHECK, APPROX>(var, pr, dcap, dp, row_scale, delta, keep, pd, ds, dx);
}

// ALiBi's exponent shifts of key_rows_backward's pairs on a 16-bit tile without element checks, where every
// key lies on one side of every row's diagonal (tile_kind): -slope |i + offset - j| = sign slope (key0 - i -
// offset) + sign slope 8 er for keys key0 + 8 er, a term per query (one FMA from the lane's base) plus one
// per key row (sign: + where the keys lie at or before the diagonals), instead of |i + offset - j| per pair.
template <typename Var> struct AlibiShifts {
    float query_step, base, key_step;
    __device__ __forceinline__ AlibiShifts(const Var& var, int m0, int key0, int tq) {
        const float sign = key0 <= m0 + var.offset ? 1.f : -1.f, slope = sign * var.slope * float(LOG2E);
        query_step = -slope;
        base = slope * float(key0 - m0 - var.offset - 2 * tq);
        key_step = 8.f * slope;
    }
    // -lse2 and the term of query column m0 + 8 j + 2 tq + ec (c = 8 j + ec), for key row key0
    __device__ __forceinline__ float query_shift(float lse2, int c) const { return fma(float(c), query_step, base) - lse2; }
};

// Dropout in the key-row layout, drawn once per warpgroup: its four warps hold the keys 64k ... 64k + 63 of
// the tile, whose bits come from the same Philox calls (a call gives 16 values of a 64-key group, four to
// each warp). Warp w draws the calls of the query column blocks j = w mod 4 and stores word k of each at
// words[(j * 4 + k) * 32 + lane], where lane is the lane that would draw it in key_rows_backward (each
// warp then reads 16 distinct words from distinct banks); sync() makes them visible to the warpgroup.
template <int MT, typename Var, typename Sync>
__device__ __forceinline__ void draw_group_words(const Var& var, unsigned* words, int m0, int key0, int warp, int lane,
                                                 Sync&& sync) {
    const int g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int j = warp; j < MT; j += 4) {
        unsigned r[4];
        var.random_words(m0 + j * 8 + 2 * tq + (g & 1), key0, r);
#pragma unroll
        for (int k = 0; k < 4; ++k) words[(j * 4 + k) * 32 + lane] = r[k];
    }
    sync();
}

// pair_backward on a tile whose rows are keys and columns queries (the kernels that hold dK and dV):
// st = s^T becomes pd^T, dpt = dp^T becomes dx^T. This lane holds keys key0 and key0 + 8, where
// key0 % 16 = lane / 4, and queries m0 + 8 j + 2 (lane % 4) + {0, 1}, whose lse (log2 units) and delta are
// lse2[q - m0] and delta[q - m0], and (wide inputs) renormalizer row_scale[q - m0] (null: none). With dropout the
// Philox words are drawn here or, with GROUPED, read from group_words (draw_group_words).
template <bool CHECK, bool APPROX, bool GROUPED = false, int MT, typename Var, typename A>
__device__ __forceinline__ void key_rows_backward(const Var& var, A (&st)[MT][4], A (&dpt)[MT][4], int m0, int key0,
                                                  int warp, int lane, A scale_log2, const A* lse2, const A* delta,
                                                  const A* row_scale, const unsigned* group_words = nullptr) {
    const int g = lane / 4, tq = lane % 4;
    constexpr bool SPLIT_ALIBI = APPROX && !CHECK && Var::alibi && !Var::bias;
    const AlibiShifts<Var> alibi(var, m0, key0, tq);
    // Dropout: the Philox call of query column (j, ec) covers keys key0 and key0 + 8 of this lane and of
    // its neighbour lane ^ 4 (key0 ^ 1), in bytes 2 er + key0 % 2 of its word (key0 % 64) / 16.
    const int word_index = (key0 & 63) >> 4;
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        unsigned words[2];  // of query columns ec = 0, 1
        if (Var::dropout) {
            if constexpr (GROUPED) {
#pragma unroll
                for (int ec = 0; ec < 2; ++ec)
                    words[ec] = group_words[(j * 4 + word_index) * 32 + ((lane & ~4) | (ec << 2))];
            } else {  // each of the pair draws one column, and they swap
                unsigned r[4];
                var.random_words(m0 + j * 8 + 2 * tq + (g & 1), key0, r);
                const unsigned mine = word_index == 0 ? r[0] : word_index == 1 ? r[1] : word_index == 2 ? r[2] : r[3];
                const unsigned theirs = __shfl_xor_sync(0xffffffffu, mine, 4);
                words[g & 1] = mine;
                words[(g & 1) ^ 1] = theirs;
            }
        }
#pragma unroll
        for (int ec = 0; ec < 2; ++ec) {
            const int im = j * 8 + 2 * tq + ec;
            const float query_shift = SPLIT_ALIBI ? alibi.query_shift(lse2[im], j * 8 + ec) : 0.f;
#pragma unroll
            for (int er = 0; er < 2; ++er) {
                const int e = 2 * er + ec, key = key0 + 8 * er;
                const bool kept = Var::dropout && dropout_byte(words[ec], er, g & 1) >= var.threshold;
                A pd, ds, dx;
                if constexpr (SPLIT_ALIBI) {
                    A dcap;
                    const A pr = split_pair_probability(var, st[j][e], scale_log2,
                                                        er == 0 ? query_shift : query_shift + alibi.key_step, dcap);
                    pair_gradients<CHECK, APPROX>(var, pr, dcap, dpt[j][e], A(1), delta[im], kept, pd, ds, dx);
                } else {
                    pair_backward<CHECK, APPROX>(var, st[j][e], dpt[j][e], scale_log2, lse2[im],
                                                 APPROX || !row_scale ? A(1) : row_scale[im],
                                                 delta[im], m0 + im, key, kept, pd, ds, dx);
                }
                st[j][e] = pd;
                dpt[j][e] = dx;
            }
        }
    }
}

// pair_backward on a tile whose rows are queries and columns keys (the kernels that hold dq): s becomes
// pd, dp becomes dx. This lane holds rows row0 and row0 + 8 (lse2[r] in log2 units, delta[r]) and keys
// n0 + 8 j + 2 tq + {0, 1}; n0 is a multiple of 64 when NT * 8 is. With a bias gradient (dbias not null:
// row i, key j at dbias[i * dbias_sq + j * dbias_sk]) each visible ds is added to it, before the row's
// renormalization (which only the end of the row finds). Wide inputs add this lane's share of each row's
// probabilities to row_sum[r].
template <bool CHECK, bool APPROX, int NT, typename Var, typename A>
__device__ __forceinline__ void query_rows_backward(const Var& var, A (&s)[NT][4], A (&dp)[NT][4], int row0, int n0,
                                                    int tq, A scale_log2, const A (&lse2)[2], const A (&delta)[2],
                                                    A* dbias, i64 dbias_sq, i64 dbias_sk, A* row_sum = nullptr) {
    constexpr int NG = NT < 8 ? NT : 8;  // 8-wide tiles per 64-column dropout group
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j0 = 0; j0 < NT; j0 += NG) {
            const int row = row0 + 8 * r;
            unsigned words[4];
            if (Var::dropout) var.random_words(row, n0 + j0 * 8 + 2 * tq, words);
#pragma unroll
            for (int j = j0; j < j0 + NG; ++j)
#pragma unroll
                for (int ec = 0; ec < 2; ++ec) {
                    const int e = 2 * r + ec, col = n0 + j * 8 + 2 * tq + ec;
                    const bool kept = Var::dropout && (NT % 8 == 0 ? var.keep_at(words, j - j0, ec) : var.keep(words, col));
                    A pd, ds, dx;
                    const A pr = pair_backward<CHECK, APPROX>(var, s[j][e], dp[j][e], scale_log2, lse2[r], A(1), delta[r],
                                                              row, col, kept, pd, ds, dx);
                    if constexpr (!APPROX) row_sum[r] += pr;
                    s[j][e] = pd;
                    dp[j][e] = dx;
                    if (Var::bias && dbias && row < var.seqlen_q && col < var.seqlen_k && !is_masked_zero(ds))
                        atomicAdd(dbias + row * dbias_sq + col * dbias_sk, ds);
                }
        }
}
