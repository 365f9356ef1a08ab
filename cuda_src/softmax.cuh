// Online softmax shared by the forward kernels. Scores arrive in log2 units (the softmax
// scale times log2(e) folded in), so every exponential is one exp2.
#pragma once
#include "common.cuh"
#include "mask.cuh"

// Running statistics of one query row: m is the running max, l this thread's share of the
// running sum (the lanes of a row are summed once, at the end). With SLACK > 0, m moves only for a tile
// whose max passes it by more than SLACK (log2 units): probabilities up to 2^SLACK, which the float32 sum
// and a 16-bit p hold as exactly, and alpha = 1 for most tiles, whose accumulator rescale is then skipped.
template <typename A, int SLACK = 0> struct OnlineSoftmax {
    A m, l, m_use;

    __device__ OnlineSoftmax() : m(neg_inf<A>()), l(A(0)), m_use(A(0)) {}
    // A fixed shift for bounded scores (bounded_shift): m never moves.
    __device__ explicit OnlineSoftmax(A shift) : m(shift), l(A(0)), m_use(shift) {}

    // Folds in a tile whose row max (already reduced over the row's lanes) is tile_max and
    // returns alpha = exp2(m_old - m_new), the factor that rescales the accumulator.
    __device__ __forceinline__ A rescale(A tile_max) {
        if (SLACK > 0 && !(tile_max > m + A(SLACK))) return A(1);  // -inf, NaN and a close max keep m
        const A m_new = fmax(m, tile_max);
        // A row that has seen only masked keys keeps m = -inf; exp2(-inf - 0) = 0, never NaN.
        m_use = m_new == neg_inf<A>() ? A(0) : m_new;
        const A alpha = fast_exp2(m - m_use);
        m = m_new;
        l *= alpha;
        return alpha;
    }

    // Probability of score u * exp_scale + shift, in one FMA (TileScores, mask.cuh). CHECK (tiles where
    // elements may be masked): a -inf score gives -0.0, see mask.cuh.
    template <bool CHECK> __device__ __forceinline__ A prob(A s, A exp_scale = A(1), A shift = A(0)) const {
        const A pr = fast_exp2(fma(s, exp_scale, shift - m_use));
        return CHECK && s == neg_inf<A>() ? masked_zero<A>() : pr;
    }

    // The row's end from its total sum l_row (its lanes summed): the factor of o's row, 1 / l (0 for a row
    // that saw no key, NaN for a NaN row), and the natural-log lse: -inf for a row that saw no key (or only
    // -inf scores), +inf for a row with a +inf score, NaN for a row with a NaN score. A learnable sink (its
    // logit in log2 units, sink_log2; -inf: none) adds 2^sink to the sum and nothing to o: a row that saw no
    // key keeps o 0 and has lse sink.
    struct End { A o_factor, lse; };
    __device__ __forceinline__ End end(A l_row, A sink = neg_inf<A>()) const {
        const bool keys = l_row != A(0);
        A shift = m == neg_inf<A>() ? A(0) : m, o_factor = A(1);  // l_row sums 2^(u - shift)
        if (sink != neg_inf<A>() && m != -neg_inf<A>()) {
            const A joint = fmax(shift, sink);  // a NaN sink leaves shift, and makes the sum NaN
            o_factor = fast_exp2(shift - joint);
            l_row = l_row * o_factor + fast_exp2(sink - joint);
            shift = joint;
        }
        const bool seen = l_row > A(0), none = l_row == A(0);  // neither: NaN
        return {seen && keys ? o_factor / l_row : none || !keys ? A(0) : l_row,
                m == -neg_inf<A>() ? m : seen ? (shift + fast_log2(l_row)) * A(LN2) : none ? neg_inf<A>() : l_row};
    }
};

// Scores bounded by +-c (log2 units: a softcap's cap times log2(e)) need no running max: the fixed shift
// m = c - k keeps every probability 2^(u - m) within [2^(k - 2c), 2^k], normal in float32 and bfloat16 (not
// float16) where 2c - k <= 120, and the sums of many keys finite where k <= 100: c up to BOUNDED_LIMIT. A
// tile then takes no max, and o no rescale. The softmax does not depend on the shift.
[[maybe_unused]] constexpr int BOUNDED_LIMIT = 110;  // read by the plan, which picks the kernels
template <typename A> __device__ __forceinline__ A bounded_shift(A c) { return c - fmax(A(0), A(2) * c - A(120)); }

// The dropout words of softmax_tile: one Philox call per row and 64-column group of the key tile (row
// row0 + 16 mt + 8 r, column n0 + 64 gi + 2 tq). TileWords draws them all at once, issued after the tile's
// product (the Hopper kernel: ptxas places the draws among the tile's exponentials, after the product's wait);
// WordsOnDemand draws each where softmax_tile needs it, which keeps fewer registers live (the mma.sync kernel).
template <int MT, int NT> struct TileWords {
    static constexpr int GROUPS = (NT + 7) / 8;
    unsigned w[MT][2][GROUPS][4];

    template <typename Var> __device__ __forceinline__ void draw(const Var& var, int row0, int n0, int tq) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int gi = 0; gi < GROUPS; ++gi) var.random_words(row0 + 16 * mt + 8 * r, n0 + 64 * gi + 2 * tq, w[mt][r][gi]);
    }
    template <typename Var>
    __device__ __forceinline__ void get(const Var&, int mt, int r, int gi, int, int, unsigned (&out)[4]) const {
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = w[mt][r][gi][k];
    }
};

struct WordsOnDemand {
    template <typename Var>
    __device__ __forceinline__ void get(const Var& var, int, int, int, int row, int col, unsigned (&out)[4]) const {
        var.random_words(row, col, out);
    }
};

// Dropout on a tile's probabilities (softmax_scores' fragments): the dropped ones are multiplied by zero, so
// that a masked zero (-0.0) stays one for the guarded products.
template <int MT, int NT, typename Var, typename Words, typename A>
__device__ __forceinline__ void drop_scores(const Var& var, A (&s)[MT][NT][4], int row0, int n0, int tq,
                                            const Words& words) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int gi = 0; gi < (NT + 7) / 8; ++gi) {
                unsigned w[4];
                words.get(var, mt, r, gi, row0 + 16 * mt + 8 * r, n0 + 64 * gi + 2 * tq, w);
#pragma unroll
                for (int j = 8 * gi; j < NT && j < 8 * gi + 8; ++j)
#pragma unroll
                    for (int ec = 0; ec < 2; ++ec) {
                        // tiles start at multiples of 64 columns unless they are narrower
                        const bool kept = NT % 8 == 0 ? var.keep_at(w, j % 8, ec) : var.keep(w, n0 + 8 * j + 2 * tq + ec);
                        if (!kept) s[mt][j][2 * r + ec] *= A(0);
                    }
            }
}

// Dropout on one slab's probabilities packed in pairs as wgmma's A operand (p[2 j + r]: row r, columns
// 8 j + 2 tq + {0, 1}): for tiles that start at multiples of 64 columns. The keep masks of the pairs are made
// from the tile's words, four pairs a byte compare, as soon as the words are drawn (make), so that ptxas places
// them among the exponentials and only the masks' ANDs follow the packing (apply). The probabilities are
// unmarked (softmax_scores without MARK): a dropped one becomes +0.0, as a hidden one is until a guarded
// product marks it (mark_hidden).
template <int NT> struct PackedKeep {
    unsigned halves[2 * NT];

    template <typename Var> __device__ __forceinline__ void make(const Var& var, const TileWords<1, NT>& words) {
        static_assert(NT % 8 == 0, "64-column groups");
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) halves[2 * j + r] = var.keep_halves(words.w[0][r][j / 8][(j % 8) / 2], j % 8);
    }
    __device__ __forceinline__ void apply(unsigned (&p)[2 * NT]) const {
#pragma unroll
        for (int i = 0; i < 2 * NT; ++i) p[i] &= halves[i];
    }
};

// One key tile of the tensor-core forward kernels, on mma / wgmma accumulator fragments: MT slabs of
// 16 rows (rows row0 + 16 mt + g and + 8), NT 8-column tiles of scores starting at column n0 (element e
// of tile j is column n0 + 8 j + 2 tq + e % 2). Scores (TileScores, mask.cuh) become probabilities in
// place, the row statistics absorb the tile, and alpha receives the factors that rescale each row's
// accumulator (rescale_rows), which may be in flight in a product meanwhile. With DROP (and dropout) the
// probabilities that `words` (TileWords or WordsOnDemand) drop become zero (drop_scores); the kept ones are
// scaled by 1 / (1 - p) at the end, with 1 / l. A caller that packs the probabilities drops them packed
// instead (PackedKeep). CHECK: element masks (tiles the variant classifies as EDGE); APPROX: 16-bit
// inputs (see Variant::score); MARK: masked probabilities as masked zeros (-0.0), else +0.0, for a caller
// that marks them itself on the rare path that reads the marks (mark_hidden): the mark costs a checked
// tile a compare and a select per element. KEY_TERM_IN_PRODUCT: s holds ALiBi's key term (TileScores).
// BOUNDED: the scores are bounded and stats hold a fixed shift (bounded_shift): alpha is 1.
template <bool CHECK, bool APPROX, bool DROP = true, bool MARK = true, bool KEY_TERM_IN_PRODUCT = false,
          bool BOUNDED = false, int MT, int NT, typename Var, typename Words, typename A, int SLACK>
__device__ __forceinline__ void softmax_scores(const Var& var, A (&s)[MT][NT][4], OnlineSoftmax<A, SLACK> (&stats)[MT][2],
                                               A (&alpha)[MT][2], int row0, int n0, int tq, A scale_log2,
                                               const Words& words) {
    const TileScores<CHECK, APPROX, Var, A, KEY_TERM_IN_PRODUCT> scores(var, row0, n0, tq, scale_log2);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        A tile_max[2] = {neg_inf<A>(), neg_inf<A>()};
        constexpr bool ENTRIES = CHECK && Var::bool_mask;
        struct NoEntries { __device__ bool at(int, int, int) const { return true; } };
        const auto entries = [&] {
            if constexpr (ENTRIES) return MaskEntries<NT>(var, row0 + 16 * mt, n0, tq);
            else return NoEntries{};
        }();
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + 16 * mt + (e / 2) * 8, col = n0 + j * 8 + 2 * tq + (e % 2);
                s[mt][j][e] = scores.u(var, s[mt][j][e], row, col, j, e % 2, entries.at(e / 2, j, e % 2));
                if constexpr (!BOUNDED) tile_max[e / 2] = fmax(tile_max[e / 2], s[mt][j][e]);
            }
        A shift[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            shift[r] = scores.shift(16 * mt + 8 * r);
            if constexpr (BOUNDED) alpha[mt][r] = A(1);
            else alpha[mt][r] = stats[mt][r].rescale(reduce_max<4>(tile_max[r]) * scores.exp_scale + shift[r]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[mt][j][e] = stats[mt][e / 2].template prob<CHECK && MARK>(s[mt][j][e], scores.exp_scale, shift[e / 2]);
                stats[mt][e / 2].l += s[mt][j][e];
            }
    }
    if constexpr (Var::dropout && DROP) drop_scores(var, s, row0, n0, tq, words);
}

// o rows times alpha (DT 8-column tiles per slab).
template <int MT, int DT, typename A>
__device__ __forceinline__ void rescale_rows(A (&o)[MT][DT][4], const A (&alpha)[MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < DT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][j][e] *= alpha[mt][e / 2];
}

// softmax_scores, then o rescaled: for kernels whose o is not in flight.
template <bool CHECK, bool APPROX, int MT, int NT, int DT, typename Var, typename Words, typename A>
__device__ __forceinline__ void softmax_tile(const Var& var, A (&s)[MT][NT][4], A (&o)[MT][DT][4],
                                             OnlineSoftmax<A> (&stats)[MT][2], int row0, int n0, int tq, A scale_log2,
                                             const Words& words) {
    A alpha[MT][2];
    softmax_scores<CHECK, APPROX>(var, s, stats, alpha, row0, n0, tq, scale_log2, words);
    rescale_rows(o, alpha);
}
