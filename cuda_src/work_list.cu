// The work list of a packed batch's Hopper forward (FwdParamsSm90::work), built on the device from the
// offsets where they lie, so that a call never reads them back: the sequences by their keys, longest first (a
// work tile's time grows with its keys, and the persistent blocks, which take the tiles as they free up,
// should end on short ones), the first work tile of each, and the counter of tiles taken, zeroed. It runs in
// the stream just before the forward, with the forward's parameters.
//
// One block: a counting sort of the sequences into KEY_BINS bins of key lengths (the order within a bin is
// the atomics', which moves no result: each work tile's output is its own), then a scan of their tiles.
#include "common.cuh"
#include "params.cuh"

constexpr int WORK_LIST_THREADS = 1024, KEY_BINS = 2048;

// The exclusive prefix sum of x over the block's threads; `total` gets the block's sum. Every thread calls it.
__device__ int block_exclusive_sum(int x, int* warp_sums, int& total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int inclusive = x;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += y;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int own = warp_sums[lane];
        int before = own;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const int y = __shfl_up_sync(0xffffffffu, before, d);
            if (lane >= d) before += y;
        }
        warp_sums[lane] = before - own;
        if (lane == 31) warp_sums[32] = before;
    }
    __syncthreads();
    const int result = warp_sums[warp] + inclusive - x;
    total = warp_sums[32];
    __syncthreads();  // warp_sums is the next call's
    return result;
}

template <int BLOCK_M>
__global__ void __launch_bounds__(WORK_LIST_THREADS) work_list(const __grid_constant__ FwdParamsSm90 p) {
    static_assert(KEY_BINS % WORK_LIST_THREADS == 0, "the bins are scanned a thread each in rounds");
    __shared__ int bin_next[KEY_BINS];  // a bin's count, then where its next sequence goes
    __shared__ int warp_sums[33];
    const FwdParams& f = p.fwd;
    const int keys_per_bin = f.seqlen_k / KEY_BINS + 1;  // seqlen_k: the longest sequence's keys
    auto bin_of = [&](int b) { return KEY_BINS - 1 - sequence<true>(f, b).seqlen_k / keys_per_bin; };  // 0: longest
    int* order = p.work + p.batch + 1;

    for (int i = threadIdx.x; i < KEY_BINS; i += WORK_LIST_THREADS) bin_next[i] = 0;
    __syncthreads();
    for (int b = threadIdx.x; b < p.batch; b += WORK_LIST_THREADS) atomicAdd(bin_next + bin_of(b), 1);
    __syncthreads();
    int placed = 0, total;
    for (int i = threadIdx.x; i < KEY_BINS; i += WORK_LIST_THREADS) {
        const int before = block_exclusive_sum(bin_next[i], warp_sums, total);
        bin_next[i] = placed + before;
        placed += total;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < p.batch; b += WORK_LIST_THREADS) order[atomicAdd(bin_next + bin_of(b), 1)] = b;
    __syncthreads();  // the block's writes to `order` are seen by all its threads past the barrier
    int tiles_before = 0;
    for (int i0 = 0; i0 < p.batch; i0 += WORK_LIST_THREADS) {
        const int i = i0 + threadIdx.x;
        const int tiles = i < p.batch ? (sequence<true>(f, order[i]).seqlen_q + BLOCK_M - 1) / BLOCK_M * f.nheads : 0;
        const int first = block_exclusive_sum(tiles, warp_sums, total);
        if (i < p.batch) p.work[i] = tiles_before + first;
        tiles_before += total;
    }
    if (threadIdx.x == 0) {
        p.work[p.batch] = tiles_before;
        p.work[2 * p.batch + 1] = 0;
    }
}
