"""Tiled NumPy backend against the float64 reference (Hypothesis), every variant of docs/variants.md."""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import cupyflash
from cupyflash import _numpy_backend, _plan, _validate, reference
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
    sink_gradients_with_nan_in_a_row_without_keys,
)

# Accuracy rule (flash-attn's): max|ours - ref| <= FACTOR x max|naive - ref|
# + floor, naive = same computation on the full matrix in the input dtype.
FWD_FACTOR = 2  # out, lse
BWD_FACTOR = 3  # dq, dk, dv, dbias
# Floors, in units of (eps_dtype + eps_compute * L) x magnitude-without-
# cancellation (see helpers.error_scales): the rounding every finite-
# precision attention must make, which the naive computation sometimes
# escapes by luck (one-hot softmax rows are exact in it). Sweeps of several
# thousand examples needed at most ~0.7 of a unit; 4 and 8 leave headroom
# without letting a real bug (errors of order 1 in P) through.
BIG_FP32 = Problem(1, 300, 300, 2, 1, 256, np.float32, True, None, None, 7)
BIG_FP32_NC = Problem(1, 300, 300, 2, 2, 256, np.float32, False, None, None, 8)
# Logits of std 1e4 under a softcap of 1.875: most scores capped, their derivatives tiny (1 - t^2 for t near 1
# lost them to t's rounding, dq then 2x past the rule).
CAPPED = Problem(2, 3, 100, 3, 1, 162, np.float16, False, 1.9, 9962.5, 121)

# Each Hypothesis example is capped (batch * nheads * seqlen_q * seqlen_k * headdim) so the file
# stays well under a minute and a half on two cores.
SMALL = dict(max_seqlen=256, cost_cap=4_000_000)
TINY = dict(max_batch=2, max_seqlen=150, max_headdim=16, cost_cap=300_000)

VARIANTS = ("window", "softcap", "alibi", "bool_mask", "bias", "dropout", "sink")


def _mask_shape(draw, full):
    """A shape that broadcasts to ``full``: each axis full or 1, leading axes maybe dropped."""
    shape = tuple(n if draw(st.booleans()) else 1 for n in full)
    return shape[draw(st.integers(0, 2)):]


def draw_variants(draw, p, names, gentle=False):
    """Keywords of cupyflash.attention (besides causal and scale) for the variants ``names``.

    ``gentle``: no probability underflows to 0 and no softcap saturates (1 - tanh^2 = 0) in
    float32 at unit scale, where float64 keeps them nonzero: then inf * 0 would be NaN in float32
    alone.
    """
    rng = np.random.default_rng(p.seed + 17)
    kw = {}
    if "window" in names:
        reach = max(p.seqlen_q, p.seqlen_k)
        kw["window_size"] = (draw(st.integers(-1, reach), label="left"), draw(st.integers(-1, reach), label="right"))
    if "softcap" in names:
        kw["softcap"] = draw(st.floats(10.0 if gentle else 0.5, 30.0), label="softcap")
    if "alibi" in names:
        shape = draw(st.sampled_from([(p.nheads,), (p.batch, p.nheads)]), label="slopes shape")
        kw["alibi_slopes"] = rng.uniform(0.0, 0.25 if gentle else 1.0, shape).astype(np.float32)
    full = (p.batch, p.nheads, p.seqlen_q, p.seqlen_k)
    if "bool_mask" in names and "bias" not in names:
        density = draw(st.floats(0.2, 1.0), label="density")
        kw["attn_mask"] = rng.random(_mask_shape(draw, full)) < density
    if "bias" in names:
        shape = _mask_shape(draw, full)
        dtype = draw(st.sampled_from([p.dtype, np.dtype(np.float32)]), label="bias dtype")
        bias = rng.standard_normal(shape) * draw(st.floats(0.0, 5.0), label="bias std")
        bias[rng.random(shape) < draw(st.sampled_from([0.0, 0.2]), label="-inf fraction")] = -np.inf
        kw["attn_mask"] = bias.astype(dtype)
    if "dropout" in names:
        kw["dropout_p"] = draw(st.floats(0.05, 0.9), label="dropout_p")
        kw["dropout_seed"] = draw(st.integers(0, 2**64 - 1), label="dropout_seed")
    if "sink" in names:  # logits above, among and below the scores; a head without
        sink = rng.choice([5.0, 0.0, -3.0, -40.0, -np.inf], p.nheads) + rng.uniform(-1, 1, p.nheads)
        kw["learnable_sink"] = sink.astype(np.float64 if p.dtype == np.float64 else np.float32)
    return kw


def cases(variants=None, gentle=False, **problem_kw):
    """Strategy of ``(problem, keywords)``: the given variants, or a random combination."""

    @st.composite
    def draw_case(draw):
        p = draw(problems(**problem_kw))
        names = draw(st.sets(st.sampled_from(VARIANTS)), label="variants") if variants is None else variants
        return p, draw_variants(draw, p, names, gentle)

    return draw_case()


def _has_bias(kw):
    mask = kw.get("attn_mask")
    return mask is not None and mask.dtype != np.bool_


def _spec(q, k, v, **kw):
    return _validate.check_call("test", q, k, v, **kw)


def check_against_reference(p, kw):
    """Forward and backward (with dbias) obey the accuracy rule against the float64 reference."""
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, **kw)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (p.batch, p.nheads, p.seqlen_q)
    assert lse.dtype == (np.float64 if p.dtype == np.float64 else np.float32)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **args)
    naive_out, naive_lse = naive_attention(q, k, v, p.causal, p.scale_value, **kw)
    scales = error_scales(q, k, v, dout, p.causal, p.scale_value, **kw)
    assert not np.isnan(out).any()
    assert_close_flash_rule(out, ref_out, naive_out, FWD_FACTOR, flash_floor("out", p.dtype, scales, FWD_FLOOR_ULPS), "out")
    assert_close_flash_rule(lse, ref_lse, naive_lse, FWD_FACTOR, flash_floor("lse", p.dtype, scales, FWD_FLOOR_ULPS), "lse")
    # The norm-wise bound presumes plain attention: a window or mask can leave a row one key, whose
    # dq and dk are 0 up to the reference's rounding.
    plain = not kw
    if plain:
        check_relative("out", out, ref_out, p)
        check_relative("lse", lse, ref_lse, p)

    want_dbias, want_dsink = _has_bias(kw), kw.get("learnable_sink") is not None
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, return_dsink=want_dsink,
                                         **args)
    refs = reference.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, return_dsink=want_dsink,
                                        **args)
    naives = naive_attention_backward(dout, q, k, v, p.causal, p.scale_value, return_dbias=want_dbias,
                                      return_dsink=want_dsink, **kw)
    names, inputs = ("dq", "dk", "dv"), (q, k, v)
    if want_dbias:
        names, inputs = names + ("dbias",), inputs + (kw["attn_mask"],)
    if want_dsink:
        names, inputs = names + ("dsink",), inputs + (kw["learnable_sink"],)
    for name, g, x, r, n in zip(names, grads, inputs, refs, naives):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert not np.isnan(g).any(), name
        floor = flash_floor(name, p.dtype, scales, BWD_FLOOR_ULPS)
        assert_close_flash_rule(g, r, n, BWD_FACTOR, floor, name)
        if plain:
            check_relative(name, g, r, p)


@given(cases())
@example((BIG_FP32, {}))
@example((BIG_FP32_NC, {}))
@example((CAPPED, {"softcap": 1.875}))
def test_matches_reference(case):
    """Random combinations of the variants (none included), forward and backward."""
    check_against_reference(*case)


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=40)
@given(data=st.data())
def test_each_variant_matches_reference(name, data):
    check_against_reference(*data.draw(cases((name,), **SMALL)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 2, False, 169), (2, 40, 70, 4, 2, 32, True, 3)], ids=str)
def test_a_sink_that_takes_most_of_each_row(shape, dtype):
    """Where the sink's probability is most of the row, lse's rounding is most of the keys' share: the
    renormalized backward divides the keys' probabilities and the sink's by their total, not the keys' sum
    by 1 - exp(sink - lse) (which divided that rounding by the share: float32's dq 1.6e-5 off, relative)."""
    *dims, causal, seed = shape
    p = Problem(*dims, dtype, causal, None, None, seed)
    check_against_reference(p, {"learnable_sink": np.full(p.nheads, 8.0 + np.log(p.seqlen_k), dtype)})


@pytest.mark.parametrize("module", [cupyflash, reference], ids=["numpy_backend", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_without_key_or_sink_adds_nothing_to_dsink(module, dtype):
    """A row with lse -inf (no key, no sink: out 0) adds nothing to dsink, even against NaN in its dout
    (docs/variants.md), as it adds nothing to dq, dk and dv."""
    with_nan, without = sink_gradients_with_nan_in_a_row_without_keys(module, dtype)
    np.testing.assert_array_equal(with_nan, without)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relative_bound_headdim256_seqlen300(dtype, causal):
    """The norm-wise bounds hold at the largest drawn shape."""
    p = Problem(1, 300, 300, 2, 1, 256, dtype, causal, None, None, 11)
    q, k, v, dout = p.arrays()
    out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    refs = reference.attention_backward(dout, q, k, v, out, lse, causal=causal)
    bound = REL_BOUND[np.dtype(dtype)]
    for name, ours, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, (ref_out, ref_lse) + refs):
        assert relative_error(ours, ref) <= bound, name


@settings(max_examples=100)
@given(cases(**SMALL))
def test_gqa_equals_repeated_kv(case):
    """Query head h reads kv head h // group: same as repeating k/v heads, variants included
    (ALiBi, masks and dropout bits are per query head)."""
    p, kw = case
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, **kw)
    group = p.nheads // p.nheads_kv
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **args)
    out_r, lse_r = cupyflash.attention(q, kr, vr, return_lse=True, **args)
    np.testing.assert_array_equal(out, out_r)
    np.testing.assert_array_equal(lse, lse_r)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, **args)
    dq_r, dk_r, dv_r = cupyflash.attention_backward(dout, q, kr, vr, out_r, lse_r, **args)
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


@settings(max_examples=50)
@given(problems(**SMALL))
def test_noncausal_key_permutation_invariance(p):
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


def _hidden(p, kw, row):
    """Bool (batch, nheads, seqlen_k): the keys that query ``row`` does not see (window, causal,
    bool mask, -inf bias)."""
    left, right = kw.get("window_size", (-1, -1))
    right = 0 if p.causal else right
    j = np.arange(p.seqlen_k)
    i = row + p.seqlen_k - p.seqlen_q
    hidden = ((left >= 0) & (j < i - left)) | ((right >= 0) & (j > i + right))
    hidden = np.broadcast_to(hidden, (p.batch, p.nheads, p.seqlen_k))
    mask = kw.get("attn_mask")
    if mask is not None:
        mask = np.broadcast_to(mask, (p.batch, p.nheads, p.seqlen_q, p.seqlen_k))[:, :, row]
        hidden = hidden | (~mask if mask.dtype == np.bool_ else mask == -np.inf)
    return hidden


def _assert_same(ours, expected, dtype, magnitude):
    """Equal but for the summation order (a non-finite row is summed apart from the others): within 64
    units of the tensor's magnitude without cancellation (helpers.error_scales), which a gradient of
    large logits exceeds by far (ds = p (dp - delta) cancels there, and delta sums out in its own order)."""
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(expected).all()
    size = max(magnitude, float(np.abs(expected).max(initial=1.0)))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=64 * eps(dtype) * size)


@given(cases(dtypes=[np.float32, np.float64], **TINY), st.data())
def test_masked_pairs_take_nothing_from_nan(case, data):
    """NaN in the k/v rows a query does not see leaves its out, lse and dq unchanged, and NaN in
    its q and dout rows leaves the dk, dv (and dbias) of those keys unchanged."""
    p, kw = case
    row = data.draw(st.integers(0, p.seqlen_q - 1), label="row")
    hidden = _hidden(p, kw, row)
    # Keys hidden from the row in every head it shares a kv head with, in every batch.
    group = p.nheads // p.nheads_kv
    hidden_kv = hidden.reshape(p.batch, p.nheads_kv, group, p.seqlen_k).all(axis=(0, 2))  # (nheads_kv, seqlen_k)
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, return_dbias=_has_bias(kw), **kw)
    fwd = {a: b for a, b in args.items() if a != "return_dbias"}
    size = error_scales(q, k, v, dout, p.causal, p.scale_value, **kw)

    k2, v2 = k.copy(), v.copy()
    k2[:, hidden_kv.T] = np.nan
    v2[:, hidden_kv.T] = np.inf
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **fwd)
    out2, lse2 = cupyflash.attention(q, k2, v2, return_lse=True, **fwd)
    _assert_same(out2[:, row], out[:, row], p.dtype, size["out"])
    # lse never reads v, and a hidden key's score is -inf whatever k holds: exactly the same.
    np.testing.assert_array_equal(lse2[:, :, row], lse[:, :, row])
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, **args)
    grads2 = cupyflash.attention_backward(dout, q, k2, v2, out2, lse2, **args)
    _assert_same(grads2[0][:, row], grads[0][:, row], p.dtype, size["dq"])

    q3, dout3 = q.copy(), dout.copy()
    q3[:, row], dout3[:, row] = np.nan, np.nan
    out3, lse3 = cupyflash.attention(q3, k, v, return_lse=True, **fwd)
    grads3 = cupyflash.attention_backward(dout3, q3, k, v, out3, lse3, **args)
    for name, g, g3 in zip(("dk", "dv"), grads[1:3], grads3[1:3]):
        _assert_same(g3[:, hidden_kv.T], g[:, hidden_kv.T], p.dtype, size[name])
    if args["return_dbias"]:
        db, db3 = (x.reshape((1,) * (4 - x.ndim) + x.shape) for x in (grads[3], grads3[3]))
        if db.shape[2:] == (p.seqlen_q, p.seqlen_k):
            # Entry (b, h, row, j) sums the mask's broadcast batches and heads: hidden in all of them.
            hid = hidden
            for axis in (0, 1):
                hid = hid.all(axis=axis, keepdims=True) if db.shape[axis] == 1 else hid
            _assert_same(db3[:, :, row][hid], db[:, :, row][hid], p.dtype, size["dbias"])


@given(cases(gentle=True, dtypes=[np.float32, np.float64], unit=True, **TINY), st.data())
def test_nan_and_inf_follow_the_reference(case, data):
    """Non-finite entries in q, k, v, dout and the bias: NaN, ±inf and finite values land where the
    reference puts them (masked pairs take nothing, dead rows give zeros)."""
    p, kw = case
    q, k, v, dout = p.arrays()
    want_dbias = _has_bias(kw)
    poisoned = (q, k, v, dout) + ((kw["attn_mask"],) if want_dbias else ())
    rng = np.random.default_rng(p.seed + 5)
    for x in poisoned:
        for _ in range(data.draw(st.integers(0, 2), label="poisoned entries")):
            x[tuple(rng.integers(n) for n in x.shape)] = rng.choice([np.nan, np.inf, -np.inf])
    args = dict(causal=p.causal, scale=p.scale, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        out, lse = cupyflash.attention(q, k, v, return_lse=True, **args)
        grads = cupyflash.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, **args)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **args)
    refs = reference.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, **args)
    tol = 1e-9 if p.dtype == np.float64 else 2e-4
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    for name, ours, ref in zip(names, (out, lse) + grads, (ref_out, ref_lse) + refs):
        ours = ours.astype(np.float64)
        for special in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(special(ours), special(ref), err_msg=f"{name}: {special.__name__}")
        fin = np.isfinite(ref)
        if fin.any():
            size = max(1.0, float(np.abs(ref[fin]).max()))
            assert np.abs(ours[fin] - ref[fin]).max() <= tol * size, name


def test_nan_value_row_reaches_only_rows_that_see_it():
    """The docs' example: causal, v = [1, 2, nan] -> out [1, 1.5, nan]."""
    q = k = np.ones((1, 3, 1, 1), np.float32)
    v = np.array([1, 2, np.nan], np.float32).reshape(1, 3, 1, 1)
    out = cupyflash.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(out.ravel(), [1, 1.5, np.nan])
    # Row 0 (NaN dout) sees key 0 only: keys 1 and 2 and the other rows take nothing from it.
    v = np.array([1, 2, 3], np.float32).reshape(1, 3, 1, 1)
    dout = np.array([np.nan, 1, 1], np.float32).reshape(1, 3, 1, 1)
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert np.isnan(dv.ravel()[0]) and np.isfinite(dv.ravel()[1:]).all()
    assert np.isnan(dk.ravel()[0]) and np.isfinite(dk.ravel()[1:]).all()
    assert np.isnan(dq.ravel()[0]) and np.isfinite(dq.ravel()[1:]).all()


@pytest.mark.parametrize("value, expected", [(np.nan, np.nan), (np.inf, np.inf)])
def test_special_scores_make_lse(value, expected):
    """A NaN score makes its row's lse NaN; a +inf score (and no NaN) makes it +inf."""
    p = Problem(1, 5, 7, 2, 1, 4, np.float32, False, None, None, 3)
    q, k, v, _ = p.arrays()
    bias = np.zeros((5, 7), np.float32)
    bias[2, 3] = value
    _, lse = cupyflash.attention(q, k, v, attn_mask=bias, return_lse=True)
    np.testing.assert_array_equal(lse[:, :, 2], expected)
    assert np.isfinite(np.delete(lse, 2, axis=2)).all()


def _dead_rows(p, how, extra):
    """Keywords that leave the first ``extra`` rows seeing no key, ``how`` decides by what."""
    rows = np.arange(p.seqlen_q)[:, None] < extra
    if how == "causal":  # seqlen_q > seqlen_k
        return dict(causal=True)
    if how == "window":  # the window of the first rows ends before key 0
        return dict(window_size=(0, 0))
    if how == "bool_mask":
        return dict(attn_mask=np.broadcast_to(~rows, (p.seqlen_q, p.seqlen_k)))
    return dict(attn_mask=np.broadcast_to(np.where(rows, -np.inf, 0.0), (p.seqlen_q, p.seqlen_k)).astype(np.float32))


@pytest.mark.parametrize("how", ["causal", "window", "bool_mask", "bias"])
@settings(max_examples=30)
@given(problems(**SMALL), st.integers(1, 64))
def test_fully_masked_rows(how, p, extra):
    """Rows that see no key: out 0, lse -inf, zero gradients, no NaN and no warning, even with NaN
    in their dout."""
    seqlen_q = p.seqlen_k + extra
    p = Problem(p.batch, seqlen_q, p.seqlen_k, p.nheads, p.nheads_kv, min(p.headdim, 32), p.dtype, False, p.scale,
                p.logit_std, p.seed)
    q, k, v, dout = p.arrays()
    dout[:, :extra] = np.nan
    kw = _dead_rows(p, how, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        out, lse = cupyflash.attention(q, k, v, scale=p.scale, return_lse=True, **kw)
        dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, scale=p.scale, **kw)
        ref_out, ref_lse = reference.attention(q, k, v, scale=p.scale, return_lse=True, **kw)
    for x in (out, lse, dq, dk, dv):
        assert not np.isnan(np.asarray(x, dtype=np.float64)).any()
    dead = slice(0, extra)
    assert (out[:, dead] == 0).all() and (ref_out[:, dead] == 0).all()
    assert np.isneginf(lse[:, :, dead]).all() and np.isneginf(ref_lse[:, :, dead]).all()
    assert (dq[:, dead] == 0).all()


@settings(max_examples=50)
@given(cases(**TINY))
def test_vjp_matches_attention_and_backward(case):
    p, kw = case
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, **kw)
    out, vjp = cupyflash.attention_vjp(q, k, v, **args)
    out2, lse2 = cupyflash.attention(q, k, v, return_lse=True, **args)
    np.testing.assert_array_equal(out, out2)
    for g, g2 in zip(vjp(dout), cupyflash.attention_backward(dout, q, k, v, out2, lse2, **args)):
        np.testing.assert_array_equal(g, g2)


def _swap(x):
    """(b, s, h, d) <-> (b, h, s, d), contiguous."""
    return np.ascontiguousarray(x.swapaxes(1, 2))


@settings(max_examples=30)
@given(cases(**TINY))
def test_bhsd_layout_is_bshd_transposed(case):
    """layout='bhsd' gives the bshd results with axes 1 and 2 swapped, contiguous in that layout."""
    p, kw = case
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, **kw)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **args)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, **args)
    out_t, lse_t = cupyflash.attention(_swap(q), _swap(k), _swap(v), return_lse=True, layout="bhsd", **args)
    grads_t = cupyflash.attention_backward(_swap(dout), _swap(q), _swap(k), _swap(v), out_t, lse_t, layout="bhsd", **args)
    np.testing.assert_array_equal(lse, lse_t)
    for x, x_t in zip((out,) + grads, (out_t,) + grads_t):
        assert x_t.flags.c_contiguous
        np.testing.assert_array_equal(_swap(x), x_t)


ALL_VARIANTS = dict(window_size=(40, 7), softcap=5.0, alibi_slopes=np.array([0.3, 0.1, 0.05, 0.02], np.float32),
                    dropout_p=0.25, dropout_seed=2**63 + 12345)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 64), (64, 16), (128, 32), (1, 7), (33, 200)])
@pytest.mark.parametrize("variants", ["plain", "causal", "all+bias", "all+bool"])
def test_block_sizes_agree(block_q, block_k, variants):
    """Any tiling gives the reference, dropout bits included (tiles are an implementation detail)."""
    p = Problem(2, 77, 93, 4, 2, 24, np.float64, variants == "causal", None, 30.0, 3)
    q, k, v, dout = p.arrays()
    rng = np.random.default_rng(4)
    kw = dict(causal=p.causal)
    if variants.startswith("all"):
        kw.update(ALL_VARIANTS)
        kw["attn_mask"] = (rng.standard_normal((2, 1, 77, 93)) if variants == "all+bias"
                           else rng.random((4, 77, 1)) < 0.8)
    want_dbias = _has_bias(kw)
    spec = _spec(q, k, v, **kw)
    out, lse = _numpy_backend.forward(q, k, v, spec, block_q=block_q, block_k=block_k)
    grads = _numpy_backend.backward(dout, q, k, v, out, lse, spec, False, want_dbias, block_q=block_q, block_k=block_k)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    refs = reference.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12)
    assert (grads[3] is None) == (not want_dbias)
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------
# Dropout


def _revealed_keep(batch, nheads, seqlen_q, seqlen_k, dropout_p, seed, dtype=np.float32):
    """The keep bits as the backend applied them: with q = 0 every score is equal, and v = the
    identity makes out[b, i, h, j] = keep[b, h, i, j] / (seqlen_k * (1 - dropout_p))."""
    q = np.zeros((batch, seqlen_q, nheads, seqlen_k), dtype)
    k = np.zeros((batch, seqlen_k, 1, seqlen_k), dtype)
    v = np.broadcast_to(np.eye(seqlen_k, dtype=dtype)[None, :, None], k.shape).copy()
    out = cupyflash.attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed)
    return out.transpose(0, 2, 1, 3) > 0, out


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**64 - 1))
def test_dropout_keeps_a_binomial_fraction_with_the_specified_bits(dropout_p, seed):
    shape = (2, 3, 70, 130)
    kept, out = _revealed_keep(*shape, dropout_p, seed)
    np.testing.assert_array_equal(kept, cupyflash.dropout_mask(shape, dropout_p, seed))
    # Kept values are scaled by 1 / (1 - p) exactly where the rows' weights are equal.
    np.testing.assert_allclose(out[out > 0], 1 / (shape[3] * (1 - dropout_p)), rtol=1e-6)
    n = kept.size
    keep_prob = 1 - min(math.floor(dropout_p * 256 + 0.5), 255) / 256
    sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
    assert abs(int(kept.sum()) - n * keep_prob) <= 6 * sigma


@settings(max_examples=30)
@given(cases(("dropout",), dtypes=[np.float32, np.float64], unit=True, **TINY), st.integers(0, 2**64 - 1))
def test_dropout_seed_decides_the_output(case, other_seed):
    """The same seed gives bitwise the same out and gradients, another seed another out; lse is the
    softmax's before dropout, the same as without it."""
    p, kw = case
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, **kw)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **args)
    out2, lse2 = cupyflash.attention(q, k, v, return_lse=True, **args)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)
    for g, g2 in zip(cupyflash.attention_backward(dout, q, k, v, out, lse, **args),
                     cupyflash.attention_backward(dout, q, k, v, out2, lse2, **args)):
        np.testing.assert_array_equal(g, g2)
    _, lse_plain = cupyflash.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    np.testing.assert_array_equal(lse, lse_plain)
    shape = (p.batch, p.nheads, p.seqlen_q, p.seqlen_k)
    seen = ~reference.causal_mask(p.seqlen_q, p.seqlen_k) if p.causal else np.ones(shape[2:], bool)
    if other_seed != kw["dropout_seed"] and p.batch * p.nheads * seen.sum() >= 200:
        # Two seeds agree on 200 bits with probability below 0.91^200 < 1e-8 (dropout_p >= 0.05);
        # where they differ on a visible pair, a weight of unit-scale data moves out.
        kept = cupyflash.dropout_mask(shape, kw["dropout_p"], kw["dropout_seed"])
        assert ((kept != cupyflash.dropout_mask(shape, kw["dropout_p"], other_seed)) & seen).any()
        out3 = cupyflash.attention(q, k, v, **{**args, "dropout_seed": other_seed})
        assert not np.array_equal(out, out3)


@settings(max_examples=40)
@given(cases(("dropout",), **SMALL), st.sets(st.sampled_from(VARIANTS[:-1])), st.data())
def test_dropout_backward_matches_reference_given_the_mask(case, others, data):
    """The reference given dropout_mask=cupyflash.dropout_mask(...) (not the seed) is the backend's
    dropout, forward and backward, with other variants on top."""
    p, kw = case
    kw = {**draw_variants(data.draw, p, others), **kw}
    q, k, v, dout = p.arrays()
    args = dict(causal=p.causal, scale=p.scale, **kw)
    mask = cupyflash.dropout_mask((p.batch, p.nheads, p.seqlen_q, p.seqlen_k), kw["dropout_p"], kw["dropout_seed"])
    ref_args = {**args, "dropout_seed": None, "dropout_mask": mask}
    want_dbias = _has_bias(kw)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **args)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, **args)
    ref_out = reference.attention(q, k, v, **ref_args)
    refs = reference.attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias, **ref_args)
    naive_out, _ = naive_attention(q, k, v, p.causal, p.scale_value, **kw)
    naives = naive_attention_backward(dout, q, k, v, p.causal, p.scale_value, return_dbias=want_dbias, **kw)
    scales = error_scales(q, k, v, dout, p.causal, p.scale_value, **kw)
    assert_close_flash_rule(out, ref_out, naive_out, FWD_FACTOR, flash_floor("out", p.dtype, scales, FWD_FLOOR_ULPS))
    for name, g, r, n in zip(("dq", "dk", "dv", "dbias"), grads, refs, naives):
        assert_close_flash_rule(g, r, n, BWD_FACTOR, flash_floor(name, p.dtype, scales, BWD_FLOOR_ULPS), name)


# ---------------------------------------------------------------------------
# The tile plan of cupyflash._variants against brute force


@settings(max_examples=200)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(-1, 45), st.integers(-1, 45), st.data())
def test_tile_ranges_and_interior_tiles(seqlen_q, seqlen_k, left, right, data):
    """key_range / query_range cover every visible pair of a tile and nothing outside the band's
    rows; tile_is_interior means no pair of the tile is hidden."""
    from cupyflash import _variants

    q = np.zeros((1, seqlen_q, 1, 1))
    k = np.zeros((1, seqlen_k, 1, 1))
    spec = _spec(q, k, k, window_size=(left, right))
    i = np.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    j = np.arange(seqlen_k)
    vis = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
    q0 = data.draw(st.integers(0, seqlen_q - 1), label="q_start")
    q1 = data.draw(st.integers(q0 + 1, seqlen_q), label="q_end")
    k0 = data.draw(st.integers(0, seqlen_k - 1), label="k_start")
    k1 = data.draw(st.integers(k0 + 1, seqlen_k), label="k_end")
    seen = np.flatnonzero(vis[q0:q1].any(axis=0))
    lo, hi = _variants.key_range(spec, q0, q1)
    assert lo <= hi and (not seen.size or (lo <= seen[0] and seen[-1] < hi))
    if seen.size:  # tight: the band's ends are seen by its first or last row
        assert (lo, hi) == (seen[0], seen[-1] + 1)
    seers = np.flatnonzero(vis[:, k0:k1].any(axis=1))
    lo, hi = _variants.query_range(spec, k0, k1)
    assert lo <= hi and (not seers.size or (lo <= seers[0] and seers[-1] < hi))
    assert _variants.tile_is_interior(spec, q0, q1, k0, k1) == bool(vis[q0:q1, k0:k1].all())
    np.testing.assert_array_equal(np.broadcast_to(_variants.visible(spec, q0, q1, k0, k1), (1, 1, 1, q1 - q0, k1 - k0)),
                                  vis[None, None, None, q0:q1, k0:k1])


def test_import_does_not_import_cupy():
    import subprocess
    import sys

    code = "import sys, cupyflash; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("logits", [1.0, 30.0])
def test_rows_renormalize_where_lse_rounding_can_show(dtype, logits):
    """Each row's recomputed probabilities are divided by their sum (the kernels' row_renormalizer), but for
    float64 rows with |lse| log2 e <= RENORMALIZED_LSE2, whose rounding lies far below the fidelity floor."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 90, 2, 16)).astype(dtype) for _ in range(3))
    q *= dtype(logits)
    _, lse = cupyflash.attention(q, k, v, return_lse=True)
    spec = _validate.check_call("test", q, k, v)
    qc, kc = _numpy_backend._split_q(q, 2, dtype), _numpy_backend._split_kv(k, dtype)
    factors = _numpy_backend._row_renormalizers(qc, kc, lse.reshape(qc.shape[:3] + (90,)), spec, 64, 64)
    small = (np.abs(lse) * np.log2(np.e) <= _plan.RENORMALIZED_LSE2).reshape(factors.shape)
    renormalized = factors != 1
    assert small.all() == (logits == 1.0)
    if dtype == np.float64:
        assert not renormalized[small].any()
    else:
        assert renormalized[small].any() or not small.any()
    assert renormalized[~small].any() or small.all()
