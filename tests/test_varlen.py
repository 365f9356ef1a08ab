"""Packed variable-length batches (cu_seqlens): each sequence as if run alone, every variant per
sequence, nothing crossing between sequences, and the argument errors."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from cupyflash import _philox


def packed(lens_q, lens_k, dtype, seed, nheads=4, nheads_kv=2, headdim=16):
    rng = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, dout = (rng.standard_normal((cu_q[-1], nheads, headdim)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((cu_k[-1], nheads_kv, headdim)).astype(dtype) for _ in range(2))
    return cu_q, cu_k, q, k, v, dout


def alone(b, cu_q, cu_k, q, k, v, dout, kw):
    """The float64 reference of sequence b run by itself, with batch b's dropout bits and ALiBi row."""
    rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
    kw = dict(kw)
    if kw.get("alibi_slopes") is not None and kw["alibi_slopes"].ndim == 2:
        kw["alibi_slopes"] = kw["alibi_slopes"][b]
    if kw.get("dropout_p", 0) > 0:
        seed = kw.pop("dropout_seed")
        kw["dropout_mask"] = _philox.keep_mask((1, q.shape[1], rq.stop - rq.start, rk.stop - rk.start),
                                               kw["dropout_p"], seed, batch_offset=b)
    out, lse = cupyflash.reference.attention(q[None, rq], k[None, rk], v[None, rk], return_lse=True, **kw)
    grads = cupyflash.reference.attention_backward(dout[None, rq], q[None, rq], k[None, rk], v[None, rk], out, lse,
                                                   **kw)
    return rq, rk, out[0], lse[0], [g[0] for g in grads]


VARIANTS = [dict(), dict(causal=True), dict(window_size=(3, 2)), dict(softcap=4.0),
            dict(causal=True, dropout_p=0.3, dropout_seed=11)]


@settings(max_examples=40)
@given(lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=5),
       dtype=st.sampled_from([np.float32, np.float64]), variant=st.sampled_from(range(len(VARIANTS) + 1)),
       seed=st.integers(0, 2**32 - 1))
def test_each_sequence_as_if_alone(lens, dtype, variant, seed):
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    cu_q, cu_k, q, k, v, dout = packed(lens_q, lens_k, dtype, seed)
    kw = VARIANTS[variant] if variant < len(VARIANTS) else dict(
        alibi_slopes=np.random.default_rng(seed).uniform(0.05, 0.5, (len(lens), 4)).astype(np.float32))
    out, lse = cupyflash.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    ref_out, ref_lse = cupyflash.reference.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                                                     **kw)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for b in range(len(lens)):
        if lens_q[b] == 0:
            continue
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_k[b] == 0:
            assert (out[rq] == 0).all() and np.isneginf(lse[:, rq]).all() and (dq[rq] == 0).all()
            continue
        rq, rk, o, l, (gq, gk, gv) = alone(b, cu_q, cu_k, q, k, v, dout, kw)
        np.testing.assert_allclose(out[rq], o, rtol=0, atol=tol)
        np.testing.assert_allclose(ref_out[rq], o, rtol=0, atol=1e-12)
        finite = np.isfinite(l)
        np.testing.assert_allclose(lse[:, rq][finite], l[finite], rtol=0, atol=tol)
        np.testing.assert_allclose(ref_lse[:, rq][finite], l[finite], rtol=0, atol=1e-12)
        np.testing.assert_allclose(dq[rq], gq, rtol=0, atol=10 * tol)
        np.testing.assert_allclose(dk[rk], gk, rtol=0, atol=10 * tol)
        np.testing.assert_allclose(dv[rk], gv, rtol=0, atol=10 * tol)
    # keys of sequences that have no query rows get no gradient
    for b in range(len(lens)):
        if lens_q[b] == 0:
            rk = slice(cu_k[b], cu_k[b + 1])
            assert (dk[rk] == 0).all() and (dv[rk] == 0).all()


def test_nothing_crosses_between_sequences():
    cu_q, cu_k, q, k, v, dout = packed([5, 7, 3], [6, 4, 9], np.float32, 0)
    poisoned = [x.copy() for x in (q, k, v)]
    for x, cu in zip(poisoned, (cu_q, cu_k, cu_k)):
        x[cu[1]:cu[2]] = np.nan  # sequence 1 holds NaN everywhere
    out = cupyflash.attention(*poisoned, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    clean = cupyflash.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for rows in (slice(0, cu_q[1]), slice(cu_q[2], cu_q[3])):
        np.testing.assert_array_equal(out[rows], clean[rows])
    assert np.isnan(out[cu_q[1]:cu_q[2]]).all()


def _bad(exc, pattern, **kw):
    cu_q, cu_k, q, k, v, _ = packed([3, 4], [5, 2], np.float32, 1)
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(kw)
    with pytest.raises(exc, match=pattern):
        cupyflash.attention(args.pop("q", q), args.pop("k", k), args.pop("v", v), **args)


def test_bad_packed_arguments():
    _bad(ValueError, r"cu_seqlens_k must be given with the other cu_seqlens", cu_seqlens_k=None)
    _bad(TypeError, r"cu_seqlens_q.dtype must be int32, got int64", cu_seqlens_q=np.array([0, 3, 7]))
    _bad(ValueError, r"cu_seqlens_q\[0\] must be 0, got 1", cu_seqlens_q=np.array([1, 3, 7], np.int32))
    _bad(ValueError, r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[2\]=2 < cu_seqlens_q\[1\]=3",
         cu_seqlens_q=np.array([0, 3, 2], np.int32))
    _bad(ValueError, r"cu_seqlens_q\[-1\] must equal q.shape\[0\] \(total\)=7, got 6",
         cu_seqlens_q=np.array([0, 3, 6], np.int32))
    _bad(ValueError, r"cu_seqlens_k.shape must equal cu_seqlens_q.shape=\(3,\), got \(4,\)",
         cu_seqlens_k=np.array([0, 5, 7, 7], np.int32))
    _bad(ValueError, r"max_seqlen_q must be at least the longest sequence, 4, got 3", max_seqlen_q=3)
    _bad(ValueError, r"max_seqlen_k must be at least 0, got -1", max_seqlen_k=-1)
    _bad(TypeError, r"max_seqlen_q must be an int, got 4.0", max_seqlen_q=4.0)
    _bad(ValueError, r"attn_mask must be None with cu_seqlens", attn_mask=np.ones((4, 5), bool))
    _bad(ValueError, re.escape("layout must be 'bshd' with cu_seqlens"), layout="bhsd")
    _bad(ValueError, r"q must have 3 dimensions \(total, nheads, headdim\) with cu_seqlens",
         q=np.zeros((1, 7, 4, 16), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_packed_on_the_gpu_matches_numpy(dtype):
    cp = pytest.importorskip("cupy")
    cu_q, cu_k, q, k, v, dout = packed([70, 0, 1, 130], [90, 5, 0, 129], np.dtype(dtype), 3, headdim=64)
    kw = dict(causal=True, softcap=8.0, dropout_p=0.2, dropout_seed=5,
              alibi_slopes=np.random.default_rng(0).uniform(0.05, 0.3, (4, 4)).astype(np.float32))
    host = cupyflash.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
    host_grads = cupyflash.attention_backward(dout, q, k, v, *host, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    dev = {name: cp.asarray(x) for name, x in kw.items() if isinstance(x, np.ndarray)}
    args = [cp.asarray(x) for x in (q, k, v)]
    cu = dict(cu_seqlens_q=cp.asarray(cu_q), cu_seqlens_k=cp.asarray(cu_k))
    out, lse = cupyflash.attention(*args, return_lse=True, **cu, **{**kw, **dev})
    grads = cupyflash.attention_backward(cp.asarray(dout), *args, out, lse, **cu, **{**kw, **dev})
    tol = 3e-3 if dtype == "float16" else 1e-5
    for got, want in zip((out, *grads), (host[0], *host_grads)):
        np.testing.assert_allclose(got.get().astype(np.float64), want.astype(np.float64), rtol=0, atol=tol)
    finite = np.isfinite(host[1])
    assert np.array_equal(np.isfinite(lse.get()), finite)
    np.testing.assert_allclose(lse.get()[finite], host[1][finite], rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_packed_outputs_on_the_inputs_device():
    """With the inputs on a second GPU while the first is current, every output is allocated beside them."""
    cp = pytest.importorskip("cupy")
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs a second GPU")
    rng = np.random.default_rng(3)
    cu = np.array([0, 5, 5, 19], np.int32)
    with cp.cuda.Device(1):
        q, k, v, dout = (cp.asarray(rng.standard_normal((19, 2, 32)).astype(np.float32)) for _ in range(4))
        cu_d = cp.asarray(cu)
    out, lse = cupyflash.attention(q, k, v, cu_seqlens_q=cu_d, cu_seqlens_k=cu_d, causal=True, return_lse=True)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_d, cu_seqlens_k=cu_d, causal=True)
    assert all(x.device.id == 1 for x in (out, lse, *grads))
    want = cupyflash.attention(*(x.get() for x in (q, k, v)), cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    np.testing.assert_allclose(out.get(), want, rtol=0, atol=1e-5)
