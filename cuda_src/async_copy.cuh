// Asynchronous copies of sm_90 (Hopper): mbarriers, TMA tensor copies, 1-D bulk copies and reductions, and
// the fence between ordinary shared-memory accesses and those copies. The Hopper family (sm90.cuh) and the
// decode kernel's TMA loads (decode_mma.cu) use them.
#pragma once
#include "common.cuh"
#include "params.cuh"

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---- mbarriers
__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Waits until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int parity) {
    asm volatile(
        "{\n .reg .pred done;\n"
        "wait_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra wait_%=;\n}" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
}

// ---- TMA: the box of a (headdim, seqlen, heads, batch) tensor (its shape in the map, cupyflash/_tma.py) at
// the given coordinates; out-of-range elements arrive as zeros and still count toward the barrier's bytes.
__device__ __forceinline__ void tma_load(void* dst, const TensorMap& map, int col, int row, int head, int batch,
                                         unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];" ::"r"(smem_u32(dst)),
        "l"(&map), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(smem_u32(bar))
        : "memory");
}

// 1-D bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) completing on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

// Adds `bytes` of float32 from shared memory to global memory (a bulk reduction), and waits until the
// reductions this thread issued have read their source / completed.
__device__ __forceinline__ void bulk_reduce_add(float* dst, const float* src, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst),
                 "r"(smem_u32(src)), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Stores `bytes` from shared memory to global memory (a bulk copy).
__device__ __forceinline__ void bulk_store(void* dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_u32(src)),
                 "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Orders this thread's global-memory accesses of the async proxy (bulk copies, reductions) with its ordinary
// ones: a flag released after a completed bulk store, or read before a bulk reduction, speaks for the data.
__device__ __forceinline__ void fence_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }
__device__ __forceinline__ void release_or(int* flag, int bits) {
    asm volatile("red.release.gpu.global.or.b32 [%0], %1;" ::"l"(flag), "r"(bits) : "memory");
}
__device__ __forceinline__ int load_acquire(const int* flag) {
    int x;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(x) : "l"(flag) : "memory");
    return x;
}

// Orders this thread's ordinary shared-memory accesses before the async proxy's that follow (the tensor
// cores' reads, TMA writes).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Shared-memory address of element (row, col) of a 128-byte-swizzled tile of `rows` rows per chunk.
template <typename T> __device__ __forceinline__ const T* swizzled(const T* tile, int rows, int row, int col) {
    const char* chunk = reinterpret_cast<const char*>(tile) + (col / 64) * rows * 128 + row * 128;
    return reinterpret_cast<const T*>(chunk + ((((col % 64) / 8) ^ (row % 8)) * 16) + (col % 8) * sizeof(T));
}

// A B operand for mma.cuh's guarded product: a swizzled tile of ROWS rows per 64-column chunk.
template <typename T, int ROWS> struct SwizzledTile {
    const T* base;
    __device__ __forceinline__ const T* at(int row, int col) const { return swizzled(base, ROWS, row, col); }
};
