"""A small case of every kernel family, dtype and variant feature, for compute-sanitizer
(tools/gpu_validate.sh), in parts that each fit a device call under racecheck:

    python tools/sanitize_cases.py                  # every part
    python tools/sanitize_cases.py packed decode    # some

dense16, dense32: the tensor-core forward and backward (16-bit, and float32 on split operands, in the Hopper
family on a Hopper GPU; float64 on the mma.sync family), causal and not, with GQA and ragged tiles, vector and
element loads; every variant feature (window, softcap, ALiBi, bool mask, bias with its gradient, dropout), alone
and all together, and learnable sinks with their gradient, with NaN in masked keys so the guarded products run
too, and on sequences of several tiles.
packed: packed batches with empty sequences and NaN. decode: the split-KV decode kernel of
attention_with_kvcache on paged and contiguous caches, with its append, rotary embedding, cache_batch_idx and
cache_leftpad. wide: float32 in TF32 and float64 past its tensor-core head dimensions, with its wide heads' paired warps and its dq added by the dK/dV pass.
families: the mma.sync family (16-bit) and the CUDA-core kernels (float32, float64) forced. hopper_turns: the
Hopper backward's blocks each taking many key blocks in turn. dq_tiles: the Hopper backward's dq accumulator, each query tile's first
sum stored and the rest added: many key blocks at once on few query tiles, and whole query tiles no key
reaches, never written (that the conversion does not read them, test_fully_masked_rows checks on poisoned
scratch: initcheck leaves the conversion out, tools/gpu_validate.sh).
"""
import os
import sys

import cupy as cp
import ml_dtypes
import numpy as np

import cupyflash
from cupyflash import _cuda_backend

rng = np.random.default_rng(0)


def device(x):
    return cp.asarray(x.view(f"u{x.dtype.itemsize}")).view(x.dtype)


def run(dtype, headdim, sq=70, sk=90, poison=False, logits=1.0, deterministic=False, **variant):
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for shape in
                     [(1, sq, 4, headdim), (1, sk, 2, headdim), (1, sk, 2, headdim), (1, sq, 4, headdim)])
    q *= dtype(logits)
    if poison:  # data only rows that cannot see it would meet: the guarded products run
        k[:, -1], v[:, -1], q[:, 0], dout[:, 0] = np.nan, np.inf, np.nan, np.nan
    q, k, v, dout = (device(x) for x in (q, k, v, dout))
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **variant)
    want_dbias = variant.get("attn_mask") is not None and variant["attn_mask"].dtype != cp.bool_
    cupyflash.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, deterministic=deterministic,
                                 return_dsink=variant.get("learnable_sink") is not None, **variant)


def dense(dtypes):
    for dtype in dtypes:
        for headdim in (64, 59, 160):  # vector loads; element loads; column-sliced dK/dV for 16-bit
            for causal in (False, True):
                run(dtype, headdim, causal=causal)
            run(dtype, headdim, poison=True, causal=True)
        slopes = cp.asarray(rng.uniform(0.01, 0.5, 4).astype(np.float32))
        padding = cp.asarray(rng.random((1, 1, 1, 90)) > 0.2)
        blocks = cp.asarray(rng.random((1, 4, 70, 90)) > 0.5)  # every cell mixed
        tail = cp.asarray(np.arange(90) < 70).reshape(1, 1, 1, 90)  # visible, mixed and hidden cells
        bias = device(rng.standard_normal((1, 4, 70, 90)).astype(dtype))
        sink = device(np.array([2.0, -np.inf, 0.0, -5.0], np.float64 if dtype == np.float64 else np.float32))
        for variant in (dict(window_size=(20, 5)), dict(softcap=3.0), dict(alibi_slopes=slopes),
                        dict(learnable_sink=sink), dict(learnable_sink=sink, causal=True, window_size=(10, -1)),
                        dict(attn_mask=padding), dict(attn_mask=blocks), dict(attn_mask=tail, causal=True),
                        dict(attn_mask=bias), dict(dropout_p=0.3, dropout_seed=7),
                        dict(causal=True, window_size=(30, -1), softcap=5.0, alibi_slopes=slopes, attn_mask=bias,
                             dropout_p=0.1, dropout_seed=3)):
            run(dtype, 64, **variant)
        # Longer sequences, so that tiles lie inside the sequence: interior tiles (ALiBi's key term on the tensor
        # cores, its tile scores under softcap), bool-mask tiles the Hopper forward's producer classifies (with
        # NaN and inf in hidden rows), dropout on full tiles.
        wide_mask = cp.asarray(rng.random((1, 1, 300, 390)) > 0.3)
        hidden_tail = cp.asarray(np.arange(390) < 200).reshape(1, 1, 1, 390)  # whole key tiles hidden: no copies
        for variant in (dict(alibi_slopes=slopes), dict(alibi_slopes=slopes, softcap=3.0),
                        dict(attn_mask=wide_mask, causal=True),
                        dict(attn_mask=hidden_tail), dict(dropout_p=0.2, dropout_seed=5)):
            run(dtype, 64, sq=300, sk=390, poison="attn_mask" in variant, **variant)
        # bfloat16 softcapped scores at head tiles from 128: the Hopper forward's fixed shift
        # (_plan.sm90_bounded_scores)
        for causal in (False, True):
            run(dtype, 100, sq=300, sk=390, causal=causal, softcap=50.0)
        # and from _plan.SM90_BOUNDED_STAGES_FROM keys on, three K/V stages with one query buffer
        run(dtype, 100, sq=300, sk=2100, softcap=50.0)
        # From _plan.SM90_WIDE_KEY_TILE_FROM keys seen per row on, the Hopper forward at head tile 64 takes
        # 192-key tiles: here rows see 2101-2300 keys.
        for variant in (dict(), dict(causal=True), dict(window_size=(2100, 20))):
            run(dtype, 64, sq=200, sk=2300, **variant)


def run_packed(dtype, headdim, poison=True, cu_q=(0, 40, 40, 41, 170, 300), cu_k=(0, 45, 50, 50, 180, 260),
               longest=None, **variant):
    """A packed batch with empty sequences and (poison) one of NaN and inf, which its neighbours' tiles reach;
    `longest`: max_seqlen_q and max_seqlen_k given (the offsets stay on the device)."""
    cu_q, cu_k = np.array(cu_q, np.int32), np.array(cu_k, np.int32)
    q, dout = (rng.standard_normal((300, 4, headdim)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((260, 2, headdim)).astype(dtype) for _ in range(2))
    if poison:
        for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k), (dout, cu_q)):
            x[cu[3]:cu[4]] = np.nan
    q, k, v, dout = (device(x) for x in (q, k, v, dout))
    packed = dict(cu_seqlens_q=cp.asarray(cu_q), cu_seqlens_k=cp.asarray(cu_k), **variant)
    if longest is not None:
        packed.update(max_seqlen_q=longest[0], max_seqlen_k=longest[1])
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **packed)
    if longest is not None:  # every row of out and lse defined, whichever rows the offsets cover
        out, lse = device(rng.standard_normal(out.shape).astype(dtype)), cp.zeros_like(lse)
    cupyflash.attention_backward(dout, q, k, v, out, lse, return_dsink=variant.get("learnable_sink") is not None,
                                 **packed)


def packed():
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        for headdim in (64, 256):
            run_packed(dtype, headdim)
            run_packed(dtype, headdim, causal=True, dropout_p=0.2, dropout_seed=1)
        run_packed(dtype, 64, window_size=(20, 5), softcap=4.0, alibi_slopes=cp.asarray(
            rng.uniform(0.01, 0.5, (5, 4)).astype(np.float32)),
                   learnable_sink=cp.asarray(np.array([1.0, 0.0, -2.0, 3.0], np.float64 if dtype == np.float64 else np.float32)))
    # finite packed float32: the split-operand Hopper kernels (NaN takes the mma.sync ones)
    run_packed(np.float32, 128, poison=False, causal=True, dropout_p=0.2, dropout_seed=2)
    # offsets left on the device: as promised, and breaking every rule (clamped into the tensors by the kernels)
    for dtype in (ml_dtypes.bfloat16, np.float32, np.float64):
        run_packed(dtype, 64, poison=False, longest=(140, 140), causal=True)
        run_packed(dtype, 64, poison=False, cu_q=(5, 60, 20, 900, -7, 250), cu_k=(-3, 300, 100, 100, 2**30, 7),
                   longest=(100, 200), causal=True)


def paged_caches(dtype, page_size=32):
    """Keys and values in 12 pages (0 and 5 NaN, unused), and a page table of two sequences."""
    pages = rng.standard_normal((12, page_size, 2, 64)).astype(dtype)
    pages[[0, 5]] = np.nan
    return device(pages), device(pages[::-1].copy()), cp.asarray(np.array([[3, 7, 1, 2], [9, 4, 6, 8]], np.int32))


def decode():
    """Paged and contiguous caches with NaN past every length and in unused pages."""
    decode_slopes = cp.asarray(rng.uniform(0.01, 0.5, 8).astype(np.float32))
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32):
        k_pages, v_pages, table = paged_caches(dtype)
        q, k_new = (device(rng.standard_normal((2, n, h, 64)).astype(dtype)) for n, h in ((1, 8), (1, 2)))
        sinks = cp.asarray(rng.standard_normal(8).astype(np.float32))
        for variant in (dict(), dict(causal=True, window_size=(40, -1), softcap=5.0, alibi_slopes=decode_slopes),
                        dict(learnable_sink=sinks)):
            cupyflash.attention_with_kvcache(q, k_pages, v_pages, k_new, k_new, cache_seqlens=cp.asarray(
                np.array([100, 0], np.int32)), block_table=table, num_splits=3, **variant)
        contiguous = device(rng.standard_normal((2, 300, 2, 64)).astype(dtype))
        cupyflash.attention_with_kvcache(q, contiguous, contiguous.copy(), cache_seqlens=250)
        # keys from a left padding on (cache_leftpad), paged
        cupyflash.attention_with_kvcache(q, k_pages, v_pages, k_new, k_new, cache_seqlens=cp.asarray(
            np.array([100, 3], np.int32)), cache_leftpad=cp.asarray(np.array([37, 3], np.int32)), block_table=table,
            causal=True)
        # entries of a larger cache picked by cache_batch_idx, with an append
        entries = device(rng.standard_normal((5, 300, 2, 64)).astype(dtype))
        cupyflash.attention_with_kvcache(q, entries, entries.copy(), k_new, k_new, cache_seqlens=cp.asarray(
            np.array([120, 7], np.int32)), cache_batch_idx=cp.asarray(np.array([3, 0], np.int32)), causal=True)
        cupyflash.attention_with_kvcache(q, contiguous, contiguous.copy(), cache_seqlens=250, num_splits=3,
                                         return_lse=True)
        # several query positions: a key with NaN seen by some rows only (the guarded product); wide heads;
        # lengths and page table on the host
        for headdim in (128, 256):
            cache = rng.standard_normal((2, 300, 2, headdim)).astype(dtype)
            cache[:, 199] = np.nan
            q4 = device(rng.standard_normal((2, 4, 8, headdim)).astype(dtype))
            cupyflash.attention_with_kvcache(q4, device(cache), device(cache),
                                             cache_seqlens=np.array([200, 200], np.int32), causal=True)
        cupyflash.attention_with_kvcache(q, k_pages, v_pages, k_new, k_new, cache_seqlens=np.array([60, 3], np.int32),
                                         block_table=table.get())
        # more rows per kv head than a block takes: 40 rows in slabs (32 and 8 on tensor cores, 16, 16 and 8 in
        # float32), split and merged
        q10 = device(rng.standard_normal((2, 10, 8, 64)).astype(dtype))
        cupyflash.attention_with_kvcache(q10, k_pages, v_pages, k_new, k_new, cache_seqlens=cp.asarray(
            np.array([100, 0], np.int32)), block_table=table, causal=True, num_splits=3, learnable_sink=sinks)
        # the rotary embedding of k and q (by the append), interleaved and not, on part of the head
        angles = rng.uniform(0, 2 * np.pi, (128, 24))
        cos, sin = device(np.cos(angles).astype(dtype)), device(np.sin(angles).astype(dtype))
        for interleaved, variant in ((True, dict(causal=True)), (False, dict())):
            cupyflash.attention_with_kvcache(q, k_pages, v_pages, k_new, k_new, rotary_cos=cos, rotary_sin=sin,
                                             cache_seqlens=cp.asarray(np.array([100, 0], np.int32)), block_table=table,
                                             rotary_interleaved=interleaved, **variant)
    # past the decode kernels' rows, and float64: one packed pass of the dense forward over the caches' rows in
    # place (entries picked by cache_batch_idx, keys from a left padding on), and over pages of 32 and 64 rows read
    # through the page table (16-bit; from first keys at 0 and 64) or gathered (from a first key at 3; float32 and
    # float64 always)
    for dtype in (ml_dtypes.bfloat16, np.float32, np.float64):
        k_pages, v_pages, table = paged_caches(dtype)
        q_many, k_new = (device(rng.standard_normal((2, n, h, 64)).astype(dtype)) for n, h in ((300, 8), (1, 2)))
        cupyflash.attention_with_kvcache(q_many, k_pages, v_pages, k_new, k_new, cache_seqlens=cp.asarray(
            np.array([100, 0], np.int32)), block_table=table, causal=True)
        k_pages, v_pages, table = paged_caches(dtype, 64)
        for leftpad in (64, 3):
            cupyflash.attention_with_kvcache(q_many, k_pages, v_pages, cache_seqlens=cp.asarray(
                np.array([230, 9], np.int32)), cache_leftpad=cp.asarray(np.array([leftpad, 0], np.int32)),
                block_table=table, window_size=(150, 0))
        entries = rng.standard_normal((5, 400, 2, 64)).astype(dtype)
        entries[:, 360:] = np.nan
        cupyflash.attention_with_kvcache(q_many, device(entries), device(entries), k_new, k_new,
                                         cache_seqlens=cp.asarray(np.array([350, 7], np.int32)),
                                         cache_batch_idx=cp.asarray(np.array([3, 0], np.int32)),
                                         cache_leftpad=cp.asarray(np.array([10, 0], np.int32)), window_size=(100, 20))


def wide():
    """float32 in TF32 (CUPY_TF32=1), float64 past its tensor-core head dimensions, and float64's wide heads:
    warps in pairs in both backward kernels, every feature (the bias gradient from one warp of each pair);
    float64's dq added by the dK/dV pass after the rows' sums, and in a pass of its own."""
    os.environ[_cuda_backend.TF32_VARIABLE] = "1"
    for causal in (False, True):
        run(np.float32, 96, causal=causal)
    run(np.float32, 64, poison=True, causal=True, attn_mask=cp.asarray(rng.random((1, 4, 70, 90)) > 0.5))
    del os.environ[_cuda_backend.TF32_VARIABLE]
    run(np.float64, 192, causal=True)
    for headdim in (128, 100):
        run(np.float64, headdim, poison=True, causal=True)
    for headdim in (128, 64):  # dq from the dK/dV pass, the rows' sums (logits x30) or not; dQ's own pass
        run(np.float64, headdim, logits=30.0)
        run(np.float64, headdim, poison=True, causal=True, deterministic=True)
    slopes = cp.asarray(rng.uniform(0.01, 0.5, 4).astype(np.float32))
    bias = device(rng.standard_normal((1, 4, 70, 90)))
    run(np.float64, 128, causal=True, window_size=(30, -1), softcap=5.0, alibi_slopes=slopes, attn_mask=bias,
        dropout_p=0.1, dropout_seed=3)


def families():
    """On Hopper the 16-bit kernels take the sm_90a family and float32 and float64 tensor cores: the mma.sync
    family and the CUDA-core kernels, forced."""
    os.environ[_cuda_backend.FAMILY_VARIABLE] = "sm80"
    for dtype in (np.float16, ml_dtypes.bfloat16):
        for causal in (False, True):
            run(dtype, 64, causal=causal)
        run(dtype, 64, poison=True, causal=True, attn_mask=cp.asarray(rng.random((1, 4, 70, 90)) > 0.5))
        run_packed(dtype, 128, causal=True)
    os.environ[_cuda_backend.FAMILY_VARIABLE] = "simt"
    for dtype in (np.float32, np.float64):
        for causal in (False, True):
            run(dtype, 59, causal=causal)
        run(dtype, 64, poison=True, causal=True, attn_mask=cp.asarray(rng.random((1, 4, 70, 90)) > 0.5))
        run_packed(dtype, 64, causal=True, dropout_p=0.2, dropout_seed=1)
    del os.environ[_cuda_backend.FAMILY_VARIABLE]


def hopper_turns():
    """The Hopper backward's blocks taking key blocks in turn: two blocks in the grid, each through many key
    blocks, its ring of query tiles running on from one to the next."""
    multiprocessors = _cuda_backend._multiprocessors
    _cuda_backend._multiprocessors = lambda device_id: 2
    _cuda_backend._BACKWARD_CALLS.clear()
    mask = cp.asarray(rng.random((1, 1, 300, 390)) > 0.3)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32):
        for headdim in (64, 128, 256):
            run(dtype, headdim, sq=300, sk=390, causal=True)
        run(dtype, 64, sq=300, sk=390, poison=True, window_size=(60, 10))
        run(dtype, 64, sq=300, sk=390, attn_mask=mask, dropout_p=0.2, dropout_seed=4)
        run_packed(dtype, 64, causal=True)
    _cuda_backend._multiprocessors = multiprocessors
    _cuda_backend._BACKWARD_CALLS.clear()


def dq_tiles():
    """The Hopper backward's dq accumulator, its tiles' first sums stored: 100 queries under 4000 keys (every
    key block on the same few query tiles), and causal 300 x 100, whose first 200 rows see no key."""
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32):
        for headdim in (64, 128):
            run(dtype, headdim, sq=100, sk=4000)
            run(dtype, headdim, sq=300, sk=100, causal=True)
        run(dtype, 256 if dtype != np.float32 else 96, sq=300, sk=100, causal=True)


PARTS = {"dense16": lambda: dense((np.float16, ml_dtypes.bfloat16)), "dense32": lambda: dense((np.float32, np.float64)),
         "packed": packed, "decode": decode, "wide": wide, "families": families, "hopper_turns": hopper_turns,
         "dq_tiles": dq_tiles}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PARTS)
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        raise SystemExit(f"sanitize_cases.py: unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    for name in names:
        PARTS[name]()
    cp.cuda.Device().synchronize()
    print(f"sanitize cases: done ({', '.join(names)})")
