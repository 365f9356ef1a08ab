"""The float64 reference itself: against a per-row loop and finite differences."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given, strategies as st

from cupyflash import reference
from helpers import Problem, problems

SMALL = dict(max_batch=2, max_seqlen=12, max_nheads=4, max_headdim=8)


def loop_attention(q, k, v, causal, scale):
    """One query row at a time, straight from the definition."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    out = np.zeros((b, sq, h, d))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                keys = [j for j in range(sk) if not (causal and j > i + sk - sq)]
                if not keys:
                    continue
                s = np.array([scale * np.dot(q[bi, i, hi], k[bi, j, hi // group]) for j in keys])
                m = s.max()
                w = np.exp(s - m)
                lse[bi, hi, i] = m + np.log(w.sum())
                out[bi, i, hi] = sum(wj * v[bi, j, hi // group] for wj, j in zip(w / w.sum(), keys))
    return out, lse


@given(problems(dtypes=[np.float64], **SMALL))
def test_reference_matches_row_loop(p):
    q, k, v, _ = p.arrays()
    out, lse = reference.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    out_l, lse_l = loop_attention(q, k, v, p.causal, p.scale_value)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, out_l, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_l))
    fin = np.isfinite(lse_l)
    np.testing.assert_allclose(lse[fin], lse_l[fin], rtol=1e-12, atol=1e-12)


@given(problems(dtypes=[np.float64], unit=True, **SMALL))
def test_reference_gradients_match_finite_differences(p):
    """Directional derivative of sum(dout * out) along random directions.

    Standard-normal data (scale up to 2) keeps f smooth at the step size.
    """
    q, k, v, dout = p.arrays()
    rng = np.random.default_rng(p.seed + 3)
    dirs = [rng.standard_normal(x.shape) for x in (q, k, v)]

    def f(q_, k_, v_):
        return float(np.sum(dout * reference.attention(q_, k_, v_, causal=p.causal, scale=p.scale)))

    out, lse = reference.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    grads = reference.attention_backward(dout, q, k, v, out, lse, causal=p.causal, scale=p.scale)
    # Central differences: truncation O(h^2), cancellation O(eps |f| / h).
    h = 1e-6
    for which in range(3):
        plus = [q, k, v]
        minus = [q, k, v]
        plus[which] = plus[which] + h * dirs[which]
        minus[which] = minus[which] - h * dirs[which]
        fd = (f(*plus) - f(*minus)) / (2 * h)
        an = float(np.sum(grads[which] * dirs[which]))
        mag = float(np.sum(np.abs(dout * out))) + 1.0  # scale of f's rounding
        assert abs(fd - an) <= 1e-6 * (abs(an) + mag), (which, fd, an)


def test_reference_fully_masked_rows_zero_without_nan():
    p = Problem(2, 9, 4, 2, 1, 5, np.float64, True, None, None, 1)
    q, k, v, dout = p.arrays()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
        dq, dk, dv = reference.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert (out[:, :5] == 0).all() and np.isneginf(lse[:, :, :5]).all()
    assert np.isfinite(lse[:, :, 5:]).all()
    assert (dq[:, :5] == 0).all()
    for x in (out, dq, dk, dv):
        assert np.isfinite(x).all()


def test_reference_accepts_low_precision_and_returns_float64():
    import ml_dtypes

    p = Problem(1, 5, 6, 2, 2, 4, ml_dtypes.bfloat16, False, 0.3, None, 2)
    q, k, v, dout = p.arrays()
    out, lse = reference.attention(q, k, v, scale=0.3, return_lse=True)
    grads = reference.attention_backward(dout, q, k, v, out, lse, scale=0.3)
    assert out.dtype == lse.dtype == np.float64
    assert all(g.dtype == np.float64 for g in grads)
    out64 = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), scale=0.3)
    np.testing.assert_array_equal(out, out64)


@given(st.integers(1, 5), st.integers(1, 5))
def test_causal_mask_is_bottom_right_aligned(seqlen_q, seqlen_k):
    mask = reference.causal_mask(seqlen_q, seqlen_k)
    # The last query sees every key; each earlier one sees one key fewer.
    assert not mask[-1].any()
    visible = (~mask).sum(axis=1)
    expected = np.clip(np.arange(seqlen_q) + seqlen_k - seqlen_q + 1, 0, seqlen_k)
    np.testing.assert_array_equal(visible, expected)
