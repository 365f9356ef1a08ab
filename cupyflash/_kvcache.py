"""Attention of new queries over a KV cache, the new keys and values appended to it in place.

The cache is contiguous, ``(batch, seqlen_cache, nheads_kv, headdim)``, or paged,
``(num_blocks, page_size, nheads_kv, headdim)`` with a ``block_table`` (batch, max_blocks_per_seq)
whose row b lists the pages of sequence b in order. Inside, a contiguous cache is a paged one
whose page b is all of sequence b (page ``cache_batch_idx[b]`` with that argument), so appending and
reading have one code path.

Sequence b holds ``L_b = cache_seqlens[b] + seqlen_new`` keys once k, v are appended (less its
``cache_leftpad`` rows). On the GPU the
append is one kernel, and calls with at most ``_plan.DECODE_MAX_ROWS`` query rows per kv head (the
group's heads times seqlen_q; 1024 for 16-bit caches, 128 for float32) take the split-KV decode kernels
(``cuda_src/decode_mma.cu`` for 16-bit caches, ``cuda_src/decode.cu`` for float32), which read the pages
in place and run every sequence, slab of its rows and split in one launch; both read each length on the
device. Otherwise (and on the NumPy backend) the sequences run as one packed batch
(:mod:`cupyflash._varlen`: one pass of the dense forward on the GPU, each sequence alone on the NumPy
backend) whose keys are rows of the cache itself, each sequence's from where they start (``Spec.seqused_k``);
where a sequence's keys span several pages, the pages read through the page table (``Spec.block_table``: the
Hopper forward of 16-bit caches, and its NumPy twin, where boxes of ``_plan.PAGE_BOX_ROWS`` rows divide the pages
and first keys), else the pages gathered in order.

With ``rotary_cos`` and ``rotary_sin`` the new keys are rotated by their positions before the append,
and the queries before they attend (by the append's kernel; on the NumPy backend, ``_rotate``).

A decoding loop checks its arguments' shapes, dtypes and scalars once per signature, and the values
of CuPy lengths and page tables at each call; NumPy ones and ints join the check's signature by their
contents, so that a token's layers, which share them, are checked once and a NumPy page table is copied to
the device once.
"""
from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _plan, _validate, _varlen
from ._api import _backend
from ._spec import Spec
from ._validate import _fail, array_kind, compute_dtype

__all__ = ["attention_with_kvcache", "check_call"]

Array = Any  # numpy.ndarray or cupy.ndarray

_Q_WORDS = "(batch, seqlen_q, nheads, headdim)"
_NEW_WORDS = "(batch, seqlen_new, nheads_kv, headdim)"
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_CACHE_WORDS = {False: "(batch, seqlen_cache, nheads_kv, headdim)",
                True: "(num_blocks, page_size, nheads_kv, headdim) with block_table"}


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """A validated call. ``spec`` holds what every sequence shares (its seqlen_k is the longest
    L_b); ``pages`` (host int64, (batch, pages per sequence)) lists each sequence's cache pages
    of ``page_size`` rows; ``cache_seqlens`` (host int64, (batch,)) the rows cached before the append,
    ``uniform`` that length when every sequence has it (else None); ``leftpad`` (host int64, (batch,)) the
    row of each sequence's first key. ``device_tables`` keeps the device copy of a NumPy page table by device id
    (_device_table)."""
    spec: Spec
    seqlen_new: int
    page_size: int
    pages: np.ndarray
    cache_seqlens: np.ndarray
    uniform: Optional[int]
    leftpad: np.ndarray
    num_splits: int
    rotary_interleaved: bool
    device_tables: dict = dataclasses.field(default_factory=dict)

    @property
    def lengths(self):
        """L_b of every sequence: the keys it attends to (host int64, (batch,))."""
        return self.cache_seqlens + self.seqlen_new - self.leftpad


def _check_rank(fn, name, x, words):
    if x.ndim != 4:
        _fail(ValueError, fn, name, f"must have 4 dimensions {words}",
              f"{x.ndim} dimensions with shape {tuple(x.shape)}")


def _check_int_array(fn, name, x, ndim, batch, words):
    """An int32 array of ``ndim`` dimensions whose first is ``batch``."""
    if np.dtype(x.dtype) != np.int32:
        _fail(TypeError, fn, f"{name}.dtype", "must be int32", _validate._dtype_name(x.dtype))
    if x.ndim != ndim or x.shape[0] != batch:
        _fail(ValueError, fn, f"{name}.shape", f"must be {words}", tuple(x.shape))


def _host_ints(arrays, one_copy):
    """Host int64 copies of int32 arrays (None stays None). With ``one_copy``, CuPy arrays (all on
    one device) come back in a single device-to-host copy: one synchronisation, not one each."""
    given = [x for x in arrays if x is not None]
    on_device = [x for x in given if array_kind(x) == "cupy"]
    if one_copy and len(on_device) > 1:
        import cupy

        with on_device[0].device:
            flat = cupy.concatenate([x.ravel() for x in on_device]).get()
        parts = np.split(flat, np.cumsum([x.size for x in on_device])[:-1])
        read = {id(x): part.reshape(x.shape) for x, part in zip(on_device, parts)}
    else:
        read = {id(x): x.get() for x in on_device}
    return [None if x is None else np.asarray(read.get(id(x), x)).astype(np.int64) for x in arrays]


class _Form(typing.NamedTuple):
    """What a call's arrays' kinds, shapes and dtypes and its scalars say (_check_form): ``spec`` with the
    cache's capacity for seqlen_k, and what the lengths and the page table are checked against."""
    spec: Spec
    seqlens_is_int: bool
    seqlen_new: int
    page_size: int
    capacity: int
    capacity_words: str
    num_blocks: int  # 0: contiguous, one page a sequence in order
    table_name: Optional[str]  # the argument that names each sequence's pages: block_table, cache_batch_idx
    num_splits: int
    rotary_interleaved: bool  # with rotary_cos and rotary_sin
    specs: dict  # spec by its seqlen_k (the longest L_b), the same object for the later calls of a loop


def check_call(fn, q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
               cache_batch_idx=None, cache_leftpad=None, block_table=None, causal=False, scale=None,
               window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, learnable_sink=None,
               num_splits=0, writes=True, mixed_ok=False):
    """Validate a call of :func:`attention_with_kvcache`; return its :class:`Call`.

    Everything is checked before anything is written. ``cache_seqlens``, ``cache_leftpad`` and
    ``block_table`` (or ``cache_batch_idx``) are read to the host (CuPy ones in one copy, a device
    synchronisation); they may be NumPy arrays whatever the other arrays are. ``writes=False`` (the
    reference, which writes nothing) does not ask for writeable caches; ``mixed_ok`` allows NumPy and CuPy
    arrays together.
    """
    form = _check_form(fn, q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                       cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                       block_table=block_table, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                       rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes,
                       learnable_sink=learnable_sink, num_splits=num_splits, writes=writes, mixed_ok=mixed_ok)
    return _check_values(fn, form, cache_seqlens, cache_leftpad, _table(block_table, cache_batch_idx),
                         one_copy=not mixed_ok)


def _table(block_table, cache_batch_idx):
    """The argument that names each sequence's pages (at most one is given)."""
    return block_table if cache_batch_idx is None else cache_batch_idx


def _check_form(fn, q, k_cache, v_cache, k, v, *, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                block_table, causal, scale, window_size, softcap, rotary_interleaved, alibi_slopes, learnable_sink,
                num_splits, writes, mixed_ok):
    """check_call's checks that read no length and no page id: its _Form."""
    pairs = ((("k", k), ("v", v)), (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)))
    for (a, x), (b, y) in pairs:
        if (x is None) != (y is None):
            given, missing = (a, b) if y is None else (b, a)
            _fail(ValueError, fn, missing, f"must be given with {given} (both or neither)", None)
    seqlens_is_int = isinstance(cache_seqlens, (numbers.Integral, np.integer)) and not isinstance(
        cache_seqlens, (bool, np.bool_))
    if cache_seqlens is not None and not seqlens_is_int and array_kind(cache_seqlens) is None:
        _fail(TypeError, fn, "cache_seqlens", "must be None, an int or an int32 array (batch,)",
              _validate._type_name(cache_seqlens))
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    named += [("k", k), ("v", v)] if k is not None else []
    named += [("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)] if rotary_cos is not None else []
    # the lengths and the page table may stay on the host (NumPy) with arrays on the device
    named += [("cache_seqlens", cache_seqlens)] if (cache_seqlens is not None and not seqlens_is_int
                                                    and array_kind(cache_seqlens) != "numpy") else []
    named += [("block_table", block_table)] if block_table is not None and array_kind(block_table) != "numpy" else []
    named += [(name, x) for name, x in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad))
              if x is not None and array_kind(x) != "numpy"]
    if mixed_ok:
        for name, x in named:
            if array_kind(x) is None:
                _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _validate._type_name(x))
        kind = array_kind(q)
    else:
        kind = _validate._check_arrays(fn, named)

    paged = block_table is not None
    if paged and cache_batch_idx is not None:
        _fail(ValueError, fn, "cache_batch_idx", "must be None with block_table (a paged cache's table names each "
              "sequence's pages)", "an array")
    arrays = [("q", q, _Q_WORDS), ("k_cache", k_cache, _CACHE_WORDS[paged]),
              ("v_cache", v_cache, _CACHE_WORDS[paged])]
    arrays += [("k", k, _NEW_WORDS), ("v", v, _NEW_WORDS)] if k is not None else []
    for name, x, words in arrays:
        _check_rank(fn, name, x, words)
    for name, x, _ in arrays:
        _validate._check_dtype(fn, name, x)
    for name, x, _ in arrays[1:]:
        if x.dtype != q.dtype:
            _fail(TypeError, fn, f"{name}.dtype", f"must equal q.dtype={_validate._dtype_name(q.dtype)}",
                  _validate._dtype_name(x.dtype))

    batch, seqlen_q, nheads, headdim = q.shape
    for axis, what, size in ((0, "batch", batch), (1, "seqlen_q", seqlen_q), (2, "nheads", nheads)):
        if size == 0:
            _fail(ValueError, fn, f"q.shape[{axis}] ({what})", "must be at least 1", 0)
    if headdim == 0 or headdim > _validate.MAX_HEADDIM:
        _fail(ValueError, fn, "q.shape[3] (headdim)", f"must be between 1 and {_validate.MAX_HEADDIM}", headdim)
    if k_cache.shape[3] != headdim:
        _fail(ValueError, fn, "k_cache.shape[3] (headdim)", f"must equal q.shape[3]={headdim}", k_cache.shape[3])
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        _fail(ValueError, fn, "v_cache.shape", f"must equal k_cache.shape={tuple(k_cache.shape)}",
              tuple(v_cache.shape))
    nheads_kv = k_cache.shape[2]
    if nheads_kv == 0:
        _fail(ValueError, fn, "k_cache.shape[2] (nheads_kv)", "must be at least 1", 0)
    if nheads % nheads_kv != 0:
        _fail(ValueError, fn, "k_cache.shape[2] (nheads_kv)", f"must divide q.shape[2] (nheads)={nheads}", nheads_kv)
    num_blocks = k_cache.shape[0]
    if paged:
        page_size = k_cache.shape[1]
        if page_size == 0:
            _fail(ValueError, fn, "k_cache.shape[1] (page_size)", "must be at least 1", 0)
        _check_int_array(fn, "block_table", block_table, 2, batch, f"(batch={batch}, max_blocks_per_seq)")
        capacity = block_table.shape[1] * page_size
        capacity_words = f"max_blocks_per_seq * page_size = {block_table.shape[1]} * {page_size}"
    else:
        if cache_batch_idx is None and k_cache.shape[0] != batch:
            _fail(ValueError, fn, "k_cache.shape[0] (batch)", f"must equal q.shape[0]={batch}", k_cache.shape[0])
        if cache_batch_idx is not None:
            _check_int_array(fn, "cache_batch_idx", cache_batch_idx, 1, batch, f"(batch,)=({batch},)")
        page_size = capacity = k_cache.shape[1]
        capacity_words = "seqlen_cache"
    seqlen_new = 0
    if k is not None:
        seqlen_new = k.shape[1]
        for name, x in (("k", k), ("v", v)):
            for axis, what, want, source in ((0, "batch", batch, "q.shape[0]"),
                                             (1, "seqlen_new", seqlen_new, "k.shape[1]"),
                                             (2, "nheads_kv", nheads_kv, "k_cache.shape[2]"),
                                             (3, "headdim", headdim, "q.shape[3]")):
                if x.shape[axis] != want:
                    _fail(ValueError, fn, f"{name}.shape[{axis}] ({what})", f"must equal {source}={want}",
                          x.shape[axis])
        if writes:
            for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
                if array_kind(x) == "numpy" and not x.flags.writeable:
                    _fail(ValueError, fn, name, "must be writeable (k and v are appended to it in place)",
                          "a read-only array")
    if cache_seqlens is not None and not seqlens_is_int:
        _check_int_array(fn, "cache_seqlens", cache_seqlens, 1, batch, f"(batch,)=({batch},)")
    if cache_leftpad is not None:
        _check_int_array(fn, "cache_leftpad", cache_leftpad, 1, batch, f"(batch,)=({batch},)")

    causal = _validate.check_flag(fn, "causal", causal)
    scale = _validate._check_scale(fn, scale, headdim, q.dtype)
    window = _validate._check_window(fn, window_size, causal)
    softcap = _validate._check_softcap(fn, softcap)
    slopes = None if alibi_slopes is None else _validate._check_alibi(fn, alibi_slopes, batch, nheads, kind, q,
                                                                      mixed_ok)
    sink = None if learnable_sink is None else _validate._check_sink(fn, learnable_sink, nheads, kind, q, mixed_ok)
    num_splits = _validate._check_int(fn, "num_splits", num_splits, "an int >= 0 (0 = automatic)")
    if num_splits < 0:
        _fail(ValueError, fn, "num_splits", "must be >= 0 (0 = automatic)", num_splits)

    rotary_interleaved = _validate.check_flag(fn, "rotary_interleaved", rotary_interleaved)
    if rotary_cos is not None:
        _check_rotary(fn, rotary_cos, rotary_sin, q, k, capacity, capacity_words, causal or window != (-1, -1))

    if cache_seqlens is None and seqlen_new:
        _fail(ValueError, fn, "cache_seqlens", f"must be given with k and v (None means every cache is full, "
              f"{capacity} keys, leaving no room for seqlen_new={seqlen_new})", None)
    spec = Spec(kind=kind, dtype=np.dtype(q.dtype), batch=batch, seqlen_q=seqlen_q, seqlen_k=capacity, nheads=nheads,
                nheads_kv=nheads_kv, headdim=headdim, scale=scale, causal=causal, window=window, softcap=softcap,
                alibi_slopes=slopes, learnable_sink=sink)
    table_name = "block_table" if paged else None if cache_batch_idx is None else "cache_batch_idx"
    return _Form(spec, seqlens_is_int, seqlen_new, page_size, capacity, capacity_words,
                 num_blocks if table_name else 0, table_name, num_splits, rotary_interleaved, {})


def _check_rotary(fn, rotary_cos, rotary_sin, q, k, capacity, capacity_words, successive):
    """rotary_cos and rotary_sin (seqlen_ro, rotary_dim / 2) in q's dtype, with a row for every position they
    rotate: the new keys' (up to the capacity), and q's rows at successive positions when ``successive``."""
    if k is None:
        _fail(ValueError, fn, "rotary_cos", "needs the new keys k and v, which it rotates before the append", None)
    words = "(seqlen_ro, rotary_dim / 2)"
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if x.ndim != 2:
            _fail(ValueError, fn, name, f"must have 2 dimensions {words}", f"{x.ndim} dimensions with shape "
                  f"{tuple(x.shape)}")
        if x.dtype != q.dtype:
            _fail(TypeError, fn, f"{name}.dtype", f"must equal q.dtype={_validate._dtype_name(q.dtype)}",
                  _validate._dtype_name(x.dtype))
    if tuple(rotary_sin.shape) != tuple(rotary_cos.shape):
        _fail(ValueError, fn, "rotary_sin.shape", f"must equal rotary_cos.shape={tuple(rotary_cos.shape)}",
              tuple(rotary_sin.shape))
    seqlen_ro, half = rotary_cos.shape
    headdim = q.shape[3]
    if half == 0 or 2 * half > headdim:
        _fail(ValueError, fn, "rotary_cos.shape[1] (rotary_dim / 2)", f"must be between 1 and headdim / 2 = "
              f"{headdim // 2}", half)
    extra = max(0, q.shape[1] - k.shape[1]) if successive else 0  # q's rows past the new keys' positions
    needed = capacity + extra
    if seqlen_ro < needed:
        words = capacity_words if not extra else f"{capacity_words} + seqlen_q - seqlen_new = {capacity} + {extra}"
        _fail(ValueError, fn, "rotary_cos.shape[0] (seqlen_ro)", f"must be at least the positions it rotates, "
              f"{words} = {needed}", seqlen_ro)


def _check_values(fn, form, cache_seqlens, cache_leftpad, table_arg, one_copy):
    """check_call's checks of the lengths and page ids, read to the host only now that everything else
    holds: the Call. One length for every sequence (an int or None, a decoding loop's usual call) is
    checked as a number, and its pages as the table's first columns."""
    batch, seqlen_new, page_size, capacity = form.spec.batch, form.seqlen_new, form.page_size, form.capacity
    num_blocks = form.num_blocks
    lengths, leftpad, table = _host_ints([None if form.seqlens_is_int else cache_seqlens, cache_leftpad, table_arg],
                                         one_copy=one_copy)
    if form.table_name == "cache_batch_idx":
        table = table.reshape(-1, 1)  # sequence b's one page
    if lengths is None:
        length = capacity if cache_seqlens is None else int(cache_seqlens)
        if length < 0 or length + seqlen_new > capacity:
            _check_lengths(fn, form, np.array([length]), "cache_seqlens")
        lengths, longest, uniform = np.full(batch, length, np.int64), length + seqlen_new, length
        used = table[:, :-(-longest // page_size)] if table is not None else None
        if used is not None and used.size and (used.min() < 0 or used.max() >= num_blocks):
            _check_pages(fn, form, lengths, table)
    else:
        _check_lengths(fn, form, lengths, None)
        if table is not None:
            _check_pages(fn, form, lengths, table)
        longest = int(lengths.max()) + seqlen_new
        uniform = int(lengths[0]) if (lengths == lengths[0]).all() else None
    if table is None:
        table = np.arange(batch, dtype=np.int64)[:, None]
    if leftpad is None:
        leftpad = np.zeros(batch, np.int64)
    else:
        for b in np.flatnonzero((leftpad < 0) | (leftpad > lengths))[:1]:  # the first wrong one
            _fail(ValueError, fn, f"cache_leftpad[{b}]", f"must be between 0 and cache_seqlens[{b}]={lengths[b]}",
                  int(leftpad[b]))
        longest = int((lengths + seqlen_new - leftpad).max())
    spec = form.specs.get(longest)
    if spec is None:
        if len(form.specs) >= 8:
            form.specs.clear()
        spec = form.specs[longest] = dataclasses.replace(form.spec, seqlen_k=longest)
    return Call(spec=spec, seqlen_new=seqlen_new, page_size=page_size, pages=table, cache_seqlens=lengths,
                uniform=uniform, leftpad=leftpad, num_splits=form.num_splits,
                rotary_interleaved=form.rotary_interleaved)


def _check_lengths(fn, form, lengths, name):
    """Each length >= 0 and within the capacity with the new rows; `name` for one length shared by every
    sequence, else cache_seqlens[b] of the first wrong one."""
    seqlen_new, capacity = form.seqlen_new, form.capacity
    for b in np.flatnonzero((lengths < 0) | (lengths + seqlen_new > capacity))[:1]:  # the first wrong one
        name, length = name or f"cache_seqlens[{b}]", int(lengths[b])
        if length < 0:
            _fail(ValueError, fn, name, "must be >= 0", length)
        _fail(ValueError, fn, f"{name} + seqlen_new", f"must be at most the cache's capacity per sequence, "
              f"{form.capacity_words} = {capacity}", f"{length} + {seqlen_new} = {length + seqlen_new}")


def _check_pages(fn, form, lengths, table):
    """Every page a sequence uses (those holding its positions < L_b) is a page id."""
    needed = -(-(lengths + form.seqlen_new) // form.page_size)
    bad = (np.arange(table.shape[1]) < needed[:, None]) & ((table < 0) | (table >= form.num_blocks))
    if bad.any():
        b, j = np.argwhere(bad)[0]
        if form.table_name == "cache_batch_idx":
            _fail(ValueError, fn, f"cache_batch_idx[{b}]",
                  f"must be an index in [0, k_cache.shape[0]={form.num_blocks})", int(table[b, j]))
        _fail(ValueError, fn, f"block_table[{b}, {j}]", f"must be a page id in [0, num_blocks={form.num_blocks}) "
              f"(sequence {b} uses {needed[b]} pages)", int(table[b, j]))


def _bits(x):
    """The raw bits of x (an unsigned view of its itemsize): copies through them move every dtype,
    bfloat16 included, unchanged."""
    return x.view(_UINT[x.dtype.itemsize])


def _append(call, cache, new):
    """Write ``new`` (batch, seqlen_new, nheads_kv, headdim) at each sequence's positions
    ``cache_seqlens[b] ...`` of a NumPy cache, in one scatter (CuPy caches: the backend's append kernel)."""
    positions = call.cache_seqlens[:, None] + np.arange(call.seqlen_new)
    pages = np.take_along_axis(call.pages, positions // call.page_size, axis=1)
    rows = _bits(new).reshape(-1, *new.shape[2:])
    _bits(cache)[pages.ravel(), (positions % call.page_size).ravel()] = rows


class Rotary(typing.NamedTuple):
    """A call's rotary embedding (checked): its tables, their pairing, and q's step between rows' positions
    (1: successive, 0: every row at its sequence's first new position)."""
    cos: Array
    sin: Array
    interleaved: bool
    q_step: int


def _rotate(x, rotary, starts, step):
    """NumPy twin of rotate_row (decode.cu): x (batch, seqlen, heads, headdim) with row s of sequence b rotated
    by the tables' row ``starts[b] + s * step``, each product and sum rounded in the accumulation type, the
    result to x's dtype."""
    acc = compute_dtype(x.dtype)
    half = rotary.cos.shape[1]
    positions = starts[:, None] + np.arange(x.shape[1]) * step
    cos, sin = (t[positions].astype(acc)[:, :, None, :] for t in (rotary.cos, rotary.sin))
    first, second = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if rotary.interleaved else \
        (slice(0, half), slice(half, 2 * half))
    x1, x2 = x[..., first].astype(acc), x[..., second].astype(acc)
    out = x.copy()
    out[..., first] = (x1 * cos - x2 * sin).astype(x.dtype)
    out[..., second] = (x2 * cos + x1 * sin).astype(x.dtype)
    return out


#: The most bytes of a cache's pages that the dense path gathers for one pass (then the next sequences').
_GATHER_BYTES = 1 << 30


def _rows(cache):
    """The cache's pages as one (rows, nheads_kv, headdim) array of rows, a view; None where they do not flatten."""
    pages, page_size = cache.shape[:2]
    if pages > 1 and page_size > 1 and cache.strides[0] != page_size * cache.strides[1]:
        return None
    return _bits(cache).reshape(pages * page_size, *cache.shape[2:]).view(cache.dtype)


def _gathered(cache, index):
    """The pages `index` of `cache` in order, their bits unchanged, as (len(index) * page_size, nheads_kv, headdim)
    rows: each page copied as 8-byte words where its bytes are contiguous and aligned (about 2.8 times faster
    than element by element for 16-bit caches), else element by element."""
    pages, rows = cache.shape[0], (len(index) * cache.shape[1], *cache.shape[2:])
    address = cache.ctypes.data if isinstance(cache, np.ndarray) else cache.data.ptr
    if cache.flags.c_contiguous and cache.size and (cache.nbytes // pages) % 8 == 0 and address % 8 == 0:
        return cache.reshape(pages, -1).view(np.uint64)[index].view(cache.dtype).reshape(rows)
    return _bits(cache)[index].view(cache.dtype).reshape(rows)


def _key_groups(call, caches, xp, table, reads_pages):
    """Every sequence's keys as rows of one array per cache, in groups of sequences: (first, end, rows of
    each cache, where each sequence's keys start among them, and the page table they are read through or None).
    The rows are the caches' own (a view) where each sequence's keys lie on one page and the pages flatten, or
    where the forward reads their pages through `table` (Spec.block_table): boxes of _plan.PAGE_BOX_ROWS rows
    that each lie within a page, a forward for which `reads_pages(rows)`. Else the pages that hold keys,
    gathered in order, at most _GATHER_BYTES of them a group (a sequence's at least)."""
    lengths, start, size = call.lengths, call.leftpad, call.page_size
    first = start // size
    pages = np.where(lengths > 0, -(-(start + lengths) // size) - first, 0)
    views = [_rows(cache) for cache in caches]
    if all(view is not None for view in views):
        if (pages <= 1).all():
            listed = call.pages[np.arange(call.spec.batch), np.minimum(first, call.pages.shape[1] - 1)]
            page = np.where(lengths > 0, listed, 0)  # the one page of each sequence's keys
            yield 0, call.spec.batch, views, page * size + start - first * size, None
            return
        box = _plan.PAGE_BOX_ROWS
        if (table is not None and size % box == 0 and not (start % box).any() and views[0].shape[0] < 2**31
                and reads_pages(views)):
            yield 0, call.spec.batch, views, start, table
            return
    page_bytes = caches[0][:1].nbytes
    b = 0
    while b < call.spec.batch:
        end = b + 1 + int(np.searchsorted(np.cumsum(pages[b + 1:]), _GATHER_BYTES // page_bytes - pages[b], "right"))
        held = np.concatenate([call.pages[s, first[s]:first[s] + pages[s]] for s in range(b, end)])
        index = xp.asarray(held)
        rows = [_gathered(cache, index) for cache in caches]
        yield b, end, rows, (np.cumsum(pages[b:end]) - pages[b:end]) * size + start[b:end] - first[b:end] * size, None
        b = end


#: The dense passes' packed Specs by what they hold (_packed_spec); bounded, cleared when full.
_PACKED_SPECS = {}
_PACKED_SPECS_MAX = 64


def _packed_spec(spec, b, end, lengths, starts, total_k, pages, page_size):
    """The packed Spec of sequences b ... end - 1 of `spec`'s dense pass: their lengths and first keys among
    `total_k` rows (or positions, read through the page table `pages`). The same object for the same
    contents, so that the backends plan its forward once: a decoding step's layers share their lengths."""
    table = None if pages is None else (
        pages.tobytes() if isinstance(pages, np.ndarray) else (pages.data.ptr, pages.shape, pages.strides))
    key = (spec, b, end, lengths.tobytes(), np.asarray(starts).tobytes(), total_k, table)
    one = _PACKED_SPECS.get(key)
    if one is None:
        n, slopes = end - b, spec.alibi_slopes
        one = dataclasses.replace(
            spec, batch=n, seqlen_k=int(lengths.max()), alibi_slopes=None if slopes is None else slopes[b:end],
            cu_seqlens_q=np.arange(n + 1) * spec.seqlen_q, cu_seqlens_k=np.append(starts, total_k),
            seqused_k=lengths, total_q=n * spec.seqlen_q, total_k=total_k, block_table=pages,
            page_size=page_size if pages is not None else 0)
        if len(_PACKED_SPECS) >= _PACKED_SPECS_MAX:
            _PACKED_SPECS.clear()
        _PACKED_SPECS[key] = one
    return one


def _dense(backend, call, q, k_cache, v_cache, xp, table):
    """Every sequence through the backend's packed forward (cupyflash._varlen, one pass on the GPU) over its
    keys in the cache's rows (_key_groups): sequence b's queries are rows b * seqlen_q ... of q, its keys the
    L_b rows from its start (Spec.seqused_k), or the L_b positions from its first through `table`, the page
    table (on q's device for CuPy arrays), where the forward reads the pages."""
    spec = call.spec
    outs, lses = [], []

    def reads_pages(rows):  # the forward's arrays: one batch entry of rows
        return xp is np or backend.reads_pages(spec, q, *(x[None] for x in rows))

    for b, end, (keys, values), starts, pages in _key_groups(call, (k_cache, v_cache), xp, table, reads_pages):
        total_k = keys.shape[0] if pages is None else call.pages.shape[1] * call.page_size  # rows or positions
        one = _packed_spec(spec, b, end, call.lengths[b:end], starts, total_k, pages, call.page_size)
        n = end - b
        queries = q[b:end].reshape(n * spec.seqlen_q, *q.shape[2:])
        out, lse = _varlen.forward(backend, queries, keys, values, one)
        outs.append(out.reshape(q[b:end].shape))
        lses.append(lse.reshape(spec.nheads, n, spec.seqlen_q).transpose(1, 0, 2))
    if len(outs) == 1:
        return outs[0], xp.ascontiguousarray(lses[0])
    return xp.concatenate(outs), xp.concatenate(lses)


def attention_with_kvcache(q: Array, k_cache: Array, v_cache: Array, k: Optional[Array] = None,
                           v: Optional[Array] = None, *, rotary_cos: Optional[Array] = None,
                           rotary_sin: Optional[Array] = None, cache_seqlens: Union[None, int, Array] = None,
                           cache_batch_idx: Optional[Array] = None, cache_leftpad: Optional[Array] = None,
                           block_table: Optional[Array] = None, causal: bool = False, scale: Optional[float] = None,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           rotary_interleaved: bool = True, alibi_slopes: Optional[Array] = None,
                           learnable_sink: Optional[Array] = None, return_lse: bool = False,
                           num_splits: int = 0) -> Union[Array, Tuple[Array, Array]]:
    """Attention of q over each sequence's cached keys and values plus the new ``k``, ``v``, which
    are first written into the cache in place (flash-attn's ``flash_attn_with_kvcache``, forward only).

    q: (batch, seqlen_q, nheads, headdim). The cache is contiguous, k_cache and v_cache
    (batch, seqlen_cache, nheads_kv, headdim), or paged, (num_blocks, page_size, nheads_kv,
    headdim) with ``block_table`` (int32, (batch, max_blocks_per_seq)): sequence b's position j
    lives at page ``block_table[b, j // page_size]``, row ``j % page_size``. ``cache_seqlens``
    (None: the full capacity; an int; or int32 (batch,)) is each sequence's cached length before
    the append. ``cache_batch_idx`` (int32 (batch,)) lets sequence b use entry ``cache_batch_idx[b]`` of a
    contiguous cache (batch_cache, seqlen_cache, nheads_kv, headdim) instead of entry b; where two
    sequences share an entry, the rows appended there may come from either. ``cache_leftpad`` (int32
    (batch,)) is the cache row of each sequence's first key (a left padding; default 0). k, v (batch,
    seqlen_new, nheads_kv, headdim), both or neither, are written at positions ``cache_seqlens[b] ...
    cache_seqlens[b] + seqlen_new - 1``, and sequence b attends to its ``L_b = cache_seqlens[b] +
    seqlen_new - cache_leftpad[b]`` keys from row ``cache_leftpad[b]`` on. causal, window_size, softcap,
    alibi_slopes and learnable_sink are those of :func:`cupyflash.attention`, bottom-right aligned over the L_b
    keys.
    ``rotary_cos`` and ``rotary_sin`` (seqlen_ro, rotary_dim / 2), in q's dtype, apply the rotary
    embedding to the first rotary_dim columns of k and q first: k's row j at position
    ``cache_seqlens[b] + j`` (the cache receives the rotated rows), q's row i at ``cache_seqlens[b] + i``
    when causal or windowed, else every row of q at ``cache_seqlens[b]``. A pair (x1, x2) becomes
    (x1 cos - x2 sin, x2 cos + x1 sin): with ``rotary_interleaved`` columns (2i, 2i + 1) (GPT-J), else
    (i, i + rotary_dim / 2) (GPT-NeoX); computed in float32 (float64 for float64) and rounded once.
    ``num_splits``: 0 (automatic), or the number of key chunks (at most) whose attentions are merged
    by their lse.

    Returns ``out`` (q's shape and dtype), or ``(out, lse)`` with ``return_lse=True``, lse
    (batch, nheads, seqlen_q) float32 (float64 for float64). A row that sees no key gives out 0,
    lse -inf (its sink's logit with a learnable sink). Bad arguments raise before anything is written.
    CuPy arrays: ``cache_seqlens`` and ``block_table`` on the device are read to the host in one copy (a
    device synchronisation); NumPy ones, an int or None need no read.
    """
    fn = "attention_with_kvcache"
    call = _checked(fn, q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                    cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                    block_table=block_table, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                    rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink,
                    num_splits=num_splits)
    return_lse = _validate.check_flag(fn, "return_lse", return_lse)
    spec = call.spec
    backend = _backend(spec.kind)
    rotary = None if rotary_cos is None else Rotary(rotary_cos, rotary_sin, call.rotary_interleaved,
                                                    int(spec.causal or spec.has_window))
    if spec.kind == "cupy":
        out, lse = _on_device(backend, call, q, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad,
                              _table(block_table, cache_batch_idx), rotary, return_lse)
    else:
        if rotary is not None:
            k = _rotate(k, rotary, call.cache_seqlens, 1)
            q = _rotate(q, rotary, call.cache_seqlens, rotary.q_step)
        if call.seqlen_new:
            _append(call, k_cache, k)
            _append(call, v_cache, v)
        out, lse = _dense(backend, call, q, k_cache, v_cache, np, call.pages)
    return (out, lse) if return_lse else out


def _checked(fn, q, k_cache, v_cache, k, v, *, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
             block_table, causal, scale, window_size, softcap, rotary_interleaved, alibi_slopes, learnable_sink,
             num_splits):
    """check_call's Call, its checks of shapes, dtypes and scalars made once per signature (alibi_slopes and
    learnable_sink by their addresses too, which the Spec keeps): a decoding loop checks its arguments once,
    not at every token. Lengths (an int or host arrays) and host page tables are then checked once per contents,
    so the calls of one token's layers, which share them, are checked once; CuPy ones are read and checked at
    each call."""
    def form():
        return _check_form(fn, q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                           cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                           block_table=block_table, causal=causal, scale=scale, window_size=window_size,
                           softcap=softcap, rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes,
                           learnable_sink=learnable_sink, num_splits=num_splits, writes=True, mixed_ok=False)

    table = _table(block_table, cache_batch_idx)
    kinds = [array_kind(x) for x in (cache_seqlens, cache_leftpad, table)]
    read = "cupy" in kinds
    on_host = [x for x, kind in zip((cache_seqlens, cache_leftpad, table), kinds) if kind == "numpy"]
    key = _validate.signature((q, k_cache, v_cache, k, v, alibi_slopes, learnable_sink, rotary_cos, rotary_sin),
                              (fn, read, causal, scale, window_size, softcap, rotary_interleaved, num_splits,
                               cache_batch_idx is None))
    if key is not None:
        key += (_layout(cache_seqlens), _layout(cache_leftpad), _layout(table),
                *(x is not None and x.data.ptr for x in (alibi_slopes, learnable_sink)))
    if not read:  # the whole verdict, by the lengths' and tables' contents too
        values = None if key is None else key + (
            None if kinds[0] else (type(cache_seqlens), cache_seqlens), *(x.tobytes() for x in on_host))
        return _validate.memoized(values, lambda: _check_values(fn, _validate.memoized(key, form), cache_seqlens,
                                                                cache_leftpad, table, one_copy=True))
    return _check_values(fn, _validate.memoized(key, form), cache_seqlens, cache_leftpad, table, one_copy=True)


def _layout(x):
    """What _check_form reads of a lengths or page-table argument: its kind, and an array's shape and dtype."""
    if x is None or type(x) is int or isinstance(x, (numbers.Integral, np.integer)):
        return type(x)
    return type(x), getattr(getattr(x, "device", None), "id", None), getattr(x, "shape", None), getattr(x, "dtype", None)


def _on_device(backend, call, q, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, table_arg, rotary, want_lse):
    """The CuPy path, on q's device. The append and the decode kernels read each sequence's length from
    ``cache_seqlens`` on the device, or from one number when every sequence has the same (an int, None, or
    such a NumPy array); NumPy lengths and page tables are copied to the device (asynchronously, without the
    read that CuPy ones take to be checked). With ``rotary`` the append rotates the new keys, and q into a new
    array.
    The decode kernels leave lse out (None) without ``want_lse``."""
    spec, cupy, on = call.spec, backend.cupy, q.device
    with on:
        device = on.id
        backend._device_info(device)  # the kernels' own refusals, before anything is written
        backend._check_grid(spec)
        if array_kind(cache_seqlens) == "cupy":
            device_lengths, uniform = cache_seqlens, 0
        elif call.uniform is not None:
            device_lengths, uniform = None, call.uniform
        else:
            device_lengths, uniform = cupy.asarray(call.cache_seqlens.astype(np.int32)), 0
        table = None if table_arg is None else _device_table(cupy, call, table_arg, device)
        leftpad = None if cache_leftpad is None else (
            cupy.ascontiguousarray(cache_leftpad) if array_kind(cache_leftpad) == "cupy"
            else cupy.asarray(call.leftpad.astype(np.int32)))
        lengths = backend.CacheLengths(device_lengths, uniform, call.seqlen_new, table, call.page_size, leftpad)
        if call.seqlen_new or rotary is not None:
            q_rot = backend.append(k_cache, v_cache, k, v, spec, lengths, q, rotary)
            q = q if rotary is None else q_rot
        plan = backend.decode_plan(spec, k_cache, v_cache, call.num_splits)
        if plan is not None:
            return backend.decode(plan, q, k_cache, v_cache, spec, lengths, want_lse)
        return _dense(backend, call, q, k_cache, v_cache, cupy, table)


#: Device copies of NumPy page tables by (device, contents); bounded, cleared when full.
_DEVICE_TABLES = {}
_DEVICE_TABLES_MAX = 64


def _device_table(cupy, call, table_arg, device):
    """block_table or cache_batch_idx (checked) as a contiguous CuPy page table (batch, pages) on `device`, the
    current one. A NumPy table is copied there once per contents, so that a decoding step's layers, which share
    it, read one copy (and their dense passes share a plan, _packed_spec), and kept by the Call, which a loop's
    calls share where their lengths are not read (_checked)."""
    if array_kind(table_arg) == "cupy":
        return cupy.ascontiguousarray(table_arg).reshape(call.pages.shape)
    table = call.device_tables.get(device)
    if table is None:
        host = np.ascontiguousarray(table_arg).reshape(call.pages.shape)
        key = (device, host.shape, host.dtype, host.tobytes())
        table = _DEVICE_TABLES.get(key)
        if table is None:
            if len(_DEVICE_TABLES) >= _DEVICE_TABLES_MAX:
                _DEVICE_TABLES.clear()
            table = _DEVICE_TABLES[key] = cupy.asarray(host)
        call.device_tables[device] = table
    return table
