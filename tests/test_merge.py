"""merge_attention: attentions over disjoint key sets combine into attention over their union."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from helpers import DTYPES, eps


def _parts(seqlen_k, cuts):
    edges = [0, *sorted(set(c % seqlen_k for c in cuts) - {0}), seqlen_k]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


def _split(q, k, v, parts, **kw):
    """Attention of q over each part of the keys; masks and the causal band move with the keys."""
    sq, sk = q.shape[1], k.shape[1]
    seen = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq) if kw.pop("causal", False) else None
    outs, lses = [], []
    for s in parts:
        mask = None if seen is None else seen[:, s]
        out, lse = cupyflash.attention(q, k[:, s], v[:, s], return_lse=True, attn_mask=mask, **kw)
        outs.append(out)
        lses.append(lse)
    return outs, lses


@settings(max_examples=60)
@given(dtype=st.sampled_from(DTYPES), seqlen_q=st.integers(1, 40), seqlen_k=st.integers(1, 90),
       cuts=st.lists(st.integers(0, 200), max_size=5), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_any_partition_of_the_keys_gives_full_attention(dtype, seqlen_q, seqlen_k, cuts, causal, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, seqlen_q, 4, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, seqlen_k, 2, 16)).astype(dtype) for _ in range(2))
    full, full_lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
    outs, lses = _split(q, k, v, _parts(seqlen_k, cuts), causal=causal)
    out, lse = cupyflash.merge_attention(outs, lses)
    assert out.dtype == full.dtype and lse.dtype == full_lse.dtype
    # each part rounds its out to the input dtype once: a few units of it
    tol = 8 * eps(dtype) * max(1.0, float(np.abs(v.astype(np.float64)).max()))
    np.testing.assert_allclose(out.astype(np.float64), full.astype(np.float64), rtol=0, atol=tol)
    np.testing.assert_allclose(lse, full_lse, rtol=0, atol=1e-5 if dtype != np.float64 else 1e-12)
    ref_out, ref_lse = cupyflash.reference.merge_attention(outs, lses)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=0, atol=tol)


def test_rows_no_part_saw_and_nan():
    out = np.ones((1, 3, 1, 2), np.float32)
    lse = np.array([[[-np.inf, 0.0, np.nan]]], np.float32)
    merged, merged_lse = cupyflash.merge_attention([out, 2 * out], [lse, lse])
    assert (merged[0, 0] == 0).all() and np.isneginf(merged_lse[0, 0, 0])
    assert np.allclose(merged[0, 1], 1.5) and np.isclose(merged_lse[0, 0, 1], np.log(2))
    assert np.isnan(merged[0, 2]).all() and np.isnan(merged_lse[0, 0, 2])


def test_layout_bhsd():
    rng = np.random.default_rng(1)
    outs = [rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3)]
    lses = [rng.standard_normal((2, 3, 5)).astype(np.float32) for _ in range(3)]
    a, la = cupyflash.merge_attention(outs, lses)
    b, lb = cupyflash.merge_attention([x.swapaxes(1, 2) for x in outs], lses, layout="bhsd")
    np.testing.assert_allclose(b.swapaxes(1, 2), a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lb, la, rtol=1e-6)


@pytest.mark.parametrize("outs, lses, exc, pattern", [
    ([], [], TypeError, r"merge_attention: outs must be a non-empty sequence of arrays"),
    ([np.zeros((1, 2, 1, 4), np.float32)], [], ValueError, r"lses must be a sequence of 1 arrays, one per out, got 0"),
    ([np.zeros((1, 2, 1, 4), np.float32)], [np.zeros((1, 2, 1), np.float32)], ValueError,
     r"lses\[0\].shape must be \(batch, nheads, seqlen_q\)=\(1, 1, 2\), got \(1, 2, 1\)"),
    ([np.zeros((1, 2, 1, 4), np.float32)], [np.zeros((1, 1, 2), np.float64)], TypeError,
     r"lses\[0\].dtype must be float32 for float32 outputs, got float64"),
    ([np.zeros((1, 2, 1, 4), np.float32), np.zeros((1, 3, 1, 4), np.float32)],
     [np.zeros((1, 1, 2), np.float32)] * 2, ValueError, r"outs\[1\].shape must equal outs\[0\].shape"),
])
def test_bad_arguments(outs, lses, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cupyflash.merge_attention(outs, lses)


@pytest.mark.gpu
def test_merge_on_the_gpu_matches_numpy():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(2)
    outs = [rng.standard_normal((2, 70, 4, 64)).astype(np.float32) for _ in range(3)]
    lses = [rng.standard_normal((2, 4, 70)).astype(np.float32) * 5 for _ in range(3)]
    lses[1][0, 0, :5] = -np.inf
    want, want_lse = cupyflash.merge_attention(outs, lses)
    got, got_lse = cupyflash.merge_attention([cp.asarray(x) for x in outs], [cp.asarray(x) for x in lses])
    np.testing.assert_allclose(got.get(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_lse.get(), want_lse, rtol=1e-6, atol=1e-6)
