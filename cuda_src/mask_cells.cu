// A bool mask's cells, classified once per call before the attention kernels run: each cell of
// 2^cell_log2 queries x 2^cell_log2 keys of one (batch, head) slice of the mask is CELL_HIDDEN (every
// entry false), CELL_VISIBLE (every entry true) or CELL_MIXED. The kernels' tile classification
// (Variant::tile_kind) then reads a few of these bytes per tile instead of the tile's entries. Along an
// axis the mask broadcasts (stride 0) there is one cell, of one entry.
#include "mask.cuh"
#include "params.cuh"

// Grid: (cells of one slice, the mask's heads, the mask's batches); p.var holds the mask and the cells.
__global__ void __launch_bounds__(128) classify_mask_cells(const __grid_constant__ FwdParams p) {
    const VariantParams& v = p.var;
    const int cell = 1 << v.cell_log2;
    const int cells_k = v.mask_sk == 0 ? 1 : (p.seqlen_k + cell - 1) >> v.cell_log2;
    const int cq = blockIdx.x / cells_k, ck = blockIdx.x % cells_k;
    const int rows = v.mask_sq == 0 ? 1 : min(cell, p.seqlen_q - cq * cell);
    const int cols = v.mask_sk == 0 ? 1 : min(cell, p.seqlen_k - ck * cell);
    const unsigned char* mask = static_cast<const unsigned char*>(v.mask) + blockIdx.z * v.mask_sb +
                                blockIdx.y * v.mask_sh + (i64)cq * cell * v.mask_sq + (i64)ck * cell * v.mask_sk;
    bool on = false, off = false;
    for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
        const bool x = mask[(idx / cols) * v.mask_sq + (idx % cols) * v.mask_sk] != 0;
        on |= x;
        off |= !x;
    }
    on = __syncthreads_or(on);
    off = __syncthreads_or(off);
    if (threadIdx.x == 0)
        v.mask_cells[blockIdx.z * v.cells_sb + blockIdx.y * v.cells_sh + cq * v.cells_sq + ck * v.cells_sk] =
            on ? (off ? CELL_MIXED : CELL_VISIBLE) : CELL_HIDDEN;
}
