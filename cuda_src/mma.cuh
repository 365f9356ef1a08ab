// Tensor-core and asynchronous-copy primitives (sm_80+): ldmatrix, mma.sync m16n8k16 with
// float32 accumulation for 16-bit data; m16n8k8 for 32- and 64-bit data (TF32, split TF32, float64);
// cp.async with zero fill.
#pragma once
#include "common.cuh"
#include "mask.cuh"

template <typename T> constexpr bool is_16bit() { return sizeof(T) == 2; }

// Accumulator element types, for overloads on one slab (A (&)[N][4]) that must not match MT slabs.
template <typename A> struct AccType {};
template <> struct AccType<float> { typedef int ok; };
template <> struct AccType<double> { typedef int ok; };

template <int MT, int N, typename A> __device__ __forceinline__ void zero(A (&acc)[MT][N][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < N; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = A(0);
}
template <int N, typename A, typename AccType<A>::ok = 0> __device__ __forceinline__ void zero(A (&acc)[N][4]) {
    zero(reinterpret_cast<A (&)[1][N][4]>(acc));
}

// Shared-memory row padding in elements: 16 bytes for 16-bit tiles (ldmatrix rows on distinct banks);
// 4 elements for 32- and 64-bit tiles, so that the fragment reads of the m16n8k8 products below
// (row g, column tq and row 2 tq, column g) fall on distinct banks.
template <typename T> constexpr int row_pad() { return is_16bit<T>() ? 8 : 4; }

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c += a b for a 16x16 (row-major) by 16x8 (column-major) tile.
template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma_16816<half_t>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<bfloat16_t>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to nearest into one 32-bit register, `lo` in the low half.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<half_t>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ unsigned pack2<bfloat16_t>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 16-byte asynchronous copy; when !valid nothing is read and the destination is zeroed.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
// 4- or 8-byte asynchronous copy of one value (through L1), zeroing the destination when !valid.
template <typename A> __device__ __forceinline__ void cp_async_value(A* dst, const A* src, bool valid) {
    static_assert(sizeof(A) == 4 || sizeof(A) == 8, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(smem_addr(dst)), "l"(src), "n"(sizeof(A)),
                 "r"(valid ? int(sizeof(A)) : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Copies rows [0, ROWS) x columns [0, D_TILE) of a tile into shared memory (row stride LD),
// zero-filling rows past `nrows` and columns past `headdim`. ALIGNED (base pointer and row stride
// multiples of 16 bytes, headdim of 8 elements) moves 16-byte chunks with cp.async, each thread one
// column chunk of every ROW_STEP-th row where the threads cover whole rows (so that a row's address
// is one add from the last); otherwise elements are copied one by one.
template <int ROWS, int D_TILE, int LD, int THREADS, bool ALIGNED, typename T>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, i64 row_stride, int nrows, int headdim) {
    constexpr int VEC = 16 / sizeof(T), CHUNKS = D_TILE / VEC, ROW_STEP = THREADS / CHUNKS;
    if constexpr (ALIGNED && THREADS % CHUNKS == 0 && ROWS % ROW_STEP == 0) {
        const int r0 = threadIdx.x / CHUNKS, d = threadIdx.x % CHUNKS * VEC;
        const bool column = d < headdim;
        const T* from = src + r0 * row_stride + d;
        T* to = dst + r0 * LD + d;
#pragma unroll
        for (int i = 0; i < ROWS / ROW_STEP; ++i, from += ROW_STEP * row_stride, to += ROW_STEP * LD) {
            const bool valid = column && r0 + i * ROW_STEP < nrows;
            cp_async_16(to, valid ? from : src, valid);
        }
    } else if (ALIGNED) {
        for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
            const int r = idx / CHUNKS, d = (idx % CHUNKS) * VEC;
            const bool valid = r < nrows && d < headdim;
            cp_async_16(dst + r * LD + d, valid ? src + (i64)r * row_stride + d : src, valid);
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * D_TILE; idx += THREADS) {
            const int r = idx / D_TILE, d = idx % D_TILE;
            T x{};
            if (r < nrows && d < headdim) x = src[(i64)r * row_stride + d];
            dst[r * LD + d] = x;
        }
    }
}

// One step of a double-buffered stream of key/value tiles: waits for tile t and synchronizes the block,
// then starts copying tile t + 1 into the other buffer, which every warp is done with once past the
// barrier: the step's one barrier. The caller reads buffer t & 1.
template <int BLOCK_N, int D_TILE, int LD, int THREADS, bool ALIGNED, typename T>
__device__ __forceinline__ void next_kv_tile(T* sK, T* sV, const T* k, const T* v, i64 k_ss, i64 v_ss, int t,
                                             int n_tiles, int seqlen_k, int headdim) {
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < n_tiles) {
        const int buf = (t + 1) & 1, n1 = (t + 1) * BLOCK_N;
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sK + buf * BLOCK_N * LD, k + (i64)n1 * k_ss, k_ss,
                                                               seqlen_k - n1, headdim);
        load_tile_async<BLOCK_N, D_TILE, LD, THREADS, ALIGNED>(sV + buf * BLOCK_N * LD, v + (i64)n1 * v_ss, v_ss,
                                                               seqlen_k - n1, headdim);
        cp_async_commit();
    }
}

// Warp-level products on MT slabs of 16 rows each, the building blocks of every tensor-core
// pass; every B fragment loaded from shared memory feeds all MT slabs. Accumulators use the
// mma C layout: acc[mt][j][0..1] is row 16 mt + g, columns 8j + 2tq + {0, 1}; acc[mt][j][2..3]
// is row 16 mt + g + 8 (g = lane / 4, tq = lane % 4). The two-dimensional overloads are one slab.

// A B operand in shared memory with rows padded to LD elements.
template <typename T, int ROW_STRIDE> struct PaddedTile {
    static constexpr int LD = ROW_STRIDE;
    const T* base;
    __device__ __forceinline__ const T* at(int row, int col) const { return base + row * LD + col; }
};

// B is a tile type with at(row, col), 8 columns contiguous from each multiple of 8 (PaddedTile, SwizzledTile).
template <typename T, int K, int N, int LD, int MT, typename TileB>
__device__ __forceinline__ void gemm_nt_16(float (&acc)[MT][N / 8][4], const T* sA, const TileB& b_tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], sA + (mt * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) {
            unsigned b[4];
            ldmatrix_x4(b, b_tile.at(nn * 16 + (lane / 16) * 8 + lane % 8, kk * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][2 * nn], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][2 * nn + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// P's C fragments of two adjacent 8-column tiles form the A fragment of a 16-deep step.
template <typename T, int K, int N, int MT, typename TileB>
__device__ __forceinline__ void gemm_rn_16(float (&acc)[MT][N / 8][4], const float (&p)[MT][K / 8][4],
                                           const TileB& b_tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
            a[mt][1] = pack2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
            a[mt][2] = pack2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
            a[mt][3] = pack2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) {
            unsigned b[4];
            ldmatrix_x4_trans(b, b_tile.at(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, nn * 16 + (lane / 16) * 8));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][2 * nn], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][2 * nn + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// ---- m16n8k8 products on 32- and 64-bit data. Fragments (g = lane / 4, tq = lane % 4): a holds A's
// (g, tq), (g + 8, tq), (g, tq + 4), (g + 8, tq + 4); b holds B's (tq, g), (tq + 4, g); c is the C layout
// below. Each operand element becomes PARTS registers: float64 one double; TF32 (tf32_t) one value
// rounded to TF32; exact float32 a TF32 head and the TF32 rounding of the rest (x = hi + lo within
// 2^-22 |x|), whose product is lo hi + hi lo + hi hi in three TF32 products (lo lo lies below float32's
// rounding), and the head once more where it is finite (WideMma<float>).
// The tensor cores truncate the float32 sums they add to (ROUNDED_SUMS): a long chain of truncations, o
// over every key tile or dk and dv over every query tile, would bias exact float32. Its products therefore
// sum in fresh accumulators over at most SUM_STEPS steps of 8, which join the running sums rounded to
// nearest.
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// float64: the m16n8k8 shape of sm_90; before it, four m8n8k4 products on the same fragments.
__device__ __forceinline__ void mma_f64(double (&c)[4], const double (&a)[4], double b0, double b1) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+d"(c[0]), "+d"(c[1]), "+d"(c[2]), "+d"(c[3])
                 : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b0), "d"(b1));
#else
#define CUPYFLASH_MMA_884(C0, C1, A, B) \
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};" \
                 : "+d"(C0), "+d"(C1) : "d"(A), "d"(B))
    CUPYFLASH_MMA_884(c[0], c[1], a[0], b0);
    CUPYFLASH_MMA_884(c[0], c[1], a[2], b1);
    CUPYFLASH_MMA_884(c[2], c[3], a[1], b0);
    CUPYFLASH_MMA_884(c[2], c[3], a[3], b1);
#undef CUPYFLASH_MMA_884
#endif
}

template <typename T> struct WideMma;
template <> struct WideMma<double> {
    static constexpr int PARTS = 1;
    static constexpr bool ROUNDED_SUMS = false;
    typedef double reg;
    template <int N> __device__ static void split(double x, reg (&r)[PARTS][N], int e) { r[0][e] = x; }
    __device__ static void mma(double (&c)[4], const reg (&a)[PARTS][4], const reg (&b)[PARTS][2]) {
        mma_f64(c, a[0], b[0][0], b[0][1]);
    }
};
template <> struct WideMma<tf32_t> {
    static constexpr int PARTS = 1;
    static constexpr bool ROUNDED_SUMS = false;
    typedef unsigned reg;
    template <int N> __device__ static void split(float x, reg (&r)[PARTS][N], int e) { r[0][e] = to_tf32(x); }
    __device__ static void mma(float (&c)[4], const reg (&a)[PARTS][4], const reg (&b)[PARTS][2]) {
        mma_tf32(c, a[0], b[0][0], b[0][1]);
    }
};
// hi, lo, and hi again where it is finite (0 for inf and NaN): the small products take that one, so that an
// infinity meets only the other operand's hi (inf x 0 would make NaN of inf x 1).
template <> struct WideMma<float> {
    static constexpr int PARTS = 3;
    static constexpr bool ROUNDED_SUMS = true;
    typedef unsigned reg;
    template <int N> __device__ static void split(float x, reg (&r)[PARTS][N], int e) {
        const float hi = __uint_as_float(to_tf32(x));
        const bool finite = is_finite(hi);
        r[0][e] = __float_as_uint(hi);
        r[1][e] = to_tf32(finite ? x - hi : 0.f);
        r[2][e] = finite ? r[0][e] : 0u;
    }
    __device__ static void mma(float (&c)[4], const reg (&a)[PARTS][4], const reg (&b)[PARTS][2]) {
        mma_tf32(c, a[1], b[2][0], b[2][1]);  // the small products first
        mma_tf32(c, a[2], b[1][0], b[1][1]);
        mma_tf32(c, a[0], b[0][0], b[0][1]);
    }
};
template <int MT, int N, typename A> __device__ __forceinline__ void add_to(A (&acc)[MT][N][4], A (&part)[MT][N][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < N; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[mt][j][e] += part[mt][j][e];
                part[mt][j][e] = A(0);
            }
}

// A's steps of 8 columns kk0 ... kk0 + STEPS - 1 against all of B, added to acc.
template <typename T, int K, int N, int LD, int MT, int STEPS, typename A>
__device__ __forceinline__ void gemm_nt_wide_steps(A (&acc)[MT][N / 8][4], const T* sA, const T* sB, int kk0,
                                                   int lane) {
    typedef WideMma<T> M;
    // the lane's element (g, tq) of each operand: every fragment read is then a constant offset from it
    const int lane_offset = lane / 4 * LD + lane % 4;
    const T* a_lane = sA + lane_offset;
    const T* b_lane = sB + lane_offset;
#pragma unroll
    for (int kk = kk0; kk < kk0 + STEPS; ++kk) {
        typename M::reg a[MT][M::PARTS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                M::split(to_acc(a_lane[(16 * mt + 8 * (e % 2)) * LD + 8 * kk + 4 * (e / 2)]), a[mt], e);
#pragma unroll
        for (int nn = 0; nn < N / 8; ++nn) {
            typename M::reg b[M::PARTS][2];
#pragma unroll
            for (int e = 0; e < 2; ++e) M::split(to_acc(b_lane[8 * nn * LD + 8 * kk + 4 * e]), b, e);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) M::mma(acc[mt][nn], a[mt], b);
        }
    }
}

template <typename T, int K, int N, int LD, int MT, typename A>
__device__ __forceinline__ void gemm_nt_wide(A (&acc)[MT][N / 8][4], const T* sA, const T* sB, int lane) {
    if constexpr (WideMma<T>::ROUNDED_SUMS) {
        constexpr int SUM_STEPS = 4, STEPS = K / 8 < SUM_STEPS ? K / 8 : SUM_STEPS;
        static_assert(K / 8 % STEPS == 0, "whole groups of steps");
        A part[MT][N / 8][4];
        zero(part);
#pragma unroll
        for (int kk0 = 0; kk0 < K / 8; kk0 += STEPS) {
            gemm_nt_wide_steps<T, K, N, LD, MT, STEPS>(part, sA, sB, kk0, lane);
            add_to(acc, part);
        }
    } else {
        gemm_nt_wide_steps<T, K, N, LD, MT, K / 8>(acc, sA, sB, 0, lane);
    }
}

// The A fragment comes from P's C fragments without shuffles by reordering each 8-deep step: the lane's
// columns 2 tq and 2 tq + 1 of P play the fragment's k = tq and tq + 4, so B is read at rows 2 tq and 2 tq + 1.
// SPREAD_ROWS (8-byte elements) swaps the two where tq >= 2 (each k's lanes share one tq, so each tq may
// choose): a half-warp's loads then take rows 0, 2, 5, 7 (and 1, 3, 4, 6), which rows of D + 4 elements put
// in four different quarters of the banks, where rows 0, 2, 4, 6 meet in two. The backward's products
// ask for it; the forward's, whose A operand has just been computed, measured slower with it.
// With ROUNDED_SUMS each 8-column tile of the result sums over all of K in a fresh accumulator.
template <typename T, int K, int N, int LD, int MT, bool FINITE_PART = false, bool SPREAD_ROWS = false, typename A>
__device__ __forceinline__ void gemm_rn_wide(A (&acc)[MT][N / 8][4], const A (&p)[MT][K / 8][4], const T* sB,
                                             int lane) {
    typedef WideMma<T> M;
    const int g = lane / 4, tq = lane % 4, swap = SPREAD_ROWS && sizeof(T) == 8 ? tq >> 1 : 0;
    // the rows of B that fragment k = tq and k = tq + 4 read
    const T* b_rows[2] = {sB + (2 * tq + swap) * LD + g, sB + (2 * tq + (swap ^ 1)) * LD + g};
    typename M::reg a[K / 8][MT][M::PARTS][4];
#pragma unroll
    for (int kk = 0; kk < K / 8; ++kk)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const A even = p[mt][kk][(e % 2) * 2], odd = p[mt][kk][(e % 2) * 2 + 1];
                M::split(e / 2 != swap ? odd : even, a[kk][mt], e);
            }
#pragma unroll
    for (int nn = 0; nn < N / 8; ++nn) {
        A part[MT][4] = {};
#pragma unroll
        for (int kk = 0; kk < K / 8; ++kk) {
            typename M::reg b[M::PARTS][2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const A x = to_acc(b_rows[e][8 * kk * LD + 8 * nn]);
                M::split(FINITE_PART && !is_finite(x) ? A(0) : x, b, e);  // FINITE_PART: NaN and inf as 0
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) M::mma(M::ROUNDED_SUMS ? part[mt] : acc[mt][nn], a[kk][mt], b);
        }
        if constexpr (M::ROUNDED_SUMS) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nn][e] += part[mt][e];
        }
    }
}

// acc[MT][N/8] += A (16 MT x K) * B (N x K)^T, both row-major in shared memory, row stride LD.
template <typename T, int K, int N, int LD, int MT, typename A>
__device__ __forceinline__ void gemm_nt(A (&acc)[MT][N / 8][4], const T* sA, const T* sB, int lane) {
    if constexpr (is_16bit<T>()) gemm_nt_16<T, K, N, LD>(acc, sA, PaddedTile<T, LD>{sB}, lane);
    else gemm_nt_wide<T, K, N, LD>(acc, sA, sB, lane);
}
template <typename T, int K, int N, int LD, typename A, typename AccType<A>::ok = 0>
__device__ __forceinline__ void gemm_nt(A (&acc)[N / 8][4], const T* sA, const T* sB, int lane) {
    gemm_nt<T, K, N, LD>(reinterpret_cast<A (&)[1][N / 8][4]>(acc), sA, sB, lane);
}

// acc[MT][N/8] += P (16 MT x K) * B (K x N): P is an accumulator tile in registers (rounded to the
// products' input precision here), B row-major in shared memory with row stride LD. SPREAD_ROWS: see
// gemm_rn_wide.
template <typename T, int K, int N, int LD, bool SPREAD_ROWS = false, int MT, typename A>
__device__ __forceinline__ void gemm_rn(A (&acc)[MT][N / 8][4], const A (&p)[MT][K / 8][4], const T* sB, int lane) {
    if constexpr (is_16bit<T>()) gemm_rn_16<T, K, N>(acc, p, PaddedTile<T, LD>{sB}, lane);
    else gemm_rn_wide<T, K, N, LD, MT, false, SPREAD_ROWS>(acc, p, sB, lane);
}
template <typename T, int K, int N, int LD, bool SPREAD_ROWS = false, typename A, typename AccType<A>::ok = 0>
__device__ __forceinline__ void gemm_rn(A (&acc)[N / 8][4], const A (&p)[K / 8][4], const T* sB, int lane) {
    gemm_rn<T, K, N, LD, SPREAD_ROWS>(reinterpret_cast<A (&)[1][N / 8][4]>(acc),
                                      reinterpret_cast<const A (&)[1][K / 8][4]>(p), sB, lane);
}

// ---- Guarded products, for tiles where some rows must not see some keys (masked probabilities are
// -0.0, mask.cuh) and the streamed tile holds NaN or inf. The finite part of B runs through the usual
// product; each non-finite entry reaches exactly the rows whose A entry is not -0.0, through two
// bfloat16 products of 2^100 x 2^100 that overflow float32 to +inf / -inf (NaN reaches both, and
// inf - inf = NaN).

template <typename T> __device__ __forceinline__ bool nonfinite16(unsigned h) {
    return (h & Half16<T>::EXP) == Half16<T>::EXP;
}

// Per 16-bit half of a B fragment register: the value if finite, else 0; and the bfloat16 codes
// +2^100 (for NaN and +inf) and -2^100 (for NaN and -inf).
template <typename T> __device__ __forceinline__ unsigned finite_part(unsigned x) {
    const unsigned lo = x & 0xffffu, hi = x >> 16;
    return (nonfinite16<T>(lo) ? 0u : lo) | ((nonfinite16<T>(hi) ? 0u : hi) << 16);
}
template <typename T> __device__ __forceinline__ unsigned inf_code(unsigned h, bool negative) {
    const unsigned EXP = Half16<T>::EXP, SIGN = 0x8000u;
    if (!nonfinite16<T>(h)) return 0u;
    const bool nan = (h & ~(EXP | SIGN)) != 0u;
    return nan || ((h & SIGN) != 0u) == negative ? (negative ? 0xf180u : 0x7180u) : 0u;
}
template <typename T> __device__ __forceinline__ unsigned inf_codes(unsigned x, bool negative) {
    return inf_code<T>(x & 0xffffu, negative) | (inf_code<T>(x >> 16, negative) << 16);
}
// bfloat16 pair of 2^100 where the A entry is not a masked zero.
__device__ __forceinline__ unsigned seen_pair(float lo, float hi) {
    return (is_masked_zero(lo) ? 0u : 0x7180u) | ((is_masked_zero(hi) ? 0u : 0x7180u) << 16);
}


// gemm_rn where non-finite entries of B (a tile type with at(row, col), 8 columns contiguous from
// each multiple of 8) reach only the rows that see them. Out of line, so that its registers do not
// burden the common path; gemm_rn_guarded passes it copies.
template <typename T, int K, int N, int MT, typename Tile>
__device__ __noinline__ void gemm_rn_guarded_body(float (&acc)[MT][N / 8][4], const float (&p)[MT][K / 8][4],
                                                  const Tile b_tile, int lane) {
#pragma unroll 1
    for (int kk = 0; kk < K / 16; ++kk) {  // rolled loops: acc and p stay in local memory, few registers
        unsigned a[MT][4], seen[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float* pr = p[mt][2 * kk + r / 2] + 2 * (r % 2);
                a[mt][r] = pack2<T>(pr[0], pr[1]);
                seen[mt][r] = seen_pair(pr[0], pr[1]);
            }
#pragma unroll 1
        for (int nn = 0; nn < N / 16; ++nn) {
            unsigned b[4], fin[4], pos[4], neg[4];
            ldmatrix_x4_trans(b, b_tile.at(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, nn * 16 + (lane / 16) * 8));
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                fin[r] = finite_part<T>(b[r]);
                pos[r] = inf_codes<T>(b[r], false);
                neg[r] = inf_codes<T>(b[r], true);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    // The infinities land in fresh accumulators and meet in float32 adds: an mma adds
                    // its products to c before rounding, so it would never see inf - inf.
                    float(&c)[4] = acc[mt][2 * nn + half];
                    float up[4] = {0.f, 0.f, 0.f, 0.f}, down[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_16816<T>(c, a[mt], fin[2 * half], fin[2 * half + 1]);
                    mma_16816<bfloat16_t>(up, seen[mt], pos[2 * half], pos[2 * half + 1]);
                    mma_16816<bfloat16_t>(down, seen[mt], neg[2 * half], neg[2 * half + 1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) c[e] = c[e] + up[e] + down[e];
                }
        }
    }
}
// The same on 32- and 64-bit data: the finite part of B on tensor cores, as gemm_rn computes it; then each
// NaN or inf of B, on CUDA cores, reaches the rows whose P entry (brought to the quad's lanes by a shuffle)
// is not a masked zero.
template <typename T, int K, int N, int LD, int MT, typename A>
__device__ __noinline__ void gemm_rn_guarded_wide_body(A (&acc)[MT][N / 8][4], const A (&p)[MT][K / 8][4],
                                                       const T* sB, int lane) {
    gemm_rn_wide<T, K, N, LD, MT, true>(acc, p, sB, lane);
    const int quad = lane & ~3, tq = lane % 4;
#pragma unroll 1
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll 1
        for (int k = 0; k < K; ++k) {
            const int owner = quad | ((k % 8) / 2);
            const A p_g = __shfl_sync(0xffffffffu, p[mt][k / 8][k % 2], owner);       // row g
            const A p_g8 = __shfl_sync(0xffffffffu, p[mt][k / 8][2 + k % 2], owner);  // row g + 8
#pragma unroll 1
            for (int j = 0; j < N / 8; ++j)
#pragma unroll
                for (int ec = 0; ec < 2; ++ec) {
                    const A b = to_acc(sB[k * LD + 8 * j + 2 * tq + ec]);
                    if (is_finite(b)) continue;
                    if (!is_masked_zero(p_g)) acc[mt][j][ec] += p_g * b;
                    if (!is_masked_zero(p_g8)) acc[mt][j][2 + ec] += p_g8 * b;
                }
        }
}

// The operands go through local memory on this rare path only: acc and p stay in registers elsewhere.
template <typename T, int K, int N, int MT, typename Tile, typename A>
__device__ __forceinline__ void gemm_rn_guarded(A (&acc)[MT][N / 8][4], const A (&p)[MT][K / 8][4],
                                                const Tile& b_tile, int lane) {
    A acc_copy[MT][N / 8][4], p_copy[MT][K / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_copy[mt][j][e] = acc[mt][j][e];
#pragma unroll
        for (int j = 0; j < K / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) p_copy[mt][j][e] = p[mt][j][e];
    }
    if constexpr (is_16bit<T>()) gemm_rn_guarded_body<T, K, N, MT, Tile>(acc_copy, p_copy, b_tile, lane);
    else gemm_rn_guarded_wide_body<T, K, N, Tile::LD, MT>(acc_copy, p_copy, b_tile.base, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = acc_copy[mt][j][e];
}
template <typename T, int K, int N, typename Tile, typename A, typename AccType<A>::ok = 0>
__device__ __forceinline__ void gemm_rn_guarded(A (&acc)[N / 8][4], const A (&p)[K / 8][4], const Tile& b_tile,
                                                int lane) {
    gemm_rn_guarded<T, K, N, 1, Tile>(reinterpret_cast<A (&)[1][N / 8][4]>(acc),
                                      reinterpret_cast<const A (&)[1][K / 8][4]>(p), b_tile, lane);
}

// A as packed 16-bit pairs (a[i] holds accumulator elements 2 i and 2 i + 1: the A registers of wgmma_rs)
// in the float layout of the products above.
template <typename T, int K>
__device__ __forceinline__ void unpack_pairs(const unsigned (&a)[K / 4], float (&p)[K / 8][4]) {
#pragma unroll
    for (int i = 0; i < K / 4; ++i) {
        T lo, hi;
        lo.bits = a[i] & 0xffffu;
        hi.bits = a[i] >> 16;
        p[i / 2][2 * (i % 2)] = to_acc(lo);
        p[i / 2][2 * (i % 2) + 1] = to_acc(hi);
    }
}
// gemm_rn_guarded with A as packed 16-bit pairs, for callers whose float tile is no longer live.
template <typename T, int K, int N, typename Tile>
__device__ __forceinline__ void gemm_rn_guarded(float (&acc)[N / 8][4], const unsigned (&a)[K / 4], const Tile& b_tile,
                                                int lane) {
    float p[K / 8][4];
    unpack_pairs<T, K>(a, p);
    gemm_rn_guarded<T, K, N>(acc, p, b_tile, lane);
}
// And with A computed unmarked (softmax_scores without MARK): the entries `var` hides (rows row0 + g and
// + 8, columns n0 + 8 j + 2 tq + {0, 1}) are marked first (mark_hidden).
template <typename T, int K, int N, typename Tile, typename Var>
__device__ __forceinline__ void gemm_rn_guarded(float (&acc)[N / 8][4], const unsigned (&a)[K / 4], const Tile& b_tile,
                                                const Var& var, int row0, int n0, int lane) {
    float p[K / 8][4];
    unpack_pairs<T, K>(a, p);
    mark_hidden<K / 8>(var, p, row0, n0, lane % 4);
    gemm_rn_guarded<T, K, N>(acc, p, b_tile, lane);
}

// The guarded product on CUDA cores, for operands that are both in shared memory (tile types with
// at(row, col)): acc (this warp's 16 rows row0 + g and + 8 of N columns, the mma C layout) += A B over K,
// where an A entry that is a masked zero keeps its B row out of the sum even when that row holds NaN or
// inf. Out of line and rolled: only tiles where hidden data is not finite take it.
template <int K, int N, typename ATile, typename BTile>
__device__ __noinline__ void gemm_guarded_smem_body(float (&acc)[N / 8][4], const ATile a, const BTile b, int row0,
                                                    int lane) {
#pragma unroll 1
    for (int j = 0; j < N / 8; ++j)
#pragma unroll 1
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + lane / 4 + 8 * (e / 2), col = 8 * j + 2 * (lane % 4) + e % 2;
            float sum = 0.f;
#pragma unroll 1
            for (int k = 0; k < K; ++k) {
                const float x = to_acc(*a.at(row, k));
                if (!is_masked_zero(x)) sum += x * to_acc(*b.at(k, col));
            }
            acc[j][e] += sum;
        }
}
template <int K, int N, typename ATile, typename BTile>
__device__ __forceinline__ void gemm_guarded_smem(float (&acc)[N / 8][4], const ATile& a, const BTile& b, int row0,
                                                  int lane) {
    float copy[N / 8][4];  // through local memory on this rare path only
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) copy[j][e] = acc[j][e];
    gemm_guarded_smem_body<K, N>(copy, a, b, row0, lane);
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = copy[j][e];
}

// Two adjacent output values at `at`, of which `room` (at least 1) lie inside the row: one 4-byte store
// for 16-bit outputs where `aligned` says the address allows it.
template <typename T, typename A>
__device__ __forceinline__ void store_pair(T* at, A lo, A hi, bool aligned, int room) {
    if constexpr (is_16bit<T>()) {
        if (aligned && room > 1) {
            *reinterpret_cast<unsigned*>(at) = pack2<T>(lo, hi);
            return;
        }
    }
    at[0] = from_acc<T>(lo);
    if (room > 1) at[1] = from_acc<T>(hi);
}

// Writes MT accumulator slabs of 16 x (8 N) to rows row0 + 16 mt + g (+ 8) of a row-major
// output (row stride `stride`), each row times its own factor scale[mt][0] / scale[mt][1],
// skipping rows >= nrows and columns >= ncols.
template <typename T, int MT, int N, typename A>
__device__ __forceinline__ void store_slab(T* dst, i64 stride, const A (&acc)[MT][N][4], const A (&scale)[MT][2],
                                           int row0, int nrows, int ncols, int lane) {
    const int g = lane / 4, tq = lane % 4;
    const bool aligned = reinterpret_cast<unsigned long long>(dst) % 4 == 0 && stride % 2 == 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + 16 * mt + g + 8 * r;
            if (row >= nrows) continue;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const int col = j * 8 + 2 * tq;
                if (col < ncols)
                    store_pair(dst + (i64)row * stride + col, acc[mt][j][2 * r] * scale[mt][r],
                               acc[mt][j][2 * r + 1] * scale[mt][r], aligned, ncols - col);
            }
        }
}
// store_slab of 16-bit values without a branch: a predicated store per pair of columns (PAIRS: rows
// 4-byte aligned, ncols even) or per value. Where a loop issues wgmma from uniform registers (the Hopper
// forward stores a finished work tile inside its key-tile loop), a branch that some lanes take would move
// the loop's descriptors out of them.
template <bool PAIRS, typename T, int MT, int N>
__device__ __forceinline__ void store_slab_predicated(T* dst, i64 stride, const float (&acc)[MT][N][4],
                                                      const float (&scale)[MT][2], int row0, int nrows, int ncols,
                                                      int lane) {
    static_assert(is_16bit<T>(), "16-bit values");
    const int g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + 16 * mt + g + 8 * r;
            T* at = dst + (i64)row * stride + 2 * tq;
            const int room = row < nrows ? ncols - 2 * tq : 0;  // column 8 j + 2 tq + e is stored if 8 j + e < room
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float lo = acc[mt][j][2 * r] * scale[mt][r], hi = acc[mt][j][2 * r + 1] * scale[mt][r];
                if constexpr (PAIRS) {
                    asm volatile("{ .reg .pred q; setp.gt.s32 q, %1, %0; @q st.global.b32 [%2], %3; }"
                                 ::"r"(8 * j), "r"(room), "l"(at + 8 * j), "r"(pack2<T>(lo, hi)) : "memory");
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        asm volatile("{ .reg .pred q; setp.gt.s32 q, %1, %0; @q st.global.b16 [%2], %3; }"
                                     ::"r"(8 * j + e), "r"(room), "l"(at + 8 * j + e), "h"(from_acc<T>(e ? hi : lo).bits)
                                     : "memory");
                }
            }
        }
}
template <typename T, int N, typename A, typename AccType<A>::ok = 0>
__device__ __forceinline__ void store_slab(T* dst, i64 stride, const A (&acc)[N][4], const A (&scale)[2], int row0,
                                           int nrows, int ncols, int lane) {
    store_slab(dst, stride, reinterpret_cast<const A (&)[1][N][4]>(acc), reinterpret_cast<const A (&)[1][2]>(scale),
               row0, nrows, ncols, lane);
}
