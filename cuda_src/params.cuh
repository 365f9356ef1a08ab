// One parameter struct per pass, passed by value. The host reads these declarations (and VariantParams of
// mask.cuh) into NumPy structured dtypes with the C layout (cupyflash/_csource.py), so members are declared
// only here, within what that reader takes: scalars, pointers, fixed arrays and structs of these files.
// tests/test_params.py checks every offset against the compilers' layout.
#pragma once
#include "common.cuh"
#include "mask.cuh"

// Element strides of a (batch, seqlen, heads, headdim) tensor whose last axis is contiguous.
struct Strides {
    i64 b, s, h;
};

// Which rows of a (batch, seqlen, heads, headdim) tensor hold NaN or inf: a byte per NONFINITE_ROWS rows of
// each head (nonfinite.cu), read by the tiles that hide some keys from some rows (mask.cuh, rows_nonfinite).
struct RowFlags {
    const void* x;
    Strides st;
    int seqlen, heads;
    unsigned char* flags;  // (batch, heads, ceil(seqlen / NONFINITE_ROWS))
};

// One launch of nonfinite.cu flags up to three tensors of one dtype and head dimension, one per grid row.
struct NonfiniteParams {
    RowFlags tensors[3];
    int batch, headdim;
};

struct FwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    void* lse;  // (batch, nheads, seqlen_q), accumulation type
    const unsigned char* v_nonfinite;  // rows of v holding NaN or inf (RowFlags), for variants that hide keys
                                       // (the Hopper family scans its tiles instead)
    Strides q_st, k_st, v_st, o_st;
    int seqlen_q, seqlen_k, headdim, nheads, group;  // group: query heads per kv head
    double scale;
    VariantParams var;
    // A packed batch (Variant::packed): sequence b holds rows cu_seqlens_q[b] ... cu_seqlens_q[b + 1] - 1 of
    // q (and keys likewise) in tensors of one batch entry (Sequence); seqlen_q and seqlen_k are the longest.
    // With seqused_k, its keys are the seqused_k[b] rows from cu_seqlens_k[b], which need not be in order (a
    // KV cache's rows in place, cupyflash/_kvcache.py).
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    const int* seqused_k;
    int total_q, total_k;  // rows of q and of k per batch entry (dense: seqlen_q, seqlen_k)
    i64 lse_sb, lse_sh;    // lse (and the backward's delta) of (b, h, row) at b * lse_sb + h * lse_sh + row
    // float32 on Hopper launches both the split-operand kernels (forward_sm90.cu, backward_sm90.cu) and the
    // mma.sync ones; *gate, set where an input holds NaN or inf (split.cu), lets those whose runs_on_nonfinite
    // matches it run. Null: the kernel runs.
    const int* gate;
    int runs_on_nonfinite;
};

// The learnable sinks' gradient (sink_grad.cu) from rows of dout and out, (batch, seqlen, heads, headdim), and
// their lse (accumulation type, at lse + b * lse_sb + h * lse_sh + row).
struct SinkGradParams {
    const void* dout;
    const void* out;
    Strides do_st, o_st;
    const void* lse;
    i64 lse_sb, lse_sh;
    const void* sink;  // accumulation type
    void* partial;     // (batch, nheads, blocks) sums, accumulation type
    void* dsink;       // (nheads,), accumulation type
    int seqlen, headdim, batch, blocks;
};

// Whether this launch's gate (FwdParams::gate) turns it off; the same for every thread of the grid.
__device__ __forceinline__ bool gated_off(const FwdParams& f) {
    return f.gate != nullptr && (*f.gate != 0) != (f.runs_on_nonfinite != 0);
}

// Sequence b of a pass: its lengths and where its rows start, at batch entry b of dense tensors, or at
// rows cu_seqlens[b] of packed ones (their one batch entry), lse and delta at columns cu_seqlens_q[b] of
// (nheads, total_q).
struct Sequence {
    int entry, seqlen_q, seqlen_k;
    i64 q0, k0;  // first query and key row
    // Row `row` of query head h (key head hk) of a (batch, seqlen, heads, headdim) tensor at x.
    template <typename T> __device__ T* query_rows(T* x, const Strides& st, int h, int row) const {
        return x + entry * st.b + h * st.h + (q0 + row) * st.s;
    }
    template <typename T> __device__ T* key_rows(T* x, const Strides& st, int hk, int row) const {
        return x + entry * st.b + hk * st.h + (k0 + row) * st.s;
    }
    __device__ i64 stat_row0(const FwdParams& f, int h) const { return entry * f.lse_sb + h * f.lse_sh + q0; }
    // Whether key (query) rows [row0, row0 + rows) hold NaN or inf, by RowFlags of tensors of total_k
    // (total_q) rows per batch entry.
    __device__ bool keys_nonfinite(const unsigned char* flags, const FwdParams& f, int hk, int row0, int rows) const {
        return rows_nonfinite(flags, f.total_k, f.nheads / f.group, entry, hk, int(k0) + row0, rows);
    }
    __device__ bool queries_nonfinite(const unsigned char* flags, const FwdParams& f, int h, int row0, int rows) const {
        return rows_nonfinite(flags, f.total_q, f.nheads, entry, h, int(q0) + row0, rows);
    }
};
// Where packed sequence b's rows start by offsets `cu` over `total` rows. The offsets' rules (from 0,
// non-decreasing, to the total; lengths up to the longest) are checked on the host where it reads them; offsets
// left on the device unread are clamped, so that whatever they hold keeps every access within the tensors.
__device__ __forceinline__ int packed_start(const int* cu, int b, int total) { return min(max(cu[b], 0), total); }
__device__ __forceinline__ int packed_length(const int* cu, int b, int start, int total, int longest) {
    return min(min(max(cu[b + 1], start), total) - start, longest);
}
template <bool PACKED>
__device__ __forceinline__ Sequence sequence(const FwdParams& f, int b) {
    if constexpr (PACKED) {
        const int q0 = packed_start(f.cu_seqlens_q, b, f.total_q), k0 = packed_start(f.cu_seqlens_k, b, f.total_k);
        const int keys = f.seqused_k ? min(max(f.seqused_k[b], 0), min(f.total_k - k0, f.seqlen_k))
                                     : packed_length(f.cu_seqlens_k, b, k0, f.total_k, f.seqlen_k);
        return {0, packed_length(f.cu_seqlens_q, b, q0, f.total_q, f.seqlen_q), keys, q0, k0};
    }
    return {b, f.seqlen_q, f.seqlen_k, 0, 0};
}
// Sequence b's variant of head h.
template <typename Var>
__device__ __forceinline__ Var variant_of(const FwdParams& f, const Sequence& s, int b, int h) {
    return Var(f.var, s.seqlen_q, s.seqlen_k, b, h);
}

// A tensor map (CUtensorMap) built on the host by cuTensorMapEncodeTiled (cupyflash/_tma.py).
struct __align__(64) TensorMap {
    unsigned long long words[16];
};

// The Hopper forward reads q, k and v through tensor maps of (headdim, seqlen, heads, batch) tensors.
struct FwdParamsSm90 {
    TensorMap tma_q, tma_k, tma_v;
    FwdParams fwd;
    // A packed batch: its sequences in the order their work tiles go, work[i] the first tile of the i-th
    // (query tiles x nheads of them, query tile fastest), work[batch] the count, work[batch + 1 + i] its index
    // in the batch, and work[2 * batch + 1] a counter of the tiles taken, zero at the launch (work_list.cu builds
    // it before each launch). Null when dense.
    int* work;
    int batch;
    int parts_apart;  // float32 (operands in three bfloat16 parts, split.cu): batch entries from a part to the next
    // A KV cache's pages read in place (cupyflash/_kvcache.py), or null. Packed sequence b's key at position
    // pos = k0 + n (Sequence; fwd.total_k counts the positions) is row block_table[b * table_stride + pos /
    // page_size] * page_size + pos % page_size of k and v, loaded in boxes of page_box rows (the tensor maps'),
    // each within one page: page_box is a power of two that divides page_size, the key tile and every k0.
    const int* block_table;
    int table_stride, page_size, page_box;
};

// float32 operands of the Hopper kernels as three bfloat16 parts (split.cu): element (b, s, h, c) of x into
// parts[((part * batch + b) * seqlen + s) * heads + h) * cols + c], zero in the columns past headdim.
struct SplitParams {
    const float* x;
    Strides st;
    int batch, seqlen, heads, headdim, cols;  // cols: headdim rounded up to 8 (16-byte rows for TMA)
    unsigned short* parts;
    int* nonfinite;  // set where x holds NaN or inf (FwdParams::gate)
};

// Split-KV decoding over a KV cache (decode.cu, decode_mma.cu) and its in-place append (decode.cu). fwd.k and
// fwd.v are the caches, their batch stride the page stride; fwd.seqlen_k is unused (each sequence has its own
// length). Sequence b holds (cache_seqlens ? cache_seqlens[b] : cache_seqlen) + seqlen_new rows once the new rows
// k_new, v_new (batch, seqlen_new, nheads_kv, headdim) are appended after its cached ones; its keys are those
// from row cache_leftpad[b] on (decode.cuh).
struct DecodeParams {
    FwdParams fwd;
    const int* cache_seqlens;  // (batch,) rows cached before the append, or nullptr: cache_seqlen for each
    const int* cache_leftpad;  // (batch,) the row of each sequence's first key, or nullptr: 0
    int cache_seqlen, seqlen_new;
    const void* k_new;
    const void* v_new;
    Strides kn_st, vn_st;
    // The rotary embedding (kvcache_append, with rotary_cos; nullptr: none): the first rotary_dim columns of the
    // appended keys and of fwd.q's rows, in pairs by the rows of cos and sin (seqlen_ro, rotary_dim / 2), columns
    // (2 i, 2 i + 1) when interleaved, else (i, i + rotary_dim / 2); key row j at position cache_seqlens[b] + j,
    // q's row s at cache_seqlens[b] + s * q_step, into q_rot (contiguous, q's shape).
    const void* rotary_cos;
    const void* rotary_sin;
    void* q_rot;
    int rotary_dim, rotary_interleaved, q_step;
    const int* block_table;  // (batch, table_stride) page ids; nullptr: sequence b is page b
    i64 table_stride;
    int page_size;           // rows per page (a contiguous cache: its length)
    int batch, num_splits, keys_per_split;  // split s of a sequence: keys [s * keys_per_split, ...) of its band
    float* part_out;         // (num_splits, batch, nheads, seqlen_q, headdim) per-split outputs, normalised
    float* part_lse;         // (num_splits, batch, nheads, seqlen_q), natural log
    unsigned* split_counters;  // (batch, nheads_kv), zeroed: splits of a (sequence, kv head) done so far
    // The caches as (headdim, page_size, nheads_kv, pages) tensors (cupyflash/_tma.py, boxes of a key tile's
    // rows by 64 columns): the Hopper decode's TMA loads; unused elsewhere.
    TensorMap tma_k, tma_v;
};

struct BwdParams {
    FwdParams fwd;  // q, k, v, out (read), lse, sizes, scale and the variant
    const void* dout;
    const unsigned char *q_nonfinite, *k_nonfinite, *do_nonfinite;  // RowFlags, for variants that hide keys (not
                                                                    // read by the Hopper family)
    void* delta;  // (batch, nheads, seqlen_q) = rowsum(dout * out), accumulation type
    void* row_scale;  // lse's layout: what the dQ pass renormalizes each row by (wide inputs; null for 16-bit)
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
    BwdParams bwd;       // bwd.delta (and for float32 bwd.row_scale, the rows' sums of probabilities): (batch,
                         // nheads, rows)
    float* lse_log2;     // (batch, nheads, rows): lse in log2 units
    float* dq_accum;     // (batch, nheads, rows, head_tile): dq / scale, summed in float32
    int rows, head_tile; // rows: seqlen_q rounded up to the query tile
    int batch, section;  // (batch, kv head) pairs per section of a bounded band's key blocks (key_block)
    int parts_apart;     // float32 (operands in bfloat16 parts, split.cu): batch entries from a part to the next
    int* key_blocks_taken;  // the persistent main kernels' count of key blocks taken, zeroed by the prepare kernel
    int* dq_tiles_written;  // (batch, nheads, rows / the main kernel's query tile): the sums each query tile of
                            // dq_accum took, and DQ_STORED once its first is stored (zeroed by the prepare kernel)
};
