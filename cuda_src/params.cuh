// One parameter struct per pass, passed by value. cupyflash/_cuda_backend.py mirrors each as a
// NumPy structured dtype with C alignment; tests/test_params.py checks every offset with NVRTC.
#pragma once
#include "common.cuh"

// What the variants of the score read (cuda_src/mask.cuh interprets it).
struct VariantParams {
    int window_left, window_right;  // -1: unbounded on that side (causal: right = 0)
    double softcap;                 // > 0 with the SOFTCAP feature
    double dropout_scale;           // 1 / (1 - dropout_p)
    unsigned dropout_threshold;     // keep a probability when its 8-bit random value is >= this
    unsigned seed_lo, seed_hi;      // Philox key
    int batch_offset;               // dropout draws the bits of batch index batch_offset + b
    const float* alibi;             // slope of (b, h) at alibi[b * alibi_sb + h * alibi_sh]
    i64 alibi_sb, alibi_sh;
    const void* mask;               // bool (1 byte) or float mask, broadcast by zero strides
    i64 mask_sb, mask_sh, mask_sq, mask_sk;
    unsigned char* mask_cells;      // a bool mask's CellKind per cell of 2^cell_log2 queries x keys (mask_cells.cu),
    i64 cells_sb, cells_sh, cells_sq, cells_sk;  // zero strides where the mask broadcasts
    int cell_log2;
    void* dbias;                    // backward: accumulation buffer of the bias gradient (zero strides where
    i64 dbias_sb, dbias_sh, dbias_sq, dbias_sk;  // the mask broadcasts), in the accumulation type
};

// Element strides of a (batch, seqlen, heads, headdim) tensor whose last axis is contiguous.
struct Strides {
    i64 b, s, h;
};

// Which rows of a (batch, seqlen, heads, headdim) tensor hold NaN or inf: a byte per 16 rows of each head
// (nonfinite.cu), read by the tiles that hide some keys from some rows (mask.cuh, rows_nonfinite).
struct RowFlags {
    const void* x;
    Strides st;
    int seqlen, heads;
    unsigned char* flags;  // (batch, heads, ceil(seqlen / 16))
};

// One launch of nonfinite.cu flags up to three tensors of one dtype and head dimension.
struct NonfiniteParams {
    RowFlags tensors[3];
    int count, batch, headdim;
};

struct FwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    void* lse;  // (batch, nheads, seqlen_q), accumulation type
    const unsigned char* v_nonfinite;  // rows of v holding NaN or inf (RowFlags), for variants that hide keys
    Strides q_st, k_st, v_st, o_st;
    int seqlen_q, seqlen_k, headdim, nheads, group;  // group: query heads per kv head
    double scale;
    VariantParams var;
};

// A tensor map (CUtensorMap) built on the host by cuTensorMapEncodeTiled (cupyflash/_tma.py).
struct __align__(64) TensorMap {
    unsigned long long words[16];
};

// The Hopper forward reads q, k and v through tensor maps of (headdim, seqlen, heads, batch) tensors.
struct FwdParamsSm90 {
    TensorMap tma_q, tma_k, tma_v;
    FwdParams fwd;
    int batch;
};

// Split-KV decoding over a KV cache (decode.cu). fwd.k and fwd.v are the caches, their batch stride the
// page stride; fwd.seqlen_k is unused (each sequence has its own length).
struct DecodeParams {
    FwdParams fwd;
    const int* seqlens_k;    // (batch,): keys of each sequence
    const int* block_table;  // (batch, table_stride) page ids; nullptr: sequence b is page b
    i64 table_stride;
    int page_size;           // rows per page (a contiguous cache: its length)
    int batch, num_splits, keys_per_split;  // split s of a sequence: keys [s * keys_per_split, ...)
    float* part_out;         // (num_splits, batch, nheads, seqlen_q, headdim) per-split outputs, normalised
    float* part_lse;         // (num_splits, batch, nheads, seqlen_q), natural log
};

struct BwdParams {
    FwdParams fwd;  // q, k, v, out (read), lse, sizes, scale and the variant
    const void* dout;
    const unsigned char *q_nonfinite, *k_nonfinite, *do_nonfinite;  // RowFlags, for variants that hide keys
    void* delta;  // (batch, nheads, seqlen_q) = rowsum(dout * out), accumulation type
    void* dq;
    void* dk;
    void* dv;
    Strides do_st, dq_st, dk_st, dv_st;
    int batch;
};

// The Hopper backward (backward_sm90.cu) reads q, k, v and dout through tensor maps and pads each head's
// rows to whole query tiles in its own buffers.
struct BwdParamsSm90 {
    TensorMap tma_q, tma_k, tma_v, tma_do;
    BwdParams bwd;       // bwd.delta: (batch, nheads, rows)
    float* lse_log2;     // (batch, nheads, rows): lse in log2 units
    float* dq_accum;     // (batch, nheads, rows, head_tile): dq / scale, summed in float32
    int rows, head_tile; // rows: seqlen_q rounded up to the query tile
};
