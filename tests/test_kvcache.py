"""attention_with_kvcache: attention over a contiguous or paged KV cache plus new keys appended in
place, against the float64 reference over each sequence's concatenated keys; what the append
writes (exactly the new rows), what is never read (rows past the valid length, unused pages),
num_splits, the rotary embedding of the new keys and the queries, and the argument errors (raised before
anything is written)."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from cupyflash import _plan
from helpers import BFLOAT16, eps

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}

#: With problem()'s two query heads per kv head: more rows per kv head than the decode kernels take, so the
#: dense kernels run each sequence.
DENSE_SEQLEN_Q = max(_plan.DECODE_MAX_ROWS.values()) // 2 + 1


def bits(x):
    """The raw bits of a float array, so that comparisons see NaN payloads and signed zeros."""
    return np.ascontiguousarray(x).view(_UINT[x.dtype.itemsize])


def problem(seed, cache_seqlens, seqlen_new, seqlen_q=3, nheads=4, nheads_kv=2, headdim=16, dtype=np.float32,
            spare_rows=2):
    """q, a contiguous cache whose rows past cache_seqlens are NaN, and new k, v (or None when
    seqlen_new is None)."""
    rng = np.random.default_rng(seed)
    batch = len(cache_seqlens)
    capacity = max(cache_seqlens) + (seqlen_new or 0) + spare_rows
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim)).astype(dtype)
    k_cache, v_cache = (rng.standard_normal((batch, capacity, nheads_kv, headdim)).astype(dtype) for _ in range(2))
    for b, n in enumerate(cache_seqlens):
        k_cache[b, n:] = v_cache[b, n:] = np.nan
    k, v = (None, None) if seqlen_new is None else (
        rng.standard_normal((batch, seqlen_new, nheads_kv, headdim)).astype(dtype) for _ in range(2))
    return q, k_cache, v_cache, k, v, np.array(cache_seqlens, np.int32)


def paged(k_cache, v_cache, page_size, seed, spare_pages=3):
    """The same cache in pages of ``page_size`` rows at a random permutation of page ids; the
    padding of the last pages past the capacity and ``spare_pages`` unused pages hold NaN."""
    batch, capacity, nheads_kv, headdim = k_cache.shape
    per_seq = -(-capacity // page_size)
    num_blocks = batch * per_seq + spare_pages
    rng = np.random.default_rng(seed)
    block_table = rng.permutation(num_blocks)[:batch * per_seq].reshape(batch, per_seq).astype(np.int32)
    out = []
    for cache in (k_cache, v_cache):
        pages = np.full((num_blocks, page_size, nheads_kv, headdim), np.nan, cache.dtype)
        padded = np.full((batch, per_seq * page_size, nheads_kv, headdim), np.nan, cache.dtype)
        padded[:, :capacity] = cache
        pages[block_table] = padded.reshape(batch, per_seq, page_size, nheads_kv, headdim)
        out.append(pages)
    return out[0], out[1], block_table


def concatenated_reference(q, k_cache, v_cache, k, v, cache_seqlens, **kw):
    """reference.attention of each sequence over its cache rows [0, cache_seqlens[b]) then its new k, v (a
    sequence with no key: out 0, lse -inf or its sink's logit)."""
    batch, seqlen_q, nheads, _ = q.shape
    out, lse = np.zeros(q.shape), np.full((batch, nheads, seqlen_q), -np.inf)
    slopes = kw.pop("alibi_slopes", None)
    for b, n in enumerate(cache_seqlens):
        keys, values = k_cache[b, :n], v_cache[b, :n]
        if k is not None:
            keys, values = np.concatenate([keys, k[b]]), np.concatenate([values, v[b]])
        if len(keys) == 0:  # no key: out 0, lse -inf or the sink's logit
            if kw.get("learnable_sink") is not None:
                lse[b] = kw["learnable_sink"][:, None]
            continue
        row = None if slopes is None else np.broadcast_to(slopes, (batch, nheads))[b]
        o, l = cupyflash.reference.attention(q[b:b + 1], keys[None], values[None], alibi_slopes=row, return_lse=True,
                                             **kw)
        out[b], lse[b] = o[0], l[0]
    return out, lse


def assert_matches(out, lse, want_out, want_lse, tol):
    np.testing.assert_allclose(out.astype(np.float64), want_out, rtol=0, atol=tol)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=0, atol=tol)


SLOPES = np.array([0.3, 0.05, 0.5, 0.2], np.float32)
SINKS = np.array([1.5, -np.inf, -0.5, 4.0], np.float32)


def fitted(kw, dtype, nheads=4):
    """A variant's keywords for nheads heads of dtype: its sinks in the accumulation dtype."""
    kw = dict(kw)
    if "learnable_sink" in kw:
        kw["learnable_sink"] = np.resize(kw["learnable_sink"], nheads).astype(np.float64 if dtype == np.float64
                                                                              else np.float32)
    return kw
VARIANTS = [dict(), dict(causal=True), dict(window_size=(2, 1)), dict(causal=True, window_size=(3, -1)),
            dict(softcap=2.0), dict(alibi_slopes=SLOPES), dict(causal=True, alibi_slopes=SLOPES, softcap=5.0),
            dict(causal=True, learnable_sink=SINKS)]


@settings(max_examples=60)
@given(cache_seqlens=st.lists(st.integers(0, 20), min_size=1, max_size=4), seqlen_new=st.integers(0, 5),
       seqlen_q=st.integers(1, 6), heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       variant=st.sampled_from(range(len(VARIANTS) + 1)), dtype=st.sampled_from([np.float32, np.float64]),
       page_size=st.sampled_from([None, 1, 3, 8]), num_splits=st.sampled_from([0, 1, 2, 5]),
       seed=st.integers(0, 2**32 - 1))
def test_matches_the_reference_over_the_concatenated_keys(cache_seqlens, seqlen_new, seqlen_q, heads, variant, dtype,
                                                          page_size, num_splits, seed):
    nheads, nheads_kv = heads
    q, k_cache, v_cache, k, v, lengths = problem(seed, cache_seqlens, seqlen_new, seqlen_q, nheads, nheads_kv,
                                                 dtype=dtype)
    kw = fitted(VARIANTS[variant], dtype) if variant < len(VARIANTS) else dict(  # a row of slopes per sequence
        causal=True, alibi_slopes=np.random.default_rng(seed).uniform(0.05, 0.5, (len(cache_seqlens), nheads)).astype(
            np.float32))
    want_out, want_lse = concatenated_reference(q, k_cache, v_cache, k, v, lengths, **kw)
    cache = dict(block_table=None)
    if page_size is not None:
        k_cache, v_cache, cache["block_table"] = paged(k_cache, v_cache, page_size, seed)
    ref_out, ref_lse = cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                                   return_lse=True, **cache, **kw)
    out, lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, return_lse=True,
                                                num_splits=num_splits, **cache, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (len(cache_seqlens), nheads, seqlen_q) and lse.dtype == q.dtype
    assert np.isfinite(out).all()  # the NaN rows past each sequence's keys are never read
    assert_matches(out, lse, want_out, want_lse, 2e-5 if dtype == np.float32 else 1e-12)
    assert_matches(ref_out, ref_lse, want_out, want_lse, 1e-12)


def rotary_tables(seed, seqlen_ro, half, dtype):
    """cos and sin of random angles (seqlen_ro, half), in ``dtype``."""
    angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, (seqlen_ro, half))
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def appended_rows(k_cache, block_table, lengths, seqlen_new):
    """Each sequence's rows cache_seqlens[b] ... + seqlen_new, read through the page table."""
    rows = []
    for b, n in enumerate(lengths):
        positions = n + np.arange(seqlen_new)
        if block_table is None:
            rows.append(k_cache[b, positions])
        else:
            page_size = k_cache.shape[1]
            rows.append(k_cache[block_table[b, positions // page_size], positions % page_size])
    return np.stack(rows)


ROTARY_VARIANTS = [dict(), dict(causal=True), dict(window_size=(3, 1)), dict(causal=True, alibi_slopes=SLOPES)]


@settings(max_examples=60)
@given(cache_seqlens=st.lists(st.integers(0, 12), min_size=1, max_size=3), seqlen_new=st.integers(1, 4),
       seqlen_q=st.integers(1, 4), dtype=st.sampled_from([np.float16, BFLOAT16, np.float32, np.float64]),
       half=st.integers(1, 8), interleaved=st.booleans(), variant=st.sampled_from(range(len(ROTARY_VARIANTS))),
       page_size=st.sampled_from([None, 1, 4]), seed=st.integers(0, 2**32 - 1))
def test_rotary_matches_the_reference(cache_seqlens, seqlen_new, seqlen_q, dtype, half, interleaved, variant,
                                      page_size, seed):
    q, k_cache, v_cache, k, v, lengths = problem(seed, cache_seqlens, seqlen_new, seqlen_q, dtype=dtype)
    kw = dict(ROTARY_VARIANTS[variant], rotary_interleaved=interleaved)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, seed)
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * page_size
    cos, sin = rotary_tables(seed, capacity + seqlen_q, half, dtype)
    want_out, want_lse = cupyflash.reference.attention_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths, block_table=block_table,
        return_lse=True, **kw)
    out, lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                                cache_seqlens=lengths, block_table=block_table, return_lse=True, **kw)
    tol = {np.dtype(np.float16): 3e-3, BFLOAT16: 2e-2, np.dtype(np.float32): 2e-5,
           np.dtype(np.float64): 1e-12}[np.dtype(dtype)]
    assert_matches(out, lse, want_out, want_lse, tol)
    # the cache keeps the rotated keys, within a rounding of the reference's float64 rotation (and of its
    # products' sizes, where the two nearly cancel)
    successive = np.array(lengths)[:, None] + np.arange(seqlen_new)
    want_k = cupyflash.reference.rotary_embedding(k, cos, sin, successive, interleaved)
    sizes = sum(np.abs(cupyflash.reference.rotary_embedding(np.abs(k), c, s, successive, interleaved))
                for c, s in ((np.abs(cos), 0 * sin), (0 * cos, np.abs(sin))))  # |x1 cos| + |x2 sin|
    got_k = appended_rows(k_cache, block_table, lengths, seqlen_new).astype(np.float64)
    assert (np.abs(got_k - want_k) <= eps(dtype) * (np.abs(want_k) + sizes)).all()
    assert np.array_equal(bits(got_k[..., 2 * half:]), bits(k[..., 2 * half:].astype(np.float64)))  # not rotated


def entries(k_cache, v_cache, seed, spare=2):
    """The contiguous caches as entries of larger ones (batch + spare entries, the spares NaN) at a random
    permutation: (k_entries, v_entries, cache_batch_idx)."""
    batch = k_cache.shape[0]
    idx = np.random.default_rng(seed).permutation(batch + spare)[:batch].astype(np.int32)
    out = []
    for cache in (k_cache, v_cache):
        big = np.full((batch + spare, *cache.shape[1:]), np.nan, cache.dtype)
        big[idx] = cache
        out.append(big)
    return out[0], out[1], idx


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, alibi_slopes=SLOPES),
                                dict(causal=True, rotary_interleaved=False, rotary=True)])
def test_cache_batch_idx_picks_each_sequences_entry(dtype, kw):
    """Sequence b reads and appends to entry cache_batch_idx[b]: the same outputs, bit for bit, as the
    contiguous cache whose entry b that is, and the same rows written; the other entries untouched."""
    kw = dict(kw)
    q, k_cache, v_cache, k, v, lengths = problem(5, [4, 0, 9], 2, seqlen_q=2, dtype=dtype)
    if kw.pop("rotary", False):
        kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(5, k_cache.shape[1] + 2, 5, dtype)
    k_entries, v_entries, idx = entries(k_cache, v_cache, 5)
    spares = [bits(c[np.setdiff1d(np.arange(len(c)), idx)]).copy() for c in (k_entries, v_entries)]
    ref_out = cupyflash.reference.attention_with_kvcache(q, k_entries, v_entries, k, v, cache_seqlens=lengths,
                                                         cache_batch_idx=idx, **kw)
    out, lse = cupyflash.attention_with_kvcache(q, k_entries, v_entries, k, v, cache_seqlens=lengths,
                                                cache_batch_idx=idx, return_lse=True, **kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                          return_lse=True, **kw)
    for got, want in ((out, want_out), (lse, want_lse), (k_entries[idx], k_cache), (v_entries[idx], v_cache)):
        assert np.array_equal(bits(got), bits(want))
    for c, before in zip((k_entries, v_entries), spares):
        assert np.array_equal(bits(c[np.setdiff1d(np.arange(len(c)), idx)]), before)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=0, atol=2e-5 if dtype == np.float32 else 2e-2)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, alibi_slopes=SLOPES), dict(window_size=(3, 1), softcap=2.0)])
def test_leftpad_equals_the_cache_without_its_padding(page_size, kw):
    """Keys from row cache_leftpad[b] on: the outputs of the cache whose rows before it are cut away (NaN there
    never reaches them), bit for bit, and the new rows appended after the cached ones."""
    leftpad = np.array([2, 0, 5], np.int32)
    q, k_cache, v_cache, k, v, lengths = problem(6, [6, 3, 5], 2, seqlen_q=2)
    for b, pad in enumerate(leftpad):
        k_cache[b, :pad] = v_cache[b, :pad] = np.nan
    cut = [np.full_like(c, np.nan) for c in (k_cache, v_cache)]
    for b, pad in enumerate(leftpad):
        for c, full in zip(cut, (k_cache, v_cache)):
            c[b, :c.shape[1] - pad] = full[b, pad:]
    want_out, want_lse = cupyflash.attention_with_kvcache(q, *cut, k, v, cache_seqlens=lengths - leftpad,
                                                          return_lse=True, **kw)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, 6)
    ref_out = cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                         cache_leftpad=leftpad, block_table=block_table, **kw)
    out, lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, cache_leftpad=leftpad,
                                                block_table=block_table, return_lse=True, **kw)
    assert np.array_equal(bits(out), bits(want_out)) and np.array_equal(bits(lse), bits(want_lse))
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=0, atol=2e-5)
    assert np.array_equal(bits(appended_rows(k_cache, block_table, lengths, 2)), bits(k))


@settings(max_examples=40)
@given(cache_seqlens=st.lists(st.integers(0, 12), min_size=1, max_size=3), seqlen_new=st.integers(0, 3),
       seqlen_q=st.integers(1, 4), variant=st.sampled_from(range(len(VARIANTS))), rotary=st.booleans(),
       page_size=st.sampled_from([None, 1, 4]), num_splits=st.sampled_from([0, 2]), data=st.data())
def test_leftpad_matches_the_reference(cache_seqlens, seqlen_new, seqlen_q, variant, rotary, page_size, num_splits,
                                       data):
    leftpad = np.array([data.draw(st.integers(0, n)) for n in cache_seqlens], np.int32)
    seed = data.draw(st.integers(0, 2**32 - 1))
    rotary = rotary and seqlen_new > 0
    q, k_cache, v_cache, k, v, lengths = problem(seed, cache_seqlens, seqlen_new if seqlen_new or rotary else None,
                                                 seqlen_q)
    kw = fitted(VARIANTS[variant], np.float32)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, seed)
    if rotary:
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * page_size
        kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(seed, capacity + seqlen_q, 3, np.float32)
    want_out, want_lse = cupyflash.reference.attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=lengths, cache_leftpad=leftpad, block_table=block_table,
        return_lse=True, **kw)
    out, lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                cache_leftpad=leftpad, block_table=block_table, return_lse=True,
                                                num_splits=num_splits, **kw)
    assert np.isfinite(out).all()  # the NaN rows past each sequence's keys are never read
    assert_matches(out, lse, want_out, want_lse, 2e-5)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window_size=(4, -1))])
def test_rotary_by_the_identity_changes_nothing(kw):
    args = problem(3, [2, 7], 3, seqlen_q=2)
    plain = [x.copy() for x in args]
    cos, sin = np.ones((12, 6), np.float32), np.zeros((12, 6), np.float32)
    out, lse = cupyflash.attention_with_kvcache(*args[:5], rotary_cos=cos, rotary_sin=sin, cache_seqlens=args[5],
                                                return_lse=True, **kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(*plain[:5], cache_seqlens=plain[5], return_lse=True, **kw)
    for got, want in ((out, want_out), (lse, want_lse), (args[1], plain[1]), (args[2], plain[2])):
        assert np.array_equal(bits(got), bits(want))


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("page_size", [None, 1, 4])
def test_the_append_writes_exactly_the_new_rows(dtype, page_size):
    cache_seqlens, seqlen_new = [0, 5, 9], 3
    q, k_cache, v_cache, k, v, lengths = problem(1, cache_seqlens, seqlen_new, dtype=dtype)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, 1)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for b, n in enumerate(cache_seqlens):
        for t in range(seqlen_new):
            if block_table is None:
                want_k[b, n + t], want_v[b, n + t] = k[b, t], v[b, t]
            else:
                page, row = block_table[b, (n + t) // page_size], (n + t) % page_size
                want_k[page, row], want_v[page, row] = k[b, t], v[b, t]
    new_before = bits(k).copy()
    cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=block_table)
    assert np.array_equal(bits(k_cache), bits(want_k)) and np.array_equal(bits(v_cache), bits(want_v))
    assert np.array_equal(bits(k), new_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.float64])
@pytest.mark.parametrize("page_size", [None, 1, 4])
@pytest.mark.parametrize("lengths_on_device", [False, True])
def test_the_device_append_writes_exactly_the_new_rows(dtype, page_size, lengths_on_device):
    """The append kernel, with lengths from a CuPy array or one int: the new rows land bit for bit, and no
    other element of either cache (pages, padding, spare pages) changes."""
    cp = pytest.importorskip("cupy")
    uniform = not lengths_on_device
    cache_seqlens, seqlen_new = ([6, 6, 6] if uniform else [0, 5, 9]), 3
    q, k_cache, v_cache, k, v, lengths = problem(1, cache_seqlens, seqlen_new, headdim=40, dtype=dtype)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, 1)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    cupyflash.attention_with_kvcache(q, want_k, want_v, k, v, cache_seqlens=lengths, block_table=block_table)
    device = [cp.asarray(bits(x)).view(x.dtype) for x in (q, k_cache, v_cache, k, v)]
    cupyflash.attention_with_kvcache(*device, cache_seqlens=6 if uniform else cp.asarray(lengths),
                                     block_table=None if block_table is None else cp.asarray(block_table))
    for got, want in zip(device[1:3], (want_k, want_v)):
        assert np.array_equal(got.view(_UINT[got.dtype.itemsize]).get(), bits(want))


@pytest.mark.gpu
def test_a_decoding_loop_reuses_its_check_and_sees_each_calls_arrays():
    """Calls that differ only in their arrays' data reuse the first call's check (two verdicts: the arguments'
    form, and the length's); each reads its own q, new rows and caches. Another length is checked against the
    form already checked, and refused when it is bad."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _validate

    _validate._VERDICTS.clear()
    for seed in range(3):
        q, k_cache, v_cache, k, v, _ = problem(seed, [7, 7], 1, seqlen_q=1, nheads=8, nheads_kv=2, headdim=64,
                                               dtype=np.float16)
        want_out, want_lse = cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=7,
                                                                        causal=True, return_lse=True)
        out, lse = cupyflash.attention_with_kvcache(*(cp.asarray(x) for x in (q, k_cache, v_cache, k, v)),
                                                    cache_seqlens=7, causal=True, return_lse=True)
        np.testing.assert_allclose(out.get().astype(np.float64), want_out, rtol=0, atol=4e-3)
        np.testing.assert_allclose(lse.get(), want_lse, rtol=0, atol=1e-4)
    assert len(_validate._VERDICTS) == 2
    cupyflash.attention_with_kvcache(*(cp.asarray(x) for x in (q, k_cache, v_cache, k, v)), cache_seqlens=6,
                                     causal=True)
    assert len(_validate._VERDICTS) == 3
    with pytest.raises(ValueError, match=r"cache_seqlens \+ seqlen_new must be at most"):
        cupyflash.attention_with_kvcache(*(cp.asarray(x) for x in (q, k_cache, v_cache, k, v)), cache_seqlens=10)


@pytest.mark.gpu
def test_a_host_page_table_is_checked_once_per_contents():
    """Calls alike with the same NumPy lengths and page table (a token's layers) reuse one check; a table
    changed in place is checked and read anew: pages moved elsewhere are followed, and an id out of range is
    refused before anything is written."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _validate

    q, k_cache, v_cache, _, _, lengths = problem(5, [30, 9], None, seqlen_q=1, nheads=8, nheads_kv=2, headdim=64,
                                                 dtype=np.float16)
    pages_k, pages_v, table = paged(k_cache, v_cache, 8, 2)
    want_out, want_lse = cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                                    causal=True, return_lse=True)
    device_q, device_k, device_v = (cp.asarray(x) for x in (q, pages_k, pages_v))
    _validate._VERDICTS.clear()
    for _ in range(3):
        out, lse = cupyflash.attention_with_kvcache(device_q, device_k, device_v, cache_seqlens=lengths,
                                                    block_table=table, causal=True, return_lse=True)
        assert_matches(out.get(), lse.get(), want_out, want_lse, 4e-3)
    assert len(_validate._VERDICTS) == 2  # the arguments' form, and the lengths' and table's verdict
    # sequence 0's first page moved to a spare page id, in the table changed in place
    spare = sorted(set(range(pages_k.shape[0])) - set(table.ravel()))[0]
    device_k[spare], device_v[spare] = device_k[table[0, 0]], device_v[table[0, 0]]
    device_k[table[0, 0]] = device_v[table[0, 0]] = cp.nan
    table[0, 0] = spare
    out, lse = cupyflash.attention_with_kvcache(device_q, device_k, device_v, cache_seqlens=lengths, block_table=table,
                                                causal=True, return_lse=True)
    assert_matches(out.get(), lse.get(), want_out, want_lse, 4e-3)
    table[1, 0] = pages_k.shape[0]
    with pytest.raises(ValueError, match=re.escape("block_table[1, 0] must be a page id")):
        cupyflash.attention_with_kvcache(device_q, device_k, device_v, cache_seqlens=lengths, block_table=table)


@pytest.mark.gpu
def test_each_call_reads_its_own_caches():
    """The decode keeps what it builds per pair of caches (on Hopper, their tensor maps): the layers of a
    decoding loop, caches alike in everything but their data, alternate and each reads its own."""
    cp = pytest.importorskip("cupy")
    layers = [problem(seed, [200, 37], None, seqlen_q=1, nheads=8, nheads_kv=2, headdim=128, dtype=BFLOAT16)
              for seed in (11, 12)]
    wants = [cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True)
             for q, k_cache, v_cache, _, _, lengths in layers]
    device = [[cp.asarray(bits(x)).view(x.dtype) for x in layer[:3]] for layer in layers]
    for i in (0, 1, 0, 1):
        out, lse = cupyflash.attention_with_kvcache(*device[i], cache_seqlens=layers[i][5], return_lse=True)
        assert_matches(out.view(np.uint16).get().view(BFLOAT16), lse.get(), *wants[i], 3e-2)


@pytest.mark.gpu
def test_split_partials_are_kept_per_stream():
    """The splits' partial outputs live in one buffer per stream, grown to the largest call: calls of two
    streams, queued without a synchronisation so that their kernels may overlap, each give what they give
    alone, and so does a call after a larger one grew the buffer."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend

    def case(seed, seqlen, splits):
        q, k_cache, v_cache, _, _, lengths = problem(seed, [seqlen], None, seqlen_q=1, nheads=8, nheads_kv=2,
                                                     headdim=128, dtype=BFLOAT16)
        want = cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True)
        return [cp.asarray(bits(x)).view(x.dtype) for x in (q, k_cache, v_cache)], lengths, splits, want

    def call(arrays, lengths, splits, want):
        return cupyflash.attention_with_kvcache(*arrays, cache_seqlens=lengths, num_splits=splits, return_lse=True)

    small, large = case(21, 700, 3), case(22, 3000, 20)  # the large one's splits take more room
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    got = []
    for _ in range(3):
        for stream, one in zip(streams, (small, large)):
            with stream:
                got.append(call(*one))
    for stream in streams:
        stream.synchronize()
    assert len({key[1] for key in _cuda_backend._DECODE_WORKSPACES}) >= 2  # a buffer per stream
    with streams[0]:  # the small call's stream grows its buffer for the large call, then runs the small one again
        got += [call(*large), call(*small)]
    streams[0].synchronize()
    wants = [small[-1], large[-1]] * 3 + [large[-1], small[-1]]
    for (out, lse), want in zip(got, wants):
        assert_matches(out.view(np.uint16).get().view(BFLOAT16), lse.get(), *want, 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
def test_lengths_and_page_table_may_stay_on_the_host(dtype):
    """With CuPy arrays, NumPy cache_seqlens and block_table (checked without a device read) give bit for
    bit what CuPy ones give, for the append and the attention; lengths all equal or not."""
    cp = pytest.importorskip("cupy")
    for cache_seqlens in ([40, 40, 40], [0, 129, 40]):
        q, k_cache, v_cache, k, v, lengths = problem(4, cache_seqlens, 2, seqlen_q=2, nheads=4, nheads_kv=2,
                                                     headdim=64, dtype=dtype)
        k_cache, v_cache, block_table = paged(k_cache, v_cache, 16, 4)
        results = []
        for host in (False, True):
            caches = [cp.asarray(bits(x)).view(x.dtype) for x in (k_cache, v_cache)]
            meta = (lengths, block_table) if host else (cp.asarray(lengths), cp.asarray(block_table))
            out, lse = cupyflash.attention_with_kvcache(cp.asarray(q), *caches, cp.asarray(k), cp.asarray(v),
                                                        cache_seqlens=meta[0], block_table=meta[1], causal=True,
                                                        return_lse=True)
            results.append([x.view(_UINT[x.dtype.itemsize]).get() for x in (out, lse, *caches)])
        for on_device, on_host in zip(*results):
            assert np.array_equal(on_device, on_host)


def test_the_reference_writes_nothing():
    q, k_cache, v_cache, k, v, lengths = problem(2, [3, 0], 2)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, 2, 2)
    for caches, table in (((k_cache, v_cache), None), ((k_paged, v_paged), block_table)):
        before = [bits(c).copy() for c in caches]
        cupyflash.reference.attention_with_kvcache(q, *caches, k, v, cache_seqlens=lengths, block_table=table)
        assert all(np.array_equal(bits(c), b) for c, b in zip(caches, before))


@settings(max_examples=30)
@given(cache_seqlens=st.lists(st.integers(0, 30), min_size=1, max_size=4), seqlen_new=st.integers(0, 4),
       page_size=st.sampled_from([1, 2, 5, 16, 64]), variant=st.sampled_from(range(len(VARIANTS))),
       num_splits=st.sampled_from([1, 3]), seed=st.integers(0, 2**32 - 1))
def test_paged_equals_contiguous(cache_seqlens, seqlen_new, page_size, variant, num_splits, seed):
    q, k_cache, v_cache, k, v, lengths = problem(seed, cache_seqlens, seqlen_new, spare_rows=3)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, page_size, seed)
    kw = dict(cache_seqlens=lengths, return_lse=True, num_splits=num_splits, **fitted(VARIANTS[variant], np.float32))
    out, lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, **kw)
    out_paged, lse_paged = cupyflash.attention_with_kvcache(q, k_paged, v_paged, k, v, block_table=block_table, **kw)
    # the same keys reach the same dense passes: bit for bit
    assert np.array_equal(bits(out_paged), bits(out)) and np.array_equal(bits(lse_paged), bits(lse))
    # and both caches now hold the same rows where each sequence's positions live
    per_seq = block_table.shape[1]
    for cache, pages in ((k_cache, k_paged), (v_cache, v_paged)):
        unpaged = pages[block_table].reshape(len(cache_seqlens), per_seq * page_size, *pages.shape[2:])
        assert np.array_equal(bits(unpaged[:, :cache.shape[1]]), bits(cache))


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window_size=(4, -1), alibi_slopes=SLOPES)])
def test_rows_past_the_keys_and_unused_pages_never_reach_the_output(page_size, kw):
    clean = problem(3, [6, 1, 0], 2, spare_rows=5)
    q, k_cache, v_cache, k, v, lengths = clean
    zeroed = [np.nan_to_num(c, nan=0.0) for c in (k_cache, v_cache)]
    block_table = table_zeroed = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, 3)  # NaN tails and NaN spare pages
        zeroed[0], zeroed[1], table_zeroed = paged(*zeroed, page_size, 3)
    out = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=block_table,
                                           num_splits=2, **kw)
    want = cupyflash.attention_with_kvcache(q, *zeroed, k, v, cache_seqlens=lengths, block_table=table_zeroed,
                                            num_splits=2, **kw)
    assert np.isfinite(out).all()
    assert np.array_equal(out, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(5, 2), softcap=3.0),
                                dict(causal=True, window_size=(6, -1), alibi_slopes=SLOPES)])
def test_num_splits_leave_the_dense_path_unchanged(dtype, kw):
    """num_splits cuts the decode kernels' keys; the dense path (here the NumPy backend's) runs each sequence's
    keys whole, with every num_splits the same bits, and those match the reference."""
    q, k_cache, v_cache, k, v, lengths = problem(4, [0, 4, 37], 1, seqlen_q=4, dtype=dtype)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, 3, 4)
    want_out, want_lse = concatenated_reference(q, k_cache, v_cache, k, v, lengths, **kw)
    results = {}
    for num_splits in (0, 1, 2, 3, 7):
        caches = [c.copy() for c in (k_paged, v_paged)]
        results[num_splits] = cupyflash.attention_with_kvcache(q, *caches, k, v, cache_seqlens=lengths,
                                                               block_table=block_table, num_splits=num_splits,
                                                               return_lse=True, **kw)
    for num_splits, (out, lse) in results.items():
        assert_matches(out, lse, want_out, want_lse, 2e-5 if dtype == np.float32 else 1e-12)
        assert np.array_equal(out, results[0][0]) and np.array_equal(lse, results[0][1])


def dense_routes(monkeypatch):
    """Whether each packed pass of the KV cache's dense path since the call read the pages through the page table
    (Spec.block_table), in order."""
    from cupyflash import _kvcache

    routes, forward = [], _kvcache._varlen.forward

    def spy(backend, q, k, v, spec):
        routes.append(spec.block_table is not None)
        return forward(backend, q, k, v, spec)

    monkeypatch.setattr(_kvcache._varlen, "forward", spy)
    return routes


@pytest.mark.parametrize("page_size, leftpad", [(8, None), (16, [0, 0, 24, 8]), (64, [16, 0, 0, 8])])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(9, 2), softcap=3.0),
                                dict(causal=True, alibi_slopes=SLOPES, learnable_sink=SINKS)])
def test_pages_read_through_the_table_equal_pages_gathered(page_size, leftpad, kw, monkeypatch):
    """Where page sizes and first keys are whole boxes of _plan.PAGE_BOX_ROWS rows (here 8), the dense path reads a
    paged cache's keys through its page table (Spec.block_table; here the NumPy backend's twin of the Hopper
    forward's boxes); gathered (a box that divides no page), the same bits, and both match the reference."""
    q, k_cache, v_cache, k, v, lengths = problem(23, [30, 0, 85, 12], 1, seqlen_q=4)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, page_size, 23)
    pad = None if leftpad is None else np.array(leftpad, np.int32)
    args = dict(cache_seqlens=lengths, block_table=block_table, cache_leftpad=pad, return_lse=True, **kw)
    routes = dense_routes(monkeypatch)
    monkeypatch.setattr(_plan, "PAGE_BOX_ROWS", 8)
    got = cupyflash.attention_with_kvcache(q, k_paged.copy(), v_paged.copy(), k, v, **args)
    monkeypatch.setattr(_plan, "PAGE_BOX_ROWS", 5)
    gathered = cupyflash.attention_with_kvcache(q, k_paged.copy(), v_paged.copy(), k, v, **args)
    assert routes == [True, False]
    assert all(np.array_equal(bits(a), bits(b)) for a, b in zip(got, gathered))
    want = cupyflash.reference.attention_with_kvcache(q, k_paged.copy(), v_paged.copy(), k, v, **args)
    assert_matches(*got, *want, 2e-5)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.float64])
def test_gathered_pages_are_the_pages_bit_for_bit(dtype):
    """_kvcache._gathered copies whole pages as 8-byte words where each page's bytes are contiguous and aligned,
    else element by element (a strided cache, pages of an odd byte count, an address off 8 bytes): the rows of
    cache[index] either way, NaN payloads and signed zeros included."""
    from cupyflash import _kvcache

    rng = np.random.default_rng(8)
    uint = _UINT[np.dtype(dtype).itemsize]

    def raw(shape):  # every bit pattern, NaNs of any payload among them
        return rng.integers(0, np.iinfo(uint).max, shape, dtype=uint, endpoint=True).view(dtype)

    wide = raw((9, 4, 2, 16))
    caches = [wide, wide[..., ::2], raw((9, 3, 1, 1)), raw(9 * 4 * 2 * 8 + 1)[1:].reshape(9, 4, 2, 8)]
    index = np.array([7, 0, 3, 3, 8])
    for cache in caches:
        want = cache[index].reshape(len(index) * cache.shape[1], *cache.shape[2:])
        assert np.array_equal(bits(_kvcache._gathered(cache, index)), bits(want))


@pytest.mark.parametrize("leftpad", [None, [0, 0, 70, 9]])
def test_gathered_pages_in_groups_equal_one_gather(leftpad, monkeypatch):
    """A gather bound of a few pages splits the dense path's sequences into groups: the same bits (pages of 6
    rows, which the page table's boxes do not divide)."""
    from cupyflash import _kvcache

    q, k_cache, v_cache, k, v, lengths = problem(22, [30, 0, 85, 12], 1, seqlen_q=4)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, 6, 22)
    kw = dict(cache_seqlens=lengths, block_table=block_table, causal=True, return_lse=True,
              cache_leftpad=None if leftpad is None else np.array(leftpad, np.int32))
    want = cupyflash.attention_with_kvcache(q, k_paged.copy(), v_paged.copy(), k, v, **kw)
    monkeypatch.setattr(_kvcache, "_GATHER_BYTES", 5 * k_paged[:1].nbytes)
    got = cupyflash.attention_with_kvcache(q, k_paged.copy(), v_paged.copy(), k, v, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert np.isfinite(got[0]).all()


def test_keys_none_of_the_queries_see():
    q, k_cache, v_cache, _, _, _ = problem(5, [0, 3], None, seqlen_q=5)
    out, lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.array([0, 3], np.int32),
                                                causal=True, return_lse=True)
    # sequence 0 has no key at all; sequence 1's first two queries line up before its first key
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
    assert (out[1, :2] == 0).all() and np.isneginf(lse[1, :, :2]).all() and np.isfinite(lse[1, :, 2:]).all()


def test_cache_seqlens_none_int_and_array_agree():
    q, k_cache, v_cache, _, _, full = problem(6, [9, 9], None, spare_rows=0)  # every cache full
    k, v = (x[:, :2] for x in problem(7, [9, 9], None)[1:3])
    want = cupyflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=full)
    assert np.array_equal(cupyflash.attention_with_kvcache(q, k_cache, v_cache), want)
    assert np.array_equal(cupyflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=int(full[0])), want)
    caches = [c.copy() for c in (k_cache, v_cache)]
    want = cupyflash.attention_with_kvcache(q, *caches, k, v, cache_seqlens=np.array([5, 5], np.int32))
    assert np.array_equal(cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=np.int64(5)), want)


def test_a_read_only_cache_serves_calls_without_new_keys():
    q, k_cache, v_cache, _, _, lengths = problem(7, [4, 2], None)
    for cache in (k_cache, v_cache):
        cache.flags.writeable = False
    out = cupyflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    want, _ = concatenated_reference(q, k_cache, v_cache, None, None, lengths)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)


def test_only_the_pages_a_sequence_uses_need_valid_ids():
    q, k_cache, v_cache, k, v, lengths = problem(8, [2, 5], 1, spare_rows=6)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, 4, 8)
    want = cupyflash.attention_with_kvcache(q, k_paged.copy(), v_paged.copy(), k, v, cache_seqlens=lengths,
                                            block_table=block_table)
    block_table[0, 1:] = -7  # sequence 0 holds 3 keys: page 0 only
    block_table[1, 2:] = 10**6  # sequence 1 holds 6 keys: pages 0 and 1
    got = cupyflash.attention_with_kvcache(q, k_paged, v_paged, k, v, cache_seqlens=lengths, block_table=block_table)
    assert np.array_equal(got, want)


class FakeCupyArray:
    """Looks like a cupy.ndarray to the dispatcher (no GPU needed)."""

    __module__ = "cupy._fake"

    def __init__(self, x):
        self.shape, self.ndim, self.dtype = x.shape, x.ndim, x.dtype
        self.device = type("Device", (), {"id": 0})()


def bad_call_args(paged_cache, changes):
    """The arguments of a valid call (contiguous or paged cache), with ``changes`` applied (a
    callable change gets the arguments)."""
    q, k_cache, v_cache, k, v, lengths = problem(9, [3, 6], 2, spare_rows=1)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lengths, block_table=None)
    if paged_cache:
        args["k_cache"], args["v_cache"], args["block_table"] = paged(k_cache, v_cache, 4, 9)
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    return args


def _readonly(x):
    x = x.copy()
    x.flags.writeable = False
    return x


COS, SIN = (np.full((10, 4), x, np.float32) for x in (0.6, 0.8))  # rotary tables for bad_call_args' calls
BAD = [  # (paged, changes, exception, message)
    (False, dict(v=None), ValueError, "v must be given with k (both or neither), got None"),
    (False, dict(k=None), ValueError, "k must be given with v (both or neither), got None"),
    (False, dict(q=lambda a: a["q"][0]), ValueError,
     "q must have 4 dimensions (batch, seqlen_q, nheads, headdim), got 3 dimensions"),
    (False, dict(k_cache=lambda a: a["k_cache"][0]), ValueError,
     "k_cache must have 4 dimensions (batch, seqlen_cache, nheads_kv, headdim), got 3"),
    (True, dict(k_cache=lambda a: a["k_cache"][0], v_cache=lambda a: a["v_cache"][0]), ValueError,
     "k_cache must have 4 dimensions (num_blocks, page_size, nheads_kv, headdim) with block_table, got 3"),
    (False, dict(k=lambda a: a["k"][0]), ValueError,
     "k must have 4 dimensions (batch, seqlen_new, nheads_kv, headdim)"),
    (False, dict(q=lambda a: a["q"].astype(np.int32)), TypeError,
     "q.dtype must be float16, bfloat16, float32 or float64, got int32"),
    (False, dict(k_cache=lambda a: a["k_cache"].astype(np.float64)), TypeError,
     "k_cache.dtype must equal q.dtype=float32, got float64"),
    (True, dict(v_cache=lambda a: a["v_cache"].astype(np.float16)), TypeError,
     "v_cache.dtype must equal q.dtype=float32, got float16"),
    (False, dict(k=lambda a: a["k"].astype(BFLOAT16)), TypeError, "k.dtype must equal q.dtype=float32, got bfloat16"),
    (False, dict(v=lambda a: a["v"].astype(np.float64)), TypeError, "v.dtype must equal q.dtype=float32, got float64"),
    (False, dict(v=lambda a: a["v"][:, :1]), ValueError, "v.shape[1] (seqlen_new) must equal k.shape[1]=2, got 1"),
    (False, dict(k=lambda a: a["k"][:1], v=lambda a: a["v"][:1]), ValueError,
     "k.shape[0] (batch) must equal q.shape[0]=2, got 1"),
    (False, dict(k=lambda a: a["k"][:, :, :1]), ValueError,
     "k.shape[2] (nheads_kv) must equal k_cache.shape[2]=2, got 1"),
    (False, dict(v=lambda a: a["v"][..., :8]), ValueError, "v.shape[3] (headdim) must equal q.shape[3]=16, got 8"),
    (False, dict(k_cache=lambda a: a["k_cache"][:, :, :, :8]), ValueError,
     "k_cache.shape[3] (headdim) must equal q.shape[3]=16, got 8"),
    (False, dict(v_cache=lambda a: a["v_cache"][:, :5]), ValueError,
     "v_cache.shape must equal k_cache.shape=(2, 9, 2, 16), got (2, 5, 2, 16)"),
    (False, dict(k_cache=lambda a: np.repeat(a["k_cache"][:, :, :1], 3, 2),
                 v_cache=lambda a: np.repeat(a["v_cache"][:, :, :1], 3, 2), k=None, v=None), ValueError,
     "k_cache.shape[2] (nheads_kv) must divide q.shape[2] (nheads)=4, got 3"),
    (False, dict(k_cache=lambda a: a["k_cache"][:1], v_cache=lambda a: a["v_cache"][:1]), ValueError,
     "k_cache.shape[0] (batch) must equal q.shape[0]=2, got 1"),
    (True, dict(block_table=lambda a: a["block_table"].astype(np.int64)), TypeError,
     "block_table.dtype must be int32, got int64"),
    (True, dict(block_table=lambda a: a["block_table"][:1]), ValueError,
     "block_table.shape must be (batch=2, max_blocks_per_seq), got (1, 3)"),
    (True, dict(block_table=lambda a: a["block_table"][0]), ValueError,
     "block_table.shape must be (batch=2, max_blocks_per_seq), got (3,)"),
    (True, dict(block_table=lambda a: np.where(np.arange(3) == 1, 9, a["block_table"]).astype(np.int32)), ValueError,
     "block_table[0, 1] must be a page id in [0, num_blocks=9) (sequence 0 uses 2 pages), got 9"),
    (True, dict(block_table=lambda a: np.where(np.arange(3) == 0, -1, a["block_table"]).astype(np.int32)), ValueError,
     "block_table[0, 0] must be a page id in [0, num_blocks=9) (sequence 0 uses 2 pages), got -1"),
    (True, dict(block_table=lambda a: a["block_table"][:, :1]), ValueError,
     "cache_seqlens[0] + seqlen_new must be at most the cache's capacity per sequence, "
     "max_blocks_per_seq * page_size = 1 * 4 = 4, got 3 + 2 = 5"),
    (False, dict(cache_seqlens=np.array([3, 8], np.int32)), ValueError,
     "cache_seqlens[1] + seqlen_new must be at most the cache's capacity per sequence, seqlen_cache = 9, "
     "got 8 + 2 = 10"),
    (False, dict(cache_seqlens=8), ValueError,
     "cache_seqlens + seqlen_new must be at most the cache's capacity per sequence, seqlen_cache = 9, got 8 + 2 = 10"),
    (False, dict(cache_seqlens=None), ValueError, "cache_seqlens must be given with k and v (None means every cache "
     "is full, 9 keys, leaving no room for seqlen_new=2), got None"),
    (False, dict(cache_seqlens=np.array([3, -1], np.int32)), ValueError, "cache_seqlens[1] must be >= 0, got -1"),
    (False, dict(cache_seqlens=-2), ValueError, "cache_seqlens must be >= 0, got -2"),
    (False, dict(cache_seqlens=np.array([3, 6])), TypeError, "cache_seqlens.dtype must be int32, got int64"),
    (False, dict(cache_seqlens=np.array([3, 6, 1], np.int32)), ValueError,
     "cache_seqlens.shape must be (batch,)=(2,), got (3,)"),
    (False, dict(cache_seqlens=np.array(3, np.int32)), ValueError, "cache_seqlens.shape must be (batch,)=(2,), got ()"),
    (False, dict(cache_seqlens=[3, 6]), TypeError, "cache_seqlens must be None, an int or an int32 array (batch,), "
     "got list"),
    (False, dict(cache_seqlens=3.0), TypeError, "cache_seqlens must be None, an int or an int32 array"),
    (False, dict(cache_seqlens=True), TypeError, "cache_seqlens must be None, an int or an int32 array"),
    (False, dict(num_splits=-1), ValueError, "num_splits must be >= 0 (0 = automatic), got -1"),
    (False, dict(num_splits=2.0), TypeError, "num_splits must be an int >= 0 (0 = automatic), got 2.0"),
    (False, dict(num_splits=True), TypeError, "num_splits must be an int >= 0"),
    (False, dict(causal=1), TypeError, "causal must be a bool, got 1"),
    (False, dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    (False, dict(scale=0.0), ValueError, "scale must be a finite positive real number"),
    (False, dict(window_size=(-2, 0)), ValueError, "window_size[0] must be >= -1"),
    (False, dict(softcap=-1.0), ValueError, "softcap must be a finite real number >= 0"),
    (False, dict(alibi_slopes=SLOPES.astype(np.float64)), TypeError, "alibi_slopes.dtype must be float32"),
    (False, dict(alibi_slopes=SLOPES[:3]), ValueError, "alibi_slopes.shape must be (nheads,)=(4,) or (batch, nheads)"),
    (False, dict(k=lambda a: FakeCupyArray(a["k"])), TypeError,
     "k must be a numpy array like q (NumPy and CuPy arrays cannot be mixed), got a cupy array"),
    (False, dict(cache_seqlens=lambda a: FakeCupyArray(a["cache_seqlens"])), TypeError,
     "cache_seqlens must be a numpy array like q (NumPy and CuPy arrays cannot be mixed), got a cupy array"),
    (True, dict(block_table=lambda a: FakeCupyArray(a["block_table"])), TypeError,
     "block_table must be a numpy array like q (NumPy and CuPy arrays cannot be mixed), got a cupy array"),
    (False, dict(alibi_slopes=FakeCupyArray(SLOPES)), TypeError,
     "alibi_slopes must be a numpy array like q (NumPy and CuPy arrays cannot be mixed)"),
    (False, dict(block_table=[[0]]), TypeError, "block_table must be a numpy.ndarray or cupy.ndarray, got list"),
    (False, dict(rotary_cos=COS), ValueError, "rotary_sin must be given with rotary_cos (both or neither), got None"),
    (False, dict(rotary_sin=SIN), ValueError, "rotary_cos must be given with rotary_sin (both or neither), got None"),
    (False, dict(rotary_cos=COS, rotary_sin=SIN, k=None, v=None), ValueError,
     "rotary_cos needs the new keys k and v, which it rotates before the append, got None"),
    (False, dict(rotary_cos=COS[0], rotary_sin=SIN), ValueError,
     "rotary_cos must have 2 dimensions (seqlen_ro, rotary_dim / 2), got 1 dimensions with shape (4,)"),
    (False, dict(rotary_cos=COS, rotary_sin=SIN.astype(np.float64)), TypeError,
     "rotary_sin.dtype must equal q.dtype=float32, got float64"),
    (False, dict(rotary_cos=COS, rotary_sin=SIN[:, :3]), ValueError,
     "rotary_sin.shape must equal rotary_cos.shape=(10, 4), got (10, 3)"),
    (False, dict(rotary_cos=np.ones((10, 9), np.float32), rotary_sin=np.zeros((10, 9), np.float32)), ValueError,
     "rotary_cos.shape[1] (rotary_dim / 2) must be between 1 and headdim / 2 = 8, got 9"),
    (False, dict(rotary_cos=COS[:8], rotary_sin=SIN[:8]), ValueError,
     "rotary_cos.shape[0] (seqlen_ro) must be at least the positions it rotates, seqlen_cache = 9, got 8"),
    (True, dict(rotary_cos=COS, rotary_sin=SIN), ValueError,
     "rotary_cos.shape[0] (seqlen_ro) must be at least the positions it rotates, max_blocks_per_seq * page_size = "
     "3 * 4 = 12, got 10"),
    (False, dict(rotary_cos=COS[:9], rotary_sin=SIN[:9], causal=True), ValueError,
     "rotary_cos.shape[0] (seqlen_ro) must be at least the positions it rotates, seqlen_cache + seqlen_q - "
     "seqlen_new = 9 + 1 = 10, got 9"),
    (False, dict(rotary_cos=COS, rotary_sin=SIN, rotary_interleaved=1), TypeError,
     "rotary_interleaved must be a bool, got 1"),
    (False, dict(rotary_cos=FakeCupyArray(COS), rotary_sin=SIN), TypeError,
     "rotary_cos must be a numpy array like q (NumPy and CuPy arrays cannot be mixed), got a cupy array"),
    (True, dict(cache_batch_idx=np.array([1, 0], np.int32)), ValueError,
     "cache_batch_idx must be None with block_table (a paged cache's table names each sequence's pages), "
     "got an array"),
    (False, dict(cache_batch_idx=np.array([1, 0])), TypeError, "cache_batch_idx.dtype must be int32, got int64"),
    (False, dict(cache_batch_idx=np.array([1, 0, 2], np.int32)), ValueError,
     "cache_batch_idx.shape must be (batch,)=(2,), got (3,)"),
    (False, dict(cache_batch_idx=np.array([1, 2], np.int32)), ValueError,
     "cache_batch_idx[1] must be an index in [0, k_cache.shape[0]=2), got 2"),
    (False, dict(cache_batch_idx=np.array([-1, 0], np.int32), cache_seqlens=3), ValueError,
     "cache_batch_idx[0] must be an index in [0, k_cache.shape[0]=2), got -1"),
    (False, dict(cache_batch_idx=lambda a: FakeCupyArray(np.array([1, 0], np.int32))), TypeError,
     "cache_batch_idx must be a numpy array like q (NumPy and CuPy arrays cannot be mixed), got a cupy array"),
    (False, dict(cache_leftpad=np.array([1, 0])), TypeError, "cache_leftpad.dtype must be int32, got int64"),
    (False, dict(cache_leftpad=np.array([1], np.int32)), ValueError,
     "cache_leftpad.shape must be (batch,)=(2,), got (1,)"),
    (False, dict(cache_leftpad=np.array([1, 7], np.int32)), ValueError,
     "cache_leftpad[1] must be between 0 and cache_seqlens[1]=6, got 7"),
    (False, dict(cache_leftpad=np.array([-1, 0], np.int32)), ValueError,
     "cache_leftpad[0] must be between 0 and cache_seqlens[0]=3, got -1"),
    (False, dict(cache_leftpad=lambda a: FakeCupyArray(np.array([1, 0], np.int32))), TypeError,
     "cache_leftpad must be a numpy array like q (NumPy and CuPy arrays cannot be mixed), got a cupy array"),
    (False, dict(k_cache=lambda a: _readonly(a["k_cache"])), ValueError,
     "k_cache must be writeable (k and v are appended to it in place), got a read-only array"),
    (True, dict(v_cache=lambda a: _readonly(a["v_cache"])), ValueError, "v_cache must be writeable"),
]


@pytest.mark.parametrize("paged_cache, changes, exc, message", BAD)
def test_bad_arguments_raise_before_anything_is_written(paged_cache, changes, exc, message):
    args = bad_call_args(paged_cache, changes)
    caches = [args[name] for name in ("k_cache", "v_cache") if isinstance(args[name], np.ndarray)]
    before = [bits(cache).copy() for cache in caches]
    with pytest.raises(exc, match=re.escape(f"attention_with_kvcache: {message}")):
        cupyflash.attention_with_kvcache(**args)
    assert all(np.array_equal(bits(cache), b) for cache, b in zip(caches, before))


@pytest.mark.parametrize("paged_cache, changes, exc, message",
                         [bad for bad in BAD if "writeable" not in bad[3] and "mixed" not in bad[3]])
def test_the_reference_refuses_the_same_calls(paged_cache, changes, exc, message):
    with pytest.raises(exc, match=re.escape(f"reference.attention_with_kvcache: {message}")):
        cupyflash.reference.attention_with_kvcache(**bad_call_args(paged_cache, changes))


def to_device(x):
    """A NumPy array on the GPU bit for bit, bfloat16 included."""
    import cupy as cp

    return cp.asarray(bits(x)).view(x.dtype)


def to_host(x):
    return x.view(_UINT[x.dtype.itemsize]).get().view(x.dtype)


DECODE_TOL = {np.dtype(np.float16): 3e-3, BFLOAT16: 2e-2, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_device_matches(dev_caches, caches, out, lse, want_out, want_lse, dtype):
    """The device's caches are the NumPy backend's bit for bit; its outputs finite and within the decode's
    rounding of the NumPy backend's."""
    for got, want in zip(dev_caches, caches):
        assert np.array_equal(bits(to_host(got)), bits(want))
    got_out = to_host(out).astype(np.float64)
    assert np.isfinite(got_out).all()
    np.testing.assert_allclose(got_out, want_out.astype(np.float64), rtol=0, atol=DECODE_TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse.get(), want_lse, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cupy_matches_numpy(dtype, page_size, num_splits):
    cp = pytest.importorskip("cupy")

    q, k_cache, v_cache, k, v, lengths = problem(10, [0, 70, 129, 5], 2, seqlen_q=2, headdim=64, dtype=dtype)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, 10)
    kw = dict(causal=True, num_splits=num_splits, return_lse=True)
    dev_caches = [to_device(c) for c in (k_cache, v_cache)]
    out, lse = cupyflash.attention_with_kvcache(
        to_device(q), *dev_caches, to_device(k), to_device(v), cache_seqlens=cp.asarray(lengths),
        block_table=None if block_table is None else cp.asarray(block_table), alibi_slopes=cp.asarray(SLOPES), **kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                          block_table=block_table, alibi_slopes=SLOPES, **kw)
    for got, want in zip(dev_caches, (k_cache, v_cache)):  # the same rows appended, nothing else touched
        assert np.array_equal(bits(to_host(got)), bits(want))
    assert out.dtype == q.dtype and lse.dtype == np.float32
    tol = {np.dtype(np.float16): 3e-3, BFLOAT16: 2e-2, np.dtype(np.float32): 1e-5}[np.dtype(dtype)]
    got_out = to_host(out).astype(np.float64)
    assert np.isfinite(got_out).all()
    np.testing.assert_allclose(got_out, want_out.astype(np.float64), rtol=0, atol=tol)
    got_lse = lse.get()
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.float64])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("case", ["causal, paged, lengths on the device", "one length for all, contiguous"])
def test_rotary_cupy_matches_numpy(dtype, interleaved, case):
    """The device's rotated keys are the NumPy backend's bit for bit (rotate_row rounds as _rotate does); the
    outputs agree within the decode's rounding."""
    cp = pytest.importorskip("cupy")

    causal = case.startswith("causal")
    lengths = [0, 70, 129, 5] if causal else [37] * 4
    q, k_cache, v_cache, k, v, host_lengths = problem(11, lengths, 3, seqlen_q=3, headdim=64, dtype=dtype)
    block_table = None
    if causal:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, 16, 11)
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * 16
    tables = rotary_tables(11, capacity, 32, dtype)
    cos, sin = (t[:, :24] for t in tables)  # rotary_dim 48 of 64, tables with a row stride of 32
    kw = dict(rotary_interleaved=interleaved, causal=causal, return_lse=True)
    dev_caches = [to_device(c) for c in (k_cache, v_cache)]
    dev_lengths = cp.asarray(host_lengths) if causal else lengths[0]
    out, lse = cupyflash.attention_with_kvcache(
        to_device(q), *dev_caches, to_device(k), to_device(v), rotary_cos=to_device(tables[0])[:, :24],
        rotary_sin=to_device(tables[1])[:, :24],
        cache_seqlens=dev_lengths, block_table=None if block_table is None else cp.asarray(block_table), **kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
        cache_seqlens=host_lengths if causal else lengths[0], block_table=block_table, **kw)
    assert_device_matches(dev_caches, (k_cache, v_cache), out, lse, want_out, want_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("idx_on_device", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_cache_batch_idx_on_the_device(dtype, idx_on_device, rotary):
    """Entries of a larger cache picked by cache_batch_idx (the decode kernels' one-page table): the NumPy
    backend's rows bit for bit, its outputs within the decode's rounding."""
    cp = pytest.importorskip("cupy")

    q, k_cache, v_cache, k, v, lengths = problem(12, [0, 70, 129, 5], 1, seqlen_q=1, headdim=64, dtype=dtype)
    k_entries, v_entries, idx = entries(k_cache, v_cache, 12)
    kw = dict(causal=True, return_lse=True)
    if rotary:
        kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(12, k_cache.shape[1], 32, dtype)
    dev_caches = [to_device(c) for c in (k_entries, v_entries)]
    dev_kw = {name: to_device(x) if name.startswith("rotary") else x for name, x in kw.items()}
    out, lse = cupyflash.attention_with_kvcache(to_device(q), *dev_caches, to_device(k), to_device(v),
                                                cache_seqlens=cp.asarray(lengths),
                                                cache_batch_idx=cp.asarray(idx) if idx_on_device else idx, **dev_kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(q, k_entries, v_entries, k, v, cache_seqlens=lengths,
                                                          cache_batch_idx=idx, **kw)
    assert_device_matches(dev_caches, (k_entries, v_entries), out, lse, want_out, want_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("leftpad_on_device", [False, True])
@pytest.mark.parametrize("seqlen_q", [1, 9, DENSE_SEQLEN_Q])
def test_leftpad_on_the_device(dtype, page_size, leftpad_on_device, seqlen_q):
    """Keys from row cache_leftpad[b] on (NaN before it), in the decode kernels (one query row; nine, 18 rows
    per kv head in slabs) and in the dense kernels over each sequence's gathered rows (more rows per kv
    head than the decode kernels take): the NumPy backend's outputs within the decode's rounding, the same rows
    appended."""
    cp = pytest.importorskip("cupy")

    q, k_cache, v_cache, k, v, lengths = problem(13, [0, 70, 129, 40], 1, seqlen_q=seqlen_q, headdim=64, dtype=dtype)
    leftpad = np.array([0, 33, 100, 40], np.int32)
    for b, pad in enumerate(leftpad):
        k_cache[b, :pad] = v_cache[b, :pad] = np.nan
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, 13)
    kw = dict(causal=True, window_size=(50, -1), return_lse=True)
    dev_caches = [to_device(c) for c in (k_cache, v_cache)]
    out, lse = cupyflash.attention_with_kvcache(
        to_device(q), *dev_caches, to_device(k), to_device(v), cache_seqlens=cp.asarray(lengths),
        cache_leftpad=cp.asarray(leftpad) if leftpad_on_device else leftpad,
        block_table=None if block_table is None else cp.asarray(block_table), **kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                                          cache_leftpad=leftpad, block_table=block_table, **kw)
    assert_device_matches(dev_caches, (k_cache, v_cache), out, lse, want_out, want_lse, dtype)


def check_decode(dtype, kw, q, k_cache, v_cache, k, v, lengths, block_table, num_splits):
    """attention_with_kvcache on the device against the reference (NaN where the reference has NaN); its
    launches."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend

    want_out, want_lse = cupyflash.reference.attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=block_table, return_lse=True, **kw)
    device = [None if x is None else cp.asarray(bits(x)).view(x.dtype) for x in (q, k_cache, v_cache, k, v)]
    launches = []
    launch = _cuda_backend._launch
    _cuda_backend._launch = lambda lc, *a: (launches.append(lc), launch(lc, *a))
    try:
        out, lse = cupyflash.attention_with_kvcache(
            *device, cache_seqlens=cp.asarray(lengths), num_splits=num_splits, return_lse=True,
            block_table=None if block_table is None else cp.asarray(block_table),
            **{key: cp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in kw.items()})
    finally:
        _cuda_backend._launch = launch
    got = out.view(_UINT[out.dtype.itemsize]).get().view(out.dtype).astype(np.float64)
    tol = {np.dtype(np.float16): 4e-3, BFLOAT16: 3e-2, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}[
        np.dtype(dtype)]
    assert np.array_equal(np.isnan(got), np.isnan(want_out))
    np.testing.assert_allclose(got, want_out, rtol=0, atol=tol)
    got_lse = lse.get()
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=0, atol=1e-4)
    return launches


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_decode_kernel_matches_the_reference(dtype, variant):
    """Decoding shapes (GQA group x seqlen_q up to DECODE_MAX_ROWS rows per kv head, in slabs of 16 or 32) take
    the split-KV kernels, paged or not, over sequences of several tiles (one empty), with NaN past every length and
    in unused pages, for split counts from one to many and head dimensions from 8 to 256. On Hopper a 16-bit
    cache is read by TMA where its pages hold whole tiles of 16 keys from key 0 (contiguous: one page per
    sequence)."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend

    hopper = _cuda_backend._device_info(cp.cuda.Device().id)[1]
    kw = VARIANTS[variant]
    # two rows per kv head and query position: 18 rows are one slab of two mma tiles (the second of 2 rows) in
    # 16 bits, two slabs in float32; 64 rows two slabs or four; at headdim 256, 24 rows two slabs of one tile
    for page_size, num_splits, seqlen_q, headdim in ((None, 0, 1, 64), (64, 1, 2, 128), (48, 7, 1, 8),
                                                     (None, 100, 4, 256), (5, 3, 3, 96), (None, 0, 9, 64),
                                                     (16, 5, 32, 128), (None, 3, 12, 256)):
        q, k_cache, v_cache, k, v, lengths = problem(variant, [300, 0, 520, 129], 1, seqlen_q=seqlen_q,
                                                     headdim=headdim, dtype=dtype)
        block_table = None
        if page_size is not None:
            k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, variant)
        launches = check_decode(dtype, kw, q, k_cache, v_cache, k, v, lengths, block_table, num_splits)
        # the append, then one decode launch (the last split merges the splits)
        assert [lc.source for lc in launches] == ["decode.cu", "decode.cu" if np.dtype(dtype) == np.float32
                                                  else "decode_mma.cu"]
        if np.dtype(dtype) != np.float32:
            whole_tiles = page_size is None or (page_size % 16 == 0 and kw.get("window_size", (-1, -1))[0] < 0)
            tma = re.search(r", (true|false), \d+, Variant<", launches[-1].name).group(1) == "true"
            assert tma == (hopper and whole_tiles), launches[-1].name


@pytest.mark.gpu
@pytest.mark.parametrize("lengths_on_device", [False, True])
@pytest.mark.parametrize("page_size", [None, 64])
def test_a_steps_dense_passes_share_one_plan(lengths_on_device, page_size):
    """The dense passes of a decoding step's layers (the same lengths and page table, their own queries and
    caches) are planned once, and each reads its own arrays; the next step's lengths are planned anew."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend

    _cuda_backend._FORWARD_CALLS.clear()
    for step, step_lengths in enumerate(([300, 0, 129], [301, 1, 130])):
        for layer in (0, 1):
            q, k_cache, v_cache, _, _, lengths = problem(40 + 2 * step + layer, step_lengths, None,
                                                         seqlen_q=DENSE_SEQLEN_Q, headdim=64, dtype=BFLOAT16,
                                                         spare_rows=200 - step)  # every step's capacity alike
            table = None
            if page_size:
                k_cache, v_cache, table = paged(k_cache, v_cache, page_size, 7)  # one table for every call
            want_out, want_lse = cupyflash.reference.attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=lengths, block_table=table, causal=True, return_lse=True)
            out, lse = cupyflash.attention_with_kvcache(
                to_device(q), to_device(k_cache), to_device(v_cache), block_table=table, causal=True,
                cache_seqlens=cp.asarray(lengths) if lengths_on_device else lengths, return_lse=True)
            assert_matches(to_host(out), lse.get(), want_out, want_lse, 3e-2)
        assert len(_cuda_backend._FORWARD_CALLS) == step + 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BFLOAT16, np.float32, np.float64])
def test_the_dense_path_runs_every_sequence_in_one_launch(dtype, monkeypatch):
    """Past the decode kernels' rows (and for float64) the sequences run as one packed batch: over the cache's
    own rows (contiguous), over the pages through the page table (16-bit on Hopper), or over the pages holding
    keys, gathered (64-row pages, sequences of up to nine pages). With a gather bound of ten pages a gathered
    call runs in three groups, a launch of the forward each (sequences of 5 pages and 1, of 9, of 3). Each
    matches the reference."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend, _kvcache

    kw = dict(causal=True, window_size=(200, -1))
    q, k_cache, v_cache, k, v, lengths = problem(21, [300, 0, 520, 129], 1, seqlen_q=DENSE_SEQLEN_Q, headdim=64,
                                                 dtype=dtype)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, 64, 21)

    def forward_launches(k_cache, v_cache, block_table=None):
        launches = check_decode(dtype, kw, q, k_cache, v_cache, k, v, lengths, block_table, 0)
        return sum(lc.source.startswith("forward") for lc in launches)

    one_pass = forward_launches(k_cache, v_cache)
    assert one_pass in (1, 2)  # float32 on Hopper: the split operands' kernel and its gated fallback
    assert forward_launches(k_paged, v_paged, block_table) == one_pass
    monkeypatch.setattr(_kvcache, "_GATHER_BYTES", 10 * k_paged[:1].nbytes)
    through_table = dtype == BFLOAT16 and _cuda_backend._device_info(cp.cuda.Device().id)[1]
    assert forward_launches(k_paged, v_paged, block_table) == (1 if through_table else 3) * one_pass
    assert forward_launches(k_cache, v_cache) == one_pass  # in place: nothing gathered


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("page_size, leftpad, headdim, lengths, kw", [
    (64, None, 128, [300, 0, 520, 129], dict(causal=True)),
    (128, [0, 0, 128, 64], 64, [300, 0, 520, 129], dict(window_size=(200, 3), softcap=4.0)),
    (32, None, 256, [300, 0, 520, 129], dict(alibi_slopes=SLOPES, learnable_sink=SINKS)),
    (192, [64, 0, 0, 128], 64, [2300, 40, 2100, 2200], dict()),  # key tiles of 192 in boxes of 64 rows
    (96, [32, 0, 0, 96], 64, [2300, 40, 2100, 2200], dict(causal=True)),  # and in boxes of 32 rows
])
def test_the_hopper_forward_reads_pages_through_the_table(dtype, page_size, leftpad, headdim, lengths, kw, monkeypatch):
    """Past the decode kernels' rows, the Hopper forward reads a 16-bit paged cache through its page table in boxes
    within a page (the gcd of its key tile, the page size and the first keys), with NaN in the pages' rows past
    each length: it matches the reference, and the same call over the pages gathered, bit for bit."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend

    if not _cuda_backend._device_info(cp.cuda.Device().id)[1]:
        pytest.skip("the Hopper forward reads pages through the table; this device gathers them")
    q, k_cache, v_cache, k, v, lengths = problem(24, lengths, 1, seqlen_q=DENSE_SEQLEN_Q, headdim=headdim,
                                                 dtype=dtype)
    k_paged, v_paged, block_table = paged(k_cache, v_cache, page_size, 24)
    if leftpad is not None:
        kw = dict(kw, cache_leftpad=np.array(leftpad, np.int32))
    routes = dense_routes(monkeypatch)
    check_decode(dtype, kw, q, k_paged, v_paged, k, v, lengths, block_table, 0)

    def run():
        caches = [cp.asarray(bits(c)).view(c.dtype) for c in (k_paged, v_paged)]
        out, lse = cupyflash.attention_with_kvcache(
            cp.asarray(bits(q)).view(q.dtype), *caches, cp.asarray(bits(k)).view(k.dtype),
            cp.asarray(bits(v)).view(v.dtype), cache_seqlens=lengths, block_table=block_table, return_lse=True,
            **{key: cp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in kw.items()})
        return bits(out.view(_UINT[out.dtype.itemsize]).get()), lse.get()

    through_table = run()
    monkeypatch.setattr(_plan, "PAGE_BOX_ROWS", 31)
    gathered = run()
    assert routes == [True, True, False]
    assert all(np.array_equal(a, b) for a, b in zip(through_table, gathered))


@pytest.mark.gpu
@pytest.mark.long_running
@settings(max_examples=30)
@given(dtype=st.sampled_from([np.float16, BFLOAT16, np.float32]),
       cache_seqlens=st.lists(st.one_of(st.just(0), st.integers(1, 700)), min_size=1, max_size=4),
       seqlen_new=st.integers(0, 3), seqlen_q=st.one_of(st.integers(1, 4), st.integers(5, 20)),
       heads=st.sampled_from([(8, 1), (4, 2), (2, 2), (16, 4)]),
       headdim=st.sampled_from([8, 64, 100, 128, 256]), page_size=st.sampled_from([None, 1, 16, 40, 256]),
       num_splits=st.sampled_from([0, 1, 3, 50]), variant=st.sampled_from(range(len(VARIANTS))),
       seed=st.integers(0, 2**32 - 1))
def test_random_decodes_match_the_reference(dtype, cache_seqlens, seqlen_new, seqlen_q, heads, headdim, page_size,
                                            num_splits, variant, seed):
    """Drawn lengths (empty ones among them), appends, GQA groups, head dims, pages and split counts, on
    whichever kernel each decode takes."""
    nheads, nheads_kv = heads
    kw = fitted(VARIANTS[variant], dtype, nheads)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = np.random.default_rng(seed).uniform(0.01, 0.5, nheads).astype(np.float32)
    q, k_cache, v_cache, k, v, lengths = problem(seed, cache_seqlens, seqlen_new, seqlen_q=seqlen_q, nheads=nheads,
                                                 nheads_kv=nheads_kv, headdim=headdim, dtype=dtype)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = paged(k_cache, v_cache, page_size, seed)
    check_decode(dtype, kw, q, k_cache, v_cache, k, v, lengths, block_table, num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(5, 0)), dict(causal=True, window_size=(40, -1))])
def test_decode_hidden_nan_reaches_only_the_rows_that_see_it(dtype, kw):
    """With several query positions a key can be seen by some rows and hidden from others: NaN and inf in
    such a key's value (the newest key under causal, the band's first keys under a window) reach exactly
    the rows that see it."""
    cp = pytest.importorskip("cupy")
    q, k_cache, v_cache, _, _, lengths = problem(3, [200, 77], None, seqlen_q=4, nheads=8, nheads_kv=2,
                                                 headdim=128, dtype=dtype, spare_rows=0)
    for b, n in enumerate(lengths):
        v_cache[b, n - 1, :, 3] = np.nan  # hidden from the first query positions when causal
        v_cache[b, n - 43, :, 5] = np.inf  # at the left edge of the (40, -1) window's band
        v_cache[b, n - 8, :, 7] = -np.inf  # at the left edge of the (5, 0) window's band
    want_out, want_lse = cupyflash.reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                                    return_lse=True, **kw)
    out, lse = cupyflash.attention_with_kvcache(*(cp.asarray(x) for x in (q, k_cache, v_cache)),
                                                cache_seqlens=cp.asarray(lengths), return_lse=True, **kw)
    got = out.get().astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want_out))
    assert np.array_equal(np.isposinf(got), np.isposinf(want_out)) and np.array_equal(np.isneginf(got),
                                                                                        np.isneginf(want_out))
    seen = np.isfinite(want_out)
    tol = {np.dtype(np.float16): 4e-3, BFLOAT16: 3e-2, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}[
        np.dtype(dtype)]
    np.testing.assert_allclose(got[seen], want_out[seen], rtol=0, atol=tol)
    np.testing.assert_allclose(lse.get(), want_lse, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.float64])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("seqlen_q", [1, 9, DENSE_SEQLEN_Q])
def test_learnable_sink_on_the_device(dtype, num_splits, seqlen_q):
    """A learnable sink in the decode kernels (one query row, or 18 rows in slabs; split rows leave it to the
    merge), in the dense kernels over each sequence's gathered rows (more rows than the decode kernels take)
    and for float64 caches: the NumPy backend's outputs within the decode's rounding; the sequence with no key
    gives out 0 and lse the sink's logit."""
    cp = pytest.importorskip("cupy")

    q, k_cache, v_cache, _, _, lengths = problem(17, [0, 70, 129, 40], None, seqlen_q=seqlen_q, headdim=64, dtype=dtype)
    sinks = SINKS.astype(np.float64 if dtype == np.float64 else np.float32)[::-1]  # strided
    kw = dict(causal=True, num_splits=num_splits, return_lse=True)
    dev_caches = [to_device(c) for c in (k_cache, v_cache)]
    out, lse = cupyflash.attention_with_kvcache(to_device(q), *dev_caches, cache_seqlens=cp.asarray(lengths),
                                                learnable_sink=to_device(sinks), **kw)
    want_out, want_lse = cupyflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                          learnable_sink=sinks, **kw)
    assert_device_matches(dev_caches, (k_cache, v_cache), out, lse, want_out, want_lse, dtype)
    assert (to_host(out)[0] == 0).all()
    np.testing.assert_allclose(lse.get()[0], np.broadcast_to(sinks[:, None], (4, seqlen_q)), rtol=1e-6)

