"""Tiled NumPy backend against the float64 reference (Hypothesis)."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import cupyflash
from cupyflash import _numpy_backend, reference
from helpers import (
    Problem,
    assert_close_flash_rule,
    eps,
    error_scales,
    flash_floor,
    FWD_FLOOR_ULPS,
    BWD_FLOOR_ULPS,
    naive_attention,
    naive_attention_backward,
    problems,
    check_relative,
    REL_BOUND,
    relative_error,
)

# Accuracy rule (flash-attn's): max|ours - ref| <= FACTOR x max|naive - ref|
# + floor, naive = same computation on the full matrix in the input dtype.
FWD_FACTOR = 2  # out, lse
BWD_FACTOR = 3  # dq, dk, dv
# Floors, in units of (eps_dtype + eps_compute * L) x magnitude-without-
# cancellation (see helpers.error_scales): the rounding every finite-
# precision attention must make, which the naive computation sometimes
# escapes by luck (one-hot softmax rows are exact in it). Sweeps of several
# thousand examples needed at most ~0.7 of a unit; 4 and 8 leave headroom
# without letting a real bug (errors of order 1 in P) through.
BIG_FP32 = Problem(1, 300, 300, 2, 1, 256, np.float32, True, None, None, 7)
BIG_FP32_NC = Problem(1, 300, 300, 2, 2, 256, np.float32, False, None, None, 8)


def _forward_all(p):
    q, k, v, dout = p.arrays()
    out, lse = cupyflash.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    return (q, k, v, dout), out, lse


@given(problems())
@example(BIG_FP32)
@example(BIG_FP32_NC)
def test_forward_matches_reference(p):
    (q, k, v, dout), out, lse = _forward_all(p)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (p.batch, p.nheads, p.seqlen_q)
    assert lse.dtype == (np.float64 if p.dtype == np.float64 else np.float32)
    ref_out, ref_lse = reference.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    naive_out, naive_lse = naive_attention(q, k, v, p.causal, p.scale_value)
    scales = error_scales(q, k, v, dout, p.causal, p.scale_value)
    assert not np.isnan(out).any()
    assert_close_flash_rule(out, ref_out, naive_out, FWD_FACTOR, flash_floor("out", p.dtype, scales, FWD_FLOOR_ULPS), "out")
    assert_close_flash_rule(lse, ref_lse, naive_lse, FWD_FACTOR, flash_floor("lse", p.dtype, scales, FWD_FLOOR_ULPS), "lse")
    check_relative("out", out, ref_out, p)
    check_relative("lse", lse, ref_lse, p)


@given(problems())
@example(BIG_FP32)
@example(BIG_FP32_NC)
def test_backward_matches_reference(p):
    (q, k, v, dout), out, lse = _forward_all(p)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=p.causal, scale=p.scale)
    refs = reference.attention_backward(dout, q, k, v, out, lse, causal=p.causal, scale=p.scale)
    naives = naive_attention_backward(dout, q, k, v, p.causal, p.scale_value)
    scales = error_scales(q, k, v, dout, p.causal, p.scale_value)
    for name, g, x, r, n in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, naives):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert not np.isnan(g).any(), name
        floor = flash_floor(name, p.dtype, scales, BWD_FLOOR_ULPS)
        assert_close_flash_rule(g, r, n, BWD_FACTOR, floor, name)
        check_relative(name, g, r, p)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relative_bound_headdim256_seqlen300(dtype, causal):
    """The norm-wise bounds hold at the largest drawn shape."""
    p = Problem(1, 300, 300, 2, 1, 256, dtype, causal, None, None, 11)
    (q, k, v, dout), out, lse = _forward_all(p)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    refs = reference.attention_backward(dout, q, k, v, out, lse, causal=causal)
    bound = REL_BOUND[np.dtype(dtype)]
    for name, ours, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, (ref_out, ref_lse) + refs):
        assert relative_error(ours, ref) <= bound, name


@given(problems(), st.data())
def test_gqa_equals_repeated_kv(p, data):
    """Query head h reads kv head h // group: same as repeating k/v heads."""
    q, k, v, dout = p.arrays()
    group = p.nheads // p.nheads_kv
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    out, lse = cupyflash.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    out_r, lse_r = cupyflash.attention(q, kr, vr, causal=p.causal, scale=p.scale, return_lse=True)
    np.testing.assert_array_equal(out, out_r)
    np.testing.assert_array_equal(lse, lse_r)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=p.causal, scale=p.scale)
    dq_r, dk_r, dv_r = cupyflash.attention_backward(dout, q, kr, vr, out_r, lse_r, causal=p.causal, scale=p.scale)
    np.testing.assert_array_equal(dq, dq_r)
    b, s, _, d = k.shape
    cdt = np.float64 if p.dtype == np.float64 else np.float32
    # A kv head's dk/dv is the sum over its group: the backend sums in the
    # compute dtype and rounds once; here each head was rounded first, so
    # allow one rounding of the input dtype per summand.
    for g, g_r in ((dk, dk_r), (dv, dv_r)):
        parts = g_r.astype(cdt).reshape(b, s, p.nheads_kv, group, d)
        err = np.abs(g.astype(cdt) - parts.sum(axis=3)).max()
        # (+ subnormal spacing: the parts may cancel down to fp16 subnormals)
        tiny = float(ml_dtypes.finfo(p.dtype).smallest_subnormal)
        assert err <= (group + 1) * (eps(p.dtype) * np.abs(parts).sum(axis=3).max() + tiny)


@given(problems(), st.data())
def test_noncausal_key_permutation_invariance(p, data):
    q, k, v, dout = p.arrays()
    perm = np.random.default_rng(p.seed + 1).permutation(p.seqlen_k)
    out = cupyflash.attention(q, k, v, scale=p.scale)
    out_p = cupyflash.attention(q, k[:, perm], v[:, perm], scale=p.scale)
    ref = reference.attention(q, k, v, scale=p.scale)
    naive, _ = naive_attention(q, k, v, False, p.scale_value)
    scales = error_scales(q, k, v, dout, False, p.scale_value)
    # Both orders obey the accuracy rule, and they agree with each other to
    # twice that.
    floor = flash_floor("out", p.dtype, scales, FWD_FLOOR_ULPS)
    assert_close_flash_rule(out_p, ref, naive, FWD_FACTOR, floor, "out(permuted keys)")
    assert_close_flash_rule(out_p, out, naive, 2 * FWD_FACTOR, 2 * floor, "out(permuted) vs out")


@given(problems(), st.data())
def test_causal_rows_ignore_future_keys(p, data):
    """Perturbing keys/values past a row's diagonal changes nothing in that row."""
    q, k, v, dout = p.arrays()
    row = data.draw(st.integers(0, p.seqlen_q - 1), label="row")
    first_hidden = row + p.seqlen_k - p.seqlen_q + 1  # first key hidden from `row`
    if first_hidden >= p.seqlen_k:
        first_hidden = p.seqlen_k  # nothing hidden: perturb nothing
    k2, v2 = k.copy(), v.copy()
    rng = np.random.default_rng(p.seed + 2)
    start = max(first_hidden, 0)
    k2[:, start:] = (rng.standard_normal(k2[:, start:].shape) * 50).astype(p.dtype)
    v2[:, start:] = (rng.standard_normal(v2[:, start:].shape) * 50).astype(p.dtype)
    out, lse = cupyflash.attention(q, k, v, causal=True, scale=p.scale, return_lse=True)
    out2, lse2 = cupyflash.attention(q, k2, v2, causal=True, scale=p.scale, return_lse=True)
    np.testing.assert_array_equal(out[:, : row + 1], out2[:, : row + 1])
    np.testing.assert_array_equal(lse[:, :, : row + 1], lse2[:, :, : row + 1])
    dq, _, _ = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, scale=p.scale)
    dq2, _, _ = cupyflash.attention_backward(dout, q, k2, v2, out2, lse2, causal=True, scale=p.scale)
    np.testing.assert_array_equal(dq[:, : row + 1], dq2[:, : row + 1])


@given(problems(), st.integers(1, 64))
def test_fully_masked_rows(p, extra):
    """causal with seqlen_q > seqlen_k: the first rows see no key."""
    seqlen_q = p.seqlen_k + extra
    p = Problem(p.batch, seqlen_q, p.seqlen_k, p.nheads, p.nheads_kv, min(p.headdim, 64), p.dtype, True, p.scale, p.logit_std, p.seed)
    q, k, v, dout = p.arrays()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        out, lse = cupyflash.attention(q, k, v, causal=True, scale=p.scale, return_lse=True)
        dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, scale=p.scale)
        ref_out, ref_lse = reference.attention(q, k, v, causal=True, scale=p.scale, return_lse=True)
        ref_dq, _, _ = reference.attention_backward(dout, q, k, v, out, lse, causal=True, scale=p.scale)
    for x in (out, lse, dq, dk, dv, ref_out, ref_lse, ref_dq):
        assert not np.isnan(np.asarray(x, dtype=np.float64)).any()
    dead = slice(0, extra)
    assert (out[:, dead] == 0).all() and (ref_out[:, dead] == 0).all()
    assert np.isneginf(lse[:, :, dead]).all() and np.isneginf(ref_lse[:, :, dead]).all()
    assert np.isfinite(lse[:, :, extra:]).all()
    assert (dq[:, dead] == 0).all() and (ref_dq[:, dead] == 0).all()


@given(problems())
def test_vjp_matches_attention_and_backward(p):
    q, k, v, dout = p.arrays()
    out, vjp = cupyflash.attention_vjp(q, k, v, causal=p.causal, scale=p.scale)
    out2, lse2 = cupyflash.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    np.testing.assert_array_equal(out, out2)
    for g, g2 in zip(vjp(dout), cupyflash.attention_backward(dout, q, k, v, out2, lse2, causal=p.causal, scale=p.scale)):
        np.testing.assert_array_equal(g, g2)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 64), (64, 16), (128, 32), (1, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sizes_agree(block_q, block_k, causal):
    """Any tiling gives the reference (tiles are an implementation detail)."""
    p = Problem(2, 77, 93, 4, 2, 24, np.float64, causal, None, 30.0, 3)
    q, k, v, dout = p.arrays()
    out, lse = _numpy_backend.forward(q, k, v, causal, p.scale_value, block_q=block_q, block_k=block_k)
    grads = _numpy_backend.backward(dout, q, k, v, out, lse, causal, p.scale_value, block_q=block_q, block_k=block_k)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    refs = reference.attention_backward(dout, q, k, v, out, lse, causal=causal)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12)
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-10)


def test_nan_propagates_without_error():
    p = Problem(1, 20, 20, 1, 1, 8, np.float32, False, None, None, 5)
    q, k, v, _ = p.arrays()
    v[0, 3, 0, 2] = np.nan
    out = cupyflash.attention(q, k, v)
    assert np.isnan(out[0, :, 0, 2]).all()
    assert not np.isnan(out[0, :, 0, :2]).any()


def test_import_does_not_import_cupy():
    import subprocess
    import sys

    code = "import sys, cupyflash; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
