// Hopper (sm_90a) primitives beside async_copy.cuh's mbarriers and copies: wgmma descriptors and fences,
// register reallocation and a vote among the consumer warpgroups. Every shared-memory tile the tensor cores read
// is stored as TMA writes it with 128-byte swizzle: chunks of 64 columns (128 bytes per row), 8-row
// atoms of 1024 bytes in which the 16-byte piece c of row r sits at c ^ (r % 8).
#pragma once
#include "async_copy.cuh"
#include "common.cuh"
#include "params.cuh"
#include "split.cuh"
#include "wgmma.cuh"

// Zeroes rows [first, ROWS) of a [CHUNKS][ROWS][64] tile as TMA writes it (the 128-byte swizzle moves 16-byte
// pieces within a row's 128 bytes), spread over THREADS threads (thread: this one's index among them), and
// fences the stores for the tensor cores; the caller then syncs the threads that read the tile. Rows past a
// packed sequence's end hold its neighbour's data, which no product of the sequence may meet. Eight threads
// take a row, THREADS / 8 rows at a time: a flat loop over the pieces divided by the row count, about 1600
// instructions a tile for the forward's V warp, cost the packed forward 3% (H100, d128).
template <typename T, int ROWS, int CHUNKS, int THREADS>
__device__ __forceinline__ void zero_rows(T* tile, int first, int thread) {
    static_assert(THREADS % 8 == 0, "eight threads a row");
    uint4* const pieces = reinterpret_cast<uint4*>(tile) + thread % 8;
#pragma unroll
    for (int chunk = 0; chunk < CHUNKS; ++chunk)
        for (int row = first + thread / 8; row < ROWS; row += THREADS / 8)
            pieces[(chunk * ROWS + row) * 8] = make_uint4(0u, 0u, 0u, 0u);
    fence_async_shared();
}

// Whether rows [0, rows) of a 16-bit [CHUNKS][ROWS][64] tile as TMA writes it hold NaN or inf (all exponent
// bits set), read by the 32 lanes of a warp; every lane gets the answer. A half of ~w & EXP is zero exactly
// where the exponent is all ones, and as the halves are below 0x8000, subtracting 1 from each sets a top
// bit only there.
template <typename T, int ROWS, int CHUNKS>
__device__ __forceinline__ bool rows_nonfinite(const T* tile, int rows, int lane) {
    constexpr unsigned EXP = Half16<T>::EXP * 0x10001u, ONES = 0x10001u;
    unsigned borrows = 0;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const uint4* pieces = reinterpret_cast<const uint4*>(tile + c * ROWS * 64);  // 8 pieces a row
#pragma unroll 8
        for (int i = lane; i < rows * 8; i += 32) {
            const uint4 w = pieces[i];
            borrows |= ((~w.x & EXP) - ONES) | ((~w.y & EXP) - ONES) | ((~w.z & EXP) - ONES) | ((~w.w & EXP) - ONES);
        }
    }
    return __any_sync(0xffffffffu, (borrows & 0x80008000u) != 0);
}

// This thread's warpgroup, as a value the compiler knows to be the same across the warp (lane 0's): what
// derives from it, an operand's descriptor among them, can then live in uniform registers.
__device__ __forceinline__ int warpgroup() { return __shfl_sync(0xffffffffu, threadIdx.x / 128, 0); }

// ---- register reallocation between warpgroups (needs a register cap at entry: __launch_bounds__(n, 1))
template <int REGS> __device__ __forceinline__ void regs_release() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REGS));
}
template <int REGS> __device__ __forceinline__ void regs_claim() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REGS));
}

// ---- wgmma
// Descriptor of a 128-byte-swizzled operand tile: start address, leading and stride byte offsets (16-byte
// units). A k16 step's descriptor is the tile's advanced by a constant (at): the start address field, the
// low 14 bits, does not carry for addresses in shared memory (< 2^18), so a step costs one add where
// forming it from its address took about ten instructions.
struct TileDesc {
    unsigned lo, hi;
    __device__ __forceinline__ TileDesc(const void* start, unsigned lead_bytes, unsigned stride_bytes)
        : lo(((smem_u32(start) & 0x3ffffu) >> 4) | ((lead_bytes >> 4) << 16)), hi((stride_bytes >> 4) | (1u << 30)) {}
    // the descriptor of the operand `bytes` further on
    __device__ __forceinline__ unsigned long long at(unsigned bytes) const {
        return (unsigned long long)hi << 32 | (lo + (bytes >> 4));
    }
};
// K-major tile (rows of 64 contiguous k in each 64-column chunk of `rows` rows): 8-row atoms 1024 bytes apart;
// k16 step kk lies in chunk kk / 4, 32 bytes further per step inside the atom (the swizzle is applied on the
// address).
__device__ __forceinline__ TileDesc k_major_desc(const void* tile) { return TileDesc(tile, 16, 1024); }
__host__ __device__ constexpr unsigned k_major_step(int kk, int rows) { return (kk / 4) * rows * 128 + (kk % 4) * 32; }
// N-major tile (k rows of 64 contiguous n per chunk, chunks `chunk_bytes` apart): two 8-row atoms per k16 step.
// An M-major A operand (k rows of 64 contiguous m) has the same descriptor.
__device__ __forceinline__ TileDesc n_major_desc(const void* tile, unsigned chunk_bytes) {
    return TileDesc(tile, chunk_bytes, 1024);
}
__host__ __device__ constexpr unsigned n_major_step(int kk) { return kk * 2048; }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Issues acc = A B^T over D_TILE columns (not waited for): A and B K-major, in chunks of 64 columns
// holding A_ROWS and B_ROWS rows; a and b point at the first row taken from chunk 0. N: B's rows taken.
// With PARTS > 1 the operands are in PARTS parts (split.cuh) a_part and b_part elements apart, and acc is
// the sum of the pairs' products.
template <typename T, int N, int D_TILE, int A_ROWS, int B_ROWS, int PARTS = 1>
__device__ __forceinline__ void wgmma_nt(float (&acc)[N / 2], const T* a, const T* b, int a_part = 0, int b_part = 0) {
    const TileDesc da = k_major_desc(a), db = k_major_desc(b);
#pragma unroll
    for (int pair = 0; pair < split_pairs(PARTS); ++pair)
#pragma unroll
        for (int kk = 0; kk < D_TILE / 16; ++kk)
            wgmma_ss<T, N>(acc, da.at(split_part_a(PARTS, pair) * a_part * sizeof(T) + k_major_step(kk, A_ROWS)),
                           db.at(split_part_b(PARTS, pair) * b_part * sizeof(T) + k_major_step(kk, B_ROWS)),
                           pair > 0 || kk > 0);
}

// Keeps the compiler from moving accesses of accumulator registers across an asynchronous product.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// And of values that must be computed before such a point (work placed under a product).
template <int N> __device__ __forceinline__ void fence_regs(unsigned (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// A tile read with rows and columns exchanged, and one read from column col0 on.
template <typename Tile> struct Transposed {
    Tile tile;
    __device__ __forceinline__ auto at(int row, int col) const { return tile.at(col, row); }
};
template <typename Tile> struct Shifted {
    Tile tile;
    int col0;
    __device__ __forceinline__ auto at(int row, int col) const { return tile.at(row, col0 + col); }
};
