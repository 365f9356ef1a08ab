"""The float64 reference itself: against a per-row loop, finite differences, poisoned data and
equivalences between variants that no constant in it could be tuned to."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from cupyflash import _philox, reference
from helpers import Problem, problems

SMALL = dict(max_batch=2, max_seqlen=12, max_nheads=4, max_headdim=8)


def loop_attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                   attn_mask=None, dropout_p=0.0, dropout_mask=None):
    """One query row and one key at a time, straight from docs/variants.md; (b, s, h, d) arrays."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group, offset = h // hkv, sk - sq
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    left, right = window_size[0], 0 if causal else window_size[1]
    mask = None if attn_mask is None else np.broadcast_to(attn_mask, (b, h, sq, sk))
    slopes = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, (b, h)).astype(np.float64)
    keep = None if dropout_mask is None else np.broadcast_to(dropout_mask, (b, h, sq, sk))
    out = np.zeros((b, sq, h, d))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                scores = {}
                for j in range(sk):
                    if (left >= 0 and j < i + offset - left) or (right >= 0 and j > i + offset + right):
                        continue
                    if mask is not None and mask.dtype == bool and not mask[bi, hi, i, j]:
                        continue
                    x = scale * float(np.dot(q[bi, i, hi], k[bi, j, hi // group]))
                    if softcap:
                        x = softcap * np.tanh(x / softcap)
                    if slopes is not None:
                        x -= slopes[bi, hi] * abs(i + offset - j)
                    if mask is not None and mask.dtype != bool:
                        x += float(mask[bi, hi, i, j])
                    if x != -np.inf:
                        scores[j] = x
                if not scores:
                    continue
                m = max(scores.values())
                w = {j: np.exp(s - m) for j, s in scores.items()}
                l = sum(w.values())
                lse[bi, hi, i] = m + np.log(l)
                for j, wj in w.items():
                    drop = 1.0 if keep is None else keep[bi, hi, i, j] / (1.0 - dropout_p)
                    out[bi, i, hi] += wj / l * drop * v[bi, j, hi // group]
    return out, lse


def to_layout(x, layout):
    """(b, s, h, d) <-> the caller's layout (the swap is its own inverse)."""
    return np.ascontiguousarray(x.swapaxes(1, 2)) if layout == "bhsd" else x


class Case:
    """float64 (b, s, h, d) data and the variant keywords of one call."""

    def __init__(self, q, k, v, dout, kw, layout):
        self.q, self.k, self.v, self.dout, self.kw, self.layout = q, k, v, dout, kw, layout

    def forward(self, q=None, k=None, v=None, **extra):
        """(out, lse) of the reference, out back in (b, s, h, d)."""
        args = [to_layout(x, self.layout) for x in (q if q is not None else self.q, k if k is not None else self.k,
                                                     v if v is not None else self.v)]
        out, lse = reference.attention(*args, **{**self.kw, **extra}, return_lse=True, layout=self.layout)
        return to_layout(out, self.layout), lse

    def backward(self, **extra):
        """(dq, dk, dv[, dbias][, dsink]) of the reference, in (b, s, h, d)."""
        out, lse = self.forward(**{n: x for n, x in extra.items() if n not in ("return_dbias", "return_dsink")})
        args = [to_layout(x, self.layout) for x in (self.dout, self.q, self.k, self.v, out)]
        grads = reference.attention_backward(*args, lse, **{**self.kw, **extra}, layout=self.layout)
        return tuple(to_layout(g, self.layout) for g in grads[:3]) + tuple(grads[3:])

    def __repr__(self):
        shapes = {name: getattr(x, "shape", x) if name in ("attn_mask", "dropout_mask", "alibi_slopes") else x
                  for name, x in self.kw.items()}
        return f"Case(q={self.q.shape}, k={self.k.shape}, layout={self.layout}, {shapes})"


@st.composite
def cases(draw, max_seqlen=9, masks=("none", "bool", "bias"), dropout=True, neg_inf_bias=True):
    """Small problems with any mix of variants; masks broadcast from a random shape."""
    batch, nheads = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    nheads_kv = draw(st.sampled_from([n for n in range(1, nheads + 1) if nheads % n == 0]))
    sq, sk, d = draw(st.integers(1, max_seqlen)), draw(st.integers(1, max_seqlen)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    if draw(st.booleans()):
        kw["window_size"] = (draw(st.integers(-1, sk)), draw(st.integers(-1, sk)))
    kw["scale"] = draw(st.one_of(st.none(), st.floats(0.1, 1.5)))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 5.0))
    alibi = draw(st.sampled_from([None, (nheads,), (batch, nheads)]))
    if alibi:
        kw["alibi_slopes"] = rng.uniform(0.0, 1.0, alibi).astype(np.float32)
    mask = draw(st.sampled_from(masks))
    if mask != "none":
        full = (batch, nheads, sq, sk)
        ndim = draw(st.integers(1, 4))
        shape = tuple(n if draw(st.booleans()) else 1 for n in full[4 - ndim:])
        if mask == "bool":
            kw["attn_mask"] = rng.random(shape) < 0.75
        else:
            bias = rng.standard_normal(shape)
            if neg_inf_bias and draw(st.booleans()):
                bias[rng.random(shape) < 0.2] = -np.inf
            kw["attn_mask"] = bias
    if dropout and draw(st.booleans()):
        kw["dropout_p"] = draw(st.floats(0.05, 0.9))
        kw["dropout_mask"] = rng.random((batch, nheads, sq, sk)) >= kw["dropout_p"]
    layout = draw(st.sampled_from(["bshd", "bhsd"]))
    q, dout = rng.standard_normal((2, batch, sq, nheads, d))
    k, v = rng.standard_normal((2, batch, sk, nheads_kv, d))
    return Case(q, k, v, dout, kw, layout)


# --- forward against the loop ---------------------------------------------------------------


@given(problems(dtypes=[np.float64], **SMALL))
def test_reference_matches_row_loop(p):
    q, k, v, _ = p.arrays()
    out, lse = reference.attention(q, k, v, causal=p.causal, scale=p.scale, return_lse=True)
    out_l, lse_l = loop_attention(q, k, v, causal=p.causal, scale=p.scale)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, out_l, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_l))
    fin = np.isfinite(lse_l)
    np.testing.assert_allclose(lse[fin], lse_l[fin], rtol=1e-12, atol=1e-12)


@given(cases())
def test_variants_match_row_loop(c):
    out, lse = c.forward()
    out_l, lse_l = loop_attention(c.q, c.k, c.v, **c.kw)
    assert out.dtype == lse.dtype == np.float64
    assert lse.shape == (c.q.shape[0], c.q.shape[2], c.q.shape[1])
    np.testing.assert_allclose(out, out_l, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, lse_l, rtol=1e-12, atol=1e-12)  # -inf rows included


# --- gradients against finite differences ---------------------------------------------------


def check_directional_derivatives(c, h=1e-6):
    """Central differences of f = sum(dout * out) along random directions in q, k, v (and the
    float mask, and the learnable sink) against the reference's gradients."""
    rng = np.random.default_rng(0)
    bias, sink = c.kw.get("attn_mask"), c.kw.get("learnable_sink")
    with_bias, with_sink = bias is not None and bias.dtype != bool, sink is not None
    inputs = [c.q, c.k, c.v] + ([bias] if with_bias else []) + ([sink] if with_sink else [])
    dirs = [rng.standard_normal(x.shape) for x in inputs]

    def f(args):
        q, k, v = args[:3]
        extra = {"attn_mask": args[3]} if with_bias else {}
        if with_sink:
            extra["learnable_sink"] = args[-1]
        out, _ = c.forward(q, k, v, **extra)
        return float(np.sum(c.dout * out))

    grads = c.backward(**({"return_dbias": True} if with_bias else {}), **({"return_dsink": True} if with_sink else {}))
    assert len(grads) == len(inputs)
    out, _ = c.forward()
    mag = float(np.sum(np.abs(c.dout * out))) + 1.0  # scale of f's rounding
    for which, (x, g, e) in enumerate(zip(inputs, grads, dirs)):
        assert g.shape == x.shape and g.dtype == np.float64, which
        plus, minus = list(inputs), list(inputs)
        plus[which], minus[which] = x + h * e, x - h * e  # -inf bias entries stay -inf
        fd = (f(plus) - f(minus)) / (2 * h)
        an = float(np.sum(g * e))
        assert abs(fd - an) <= 1e-6 * (abs(an) + mag), (which, fd, an)


@given(problems(dtypes=[np.float64], unit=True, **SMALL))
def test_reference_gradients_match_finite_differences(p):
    """Standard-normal data (scale up to 2) keeps f smooth at the step size."""
    q, k, v, dout = p.arrays()
    kw = {"causal": True} if p.causal else {}
    check_directional_derivatives(Case(q, k, v, dout, {**kw, "scale": p.scale}, "bshd"))


@given(cases())
def test_variant_gradients_match_finite_differences(c):
    check_directional_derivatives(c)


VARIANTS = {
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
    "alibi_per_batch": dict(alibi_slopes=np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(2, 4)),
    "window": dict(window_size=(2, 1)),
    "window_causal": dict(window_size=(3, 5), causal=True),
    "bool_mask": dict(attn_mask=np.random.default_rng(1).random((7, 9)) < 0.6),
    "bias": dict(attn_mask=np.random.default_rng(2).standard_normal((2, 1, 7, 9))),
    "bias_neg_inf": dict(attn_mask=np.where(np.random.default_rng(3).random((4, 1, 9)) < 0.3, -np.inf, 0.5)),
    "dropout": dict(dropout_p=0.3, dropout_mask=np.random.default_rng(4).random((2, 4, 7, 9)) >= 0.3),
    "sink": dict(learnable_sink=np.array([0.5, -np.inf, 2.5, -1.0])),
    "sink_causal": dict(learnable_sink=np.array([3.0, 0.0, -2.0, 1.0]), causal=True, window_size=(1, -1)),
    "everything": dict(softcap=2.0, alibi_slopes=np.array([0.3, 0.2, 0.1, 0.05], np.float32),
                       window_size=(4, 2), attn_mask=np.random.default_rng(5).standard_normal((9,)),
                       dropout_p=0.25, dropout_mask=np.random.default_rng(6).random((1, 4, 7, 9)) >= 0.25,
                       learnable_sink=np.array([1.0, -0.5, 0.25, -3.0])),
}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_gradients_match_finite_differences(name, layout):
    rng = np.random.default_rng(7)
    q, dout = rng.standard_normal((2, 2, 7, 4, 5))
    k, v = rng.standard_normal((2, 2, 9, 2, 5))
    check_directional_derivatives(Case(q, k, v, dout, VARIANTS[name], layout))


def test_softcap_derivative_is_the_chain_rule():
    """dq of one query and two keys, written out: the score gradient goes through tanh'."""
    q = np.array([0.7, -0.4]).reshape(1, 1, 1, 2)
    k = np.array([[1.0, 2.0], [-0.5, 0.3]]).reshape(1, 2, 1, 2)
    v = np.array([[1.0, 0.5], [-2.0, 1.0]]).reshape(1, 2, 1, 2)
    dout = np.ones((1, 1, 1, 2))
    cap, scale = 0.8, 1.3
    out, lse = reference.attention(q, k, v, softcap=cap, scale=scale, return_lse=True)
    dq, _, _ = reference.attention_backward(dout, q, k, v, out, lse, softcap=cap, scale=scale)
    x = scale * k[0, :, 0] @ q[0, 0, 0]
    s = cap * np.tanh(x / cap)
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    dp = v[0, :, 0] @ dout[0, 0, 0]
    ds = p * (dp - p @ dp)
    expected = scale * (ds * (1 - np.tanh(x / cap) ** 2)) @ k[0, :, 0]
    np.testing.assert_allclose(dq[0, 0, 0], expected, rtol=1e-13)


# --- dbias -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9,), (7, 9), (1, 4, 1, 9), (2, 1, 7, 1), (2, 4, 7, 9), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dbias_comes_in_the_mask_shape_and_dtype_summed_over_broadcasts(shape, dtype):
    rng = np.random.default_rng(8)
    q, dout = rng.standard_normal((2, 2, 7, 4, 3))
    k, v = rng.standard_normal((2, 2, 9, 2, 3))
    bias = rng.standard_normal(shape).astype(dtype)
    out, lse = reference.attention(q, k, v, attn_mask=bias, return_lse=True)
    *_, dbias = reference.attention_backward(dout, q, k, v, out, lse, attn_mask=bias, return_dbias=True)
    assert dbias.shape == shape and dbias.dtype == dtype
    full = np.broadcast_to(bias, (2, 4, 7, 9)).astype(np.float64)  # the same values, no broadcast
    *_, dfull = reference.attention_backward(dout, q, k, v, out, lse, attn_mask=full, return_dbias=True)
    want = dfull.sum(axis=tuple(range(4 - len(shape))))
    want = want.sum(axis=tuple(a for a, n in enumerate(shape) if n == 1), keepdims=True)
    np.testing.assert_allclose(dbias.astype(np.float64), want, rtol=np.finfo(dtype).eps, atol=1e-10)


def test_dbias_is_ds_and_sums_to_zero_per_row():
    """dbias of a full-shape bias is dS: dq = scale dS k, and each row sums to 0 (a bias
    gradient cannot shift a row's softmax); masked pairs get 0."""
    rng = np.random.default_rng(9)
    q, dout = rng.standard_normal((2, 2, 6, 2, 4))
    k, v = rng.standard_normal((2, 2, 8, 2, 4))
    bias = rng.standard_normal((2, 2, 6, 8))
    kw = dict(attn_mask=bias, causal=True, scale=0.7)
    out, lse = reference.attention(q, k, v, **kw, return_lse=True)
    dq, _, _, dbias = reference.attention_backward(dout, q, k, v, out, lse, **kw, return_dbias=True)
    np.testing.assert_allclose(dq, 0.7 * np.einsum("bhqk,bkhd->bqhd", dbias, k), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dbias.sum(axis=-1), 0.0, atol=1e-14)
    assert (dbias[..., reference.causal_mask(6, 8)] == 0).all()


# --- masked pairs and fully masked rows -----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_pair_ignores_nan_value(dtype):
    q = k = np.ones((1, 3, 1, 1), dtype)
    v = np.array([1.0, 2.0, np.nan], dtype).reshape(1, 3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
        dq, dk, dv = reference.attention_backward(np.ones_like(q), q, k, v, out, lse, causal=True)
    np.testing.assert_allclose(out.ravel(), [1.0, 1.5, np.nan], rtol=1e-15)  # NaN only in the last row
    np.testing.assert_allclose(lse.ravel(), np.log([1.0, 2.0, 3.0]) + 1.0, rtol=1e-15)
    assert dq[0, 0, 0, 0] == 0 and np.isfinite(dq[0, 1]).all() and np.isnan(dq[0, 2]).all()
    np.testing.assert_allclose(dv.ravel(), [1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3], rtol=1e-15)


def test_masked_pair_keeps_an_infinite_gradient_finite_elsewhere():
    """Head 1's only row is -inf by data (masked); head 0 sees an inf value, so its dS is -inf at a
    live pair: dk of that key is -inf, and head 1's -inf q adds nothing (not 0 * -inf = NaN)."""
    q = np.array([0.5, -np.inf]).reshape(1, 1, 2, 1)
    k = np.array([0.6, 0.1]).reshape(1, 2, 1, 1)
    v = np.array([-0.5, np.inf]).reshape(1, 2, 1, 1)
    dout = np.array([1.3, 0.9]).reshape(1, 1, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = reference.attention(q, k, v, return_lse=True)
        dq, dk, dv = reference.attention_backward(dout, q, k, v, out, lse)
    assert np.isposinf(out[0, 0, 0, 0]) and out[0, 0, 1, 0] == 0 and np.isneginf(lse[0, 1, 0])
    assert np.isnan(dq[0, 0, 0, 0]) and dq[0, 0, 1, 0] == 0
    assert np.isneginf(dk[0, 0, 0, 0]) and np.isnan(dk[0, 1, 0, 0])
    assert np.isfinite(dv).all()


POISON = st.sampled_from([np.nan, np.inf, -np.inf])


@given(cases(masks=("none",)), st.sampled_from(["bool", "bias"]), st.data())
def test_masked_pairs_ignore_poisoned_rows(c, how, data):
    """Keys no query sees and queries that see no key may hold NaN/inf: nothing else changes,
    and their out, lse and gradients are those of a fully masked row or an unseen key."""
    b, sq, h, _ = c.q.shape
    sk = c.k.shape[1]
    i0, j0 = data.draw(st.integers(0, sq - 1)), data.draw(st.integers(0, sk - 1))
    hidden = np.zeros((sq, sk), bool)
    hidden[i0, :] = hidden[:, j0] = True
    c.kw["attn_mask"] = ~hidden if how == "bool" else np.where(hidden, -np.inf, 0.25)
    clean_out, clean_lse = c.forward()
    clean_grads = c.backward()
    for x, row in ((c.q, i0), (c.dout, i0), (c.k, j0), (c.v, j0)):
        x[:, row, :, data.draw(st.integers(0, x.shape[3] - 1))] = data.draw(POISON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = c.forward()
        grads = c.backward()
    for got, want in zip((out, lse) + grads, (clean_out, clean_lse) + clean_grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)  # NaN only where clean has one
    assert (out[:, i0] == 0).all() and np.isneginf(lse[:, :, i0]).all() and (grads[0][:, i0] == 0).all()
    assert (grads[1][:, j0] == 0).all() and (grads[2][:, j0] == 0).all()


def full_problem(seed=10, sq=5, sk=6, h=2, hkv=1):
    rng = np.random.default_rng(seed)
    q, dout = rng.standard_normal((2, 1, sq, h, 3))
    k, v = rng.standard_normal((2, 1, sk, hkv, 3))
    return q, k, v, dout


def dead_row_bool_mask():
    mask = np.ones((5, 6), bool)
    mask[2] = False
    return full_problem(), dict(attn_mask=mask), [2]


def dead_row_bias():
    bias = np.zeros((1, 2, 5, 6))
    bias[..., 2, :] = -np.inf
    return full_problem(), dict(attn_mask=bias, softcap=2.0), [2]


def dead_rows_window():
    # offset -4: row i sees keys [i - 5, i - 4], none for i < 4.
    return full_problem(sq=7, sk=3), dict(window_size=(1, 0)), [0, 1, 2, 3]


def dead_row_by_data():
    q, k, v, dout = full_problem()
    k[:] = np.abs(k) + 0.1
    q[0, 3] = -np.inf  # every score of row 3 is -inf
    return (q, k, v, dout), {}, [3]


@pytest.mark.parametrize("make", [dead_row_bool_mask, dead_row_bias, dead_rows_window, dead_row_by_data])
def test_fully_masked_rows_give_zero_and_neg_inf_without_nan(make):
    (q, k, v, dout), kw, dead = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = reference.attention(q, k, v, **kw, return_lse=True)
        dq, dk, dv = reference.attention_backward(dout, q, k, v, out, lse, **kw)
    live = [i for i in range(q.shape[1]) if i not in dead]
    assert (out[:, dead] == 0).all() and np.isneginf(lse[:, :, dead]).all() and (dq[:, dead] == 0).all()
    assert np.isfinite(lse[:, :, live]).all()
    for x in (out, dq, dk, dv):
        assert np.isfinite(x).all()
    if "window_size" in kw:
        return  # the window moves with seqlen_q, so dropping rows changes it
    # The dead rows add nothing: dk and dv are those of the live rows alone.
    kw = {n: (x[..., live, :] if n == "attn_mask" else x) for n, x in kw.items()}
    q, dout = q[:, live], dout[:, live]
    out, lse = reference.attention(q, k, v, **kw, return_lse=True)
    _, dk_live, dv_live = reference.attention_backward(dout, q, k, v, out, lse, **kw)
    np.testing.assert_allclose(dk, dk_live, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dv, dv_live, rtol=1e-13, atol=1e-15)


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


def test_nan_score_gives_nan_lse_and_inf_score_gives_inf_lse():
    q, k, v, _ = full_problem()
    q[0, 1, 0, 0] = np.nan
    bias = np.zeros((5, 6))
    bias[3, 4] = np.inf
    bias[4, 0] = np.nan
    lse = reference.attention(q, k, v, attn_mask=bias, return_lse=True)[1]
    assert np.isnan(lse[0, 0, 1]) and np.isnan(lse[0, :, 4]).all()
    assert np.isposinf(lse[0, :, 3]).all()
    assert np.isfinite(lse[0, 1, [0, 1, 2]]).all() and np.isfinite(lse[0, 0, [0, 2]]).all()


# --- equivalences ----------------------------------------------------------------------------


def assert_same_results(c, kw_a, kw_b, factor=1.0):
    """Forward and backward of two spellings of one problem agree (out and grads of ``kw_a`` are
    ``factor`` times those of ``kw_b``; lse is unchanged)."""
    out_a, lse_a = c.forward(**kw_a)
    out_b, lse_b = c.forward(**kw_b)
    np.testing.assert_allclose(out_a, factor * out_b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse_a, lse_b, rtol=1e-13, atol=1e-13)
    for ga, gb in zip(c.backward(**kw_a), c.backward(**kw_b)):
        np.testing.assert_allclose(ga, factor * gb, rtol=1e-11, atol=1e-12)


def window_as_mask(sq, sk, left, right):
    """The window rule of docs/variants.md, one pair at a time."""
    off = sk - sq
    return np.array([[(left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
                      for j in range(sk)] for i in range(sq)])


@given(cases(masks=("none",), dropout=False), st.integers(-1, 10), st.integers(-1, 10))
def test_window_equals_its_bool_mask(c, left, right):
    c.kw.pop("causal", None)
    c.kw.pop("window_size", None)
    mask = window_as_mask(c.q.shape[1], c.k.shape[1], left, right)
    assert_same_results(c, dict(window_size=(left, right)), dict(attn_mask=mask))


@given(cases(masks=("none",), dropout=False), st.integers(-1, 10), st.integers(-1, 10))
def test_causal_is_window_with_right_zero(c, left, right):
    c.kw.pop("causal", None)
    c.kw.pop("window_size", None)
    assert_same_results(c, dict(window_size=(-1, 0)), dict(causal=True))
    assert_same_results(c, dict(window_size=(left, right), causal=True), dict(window_size=(left, 0)))
    assert_same_results(c, dict(causal=True), dict(attn_mask=~reference.causal_mask(c.q.shape[1], c.k.shape[1])))


@given(cases(dropout=False), st.sampled_from([(1,), (2,)]))
def test_alibi_equals_its_bias(c, per):
    c.kw.pop("alibi_slopes", None)
    mask = c.kw.pop("attn_mask", None)
    b, sq, h, _ = c.q.shape
    sk = c.k.shape[1]
    slopes = np.random.default_rng(11).uniform(0, 1, (b, h) if per == (2,) else (h,)).astype(np.float32)
    dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :])
    bias = -np.broadcast_to(slopes, (b, h))[:, :, None, None].astype(np.float64) * dist
    kw_alibi = dict(alibi_slopes=slopes)
    if mask is not None and mask.dtype == bool:  # a bool mask becomes -inf in the bias
        kw_alibi["attn_mask"] = mask
        bias = np.where(mask, bias, -np.inf)
    assert_same_results(c, kw_alibi, dict(attn_mask=bias))


@given(cases(masks=("none",)), st.integers(1, 4))
def test_zero_bias_equals_no_mask(c, ndim):
    zeros = np.zeros((c.q.shape[0], c.q.shape[2], c.q.shape[1], c.k.shape[1])[4 - ndim:])
    assert_same_results(c, dict(attn_mask=zeros), {})
    *_, dbias = c.backward(attn_mask=zeros, return_dbias=True)
    assert dbias.shape == zeros.shape


@given(cases(dropout=False), st.floats(0.01, 0.95))
def test_dropout_keeping_everything_is_a_scaled_output(c, p):
    b, sq, h, _ = c.q.shape
    keep = np.ones((b, h, sq, c.k.shape[1]), bool)
    assert_same_results(c, dict(dropout_p=p, dropout_mask=keep), {}, factor=1 / (1 - p))
    assert_same_results(c, dict(dropout_p=p, dropout_mask=np.ones((1,), bool)), {}, factor=1 / (1 - p))


@given(cases(dropout=False), st.floats(0.05, 0.9), st.integers(0, 2**64 - 1))
def test_dropout_seed_draws_the_philox_mask(c, p, seed):
    b, sq, h, _ = c.q.shape
    keep = _philox.dropout_mask((b, h, sq, c.k.shape[1]), p, seed)
    assert_same_results(c, dict(dropout_p=p, dropout_seed=seed), dict(dropout_p=p, dropout_mask=keep))


def test_dropout_drops_exactly_the_dropped_pairs():
    """Dropping a pair removes its P_ij v_j: out with a mask equals a sum of the kept terms."""
    q, k, v, _ = full_problem(sq=4, sk=4, h=1)
    keep = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], bool)
    out, lse = reference.attention(q, k, v, dropout_p=0.5, dropout_mask=keep, return_lse=True)
    p = np.exp(np.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / np.sqrt(3) - lse[0, 0][:, None])
    np.testing.assert_allclose(out[0, :, 0], (p * keep * 2) @ v[0, :, 0], rtol=1e-13, atol=1e-15)
    assert (out[0, 1] == 0).all()


@given(cases())
def test_layouts_agree(c):
    bshd = Case(c.q, c.k, c.v, c.dout, c.kw, "bshd")
    bhsd = Case(c.q, c.k, c.v, c.dout, c.kw, "bhsd")
    for a, b in zip(bshd.forward() + bshd.backward(), bhsd.forward() + bhsd.backward()):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


# --- arguments ---------------------------------------------------------------------------------


def test_dropout_without_mask_or_seed_names_dropout_mask():
    q, k, v, dout = full_problem()
    with pytest.raises(ValueError, match=r"reference.attention: dropout_mask .*got neither"):
        reference.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"reference.attention_backward: dropout_mask"):
        reference.attention_backward(dout, q, k, v, dout, np.zeros((1, 2, 5)), dropout_p=0.1)


@pytest.mark.parametrize("mask, exc, match", [
    (np.ones((5, 6), np.float32), TypeError, "must have dtype bool"),
    (np.ones((5, 5), bool), ValueError,
     r"must broadcast to \(batch, nheads, seqlen_q, seqlen_k\)=\(1, 2, 5, 6\), got \(5, 5\)"),
    ([[True]], TypeError, "must be a bool numpy.ndarray or cupy.ndarray, got list"),
])
def test_bad_dropout_mask(mask, exc, match):
    q, k, v, _ = full_problem()
    with pytest.raises(exc, match=f"reference.attention: dropout_mask {match}"):
        reference.attention(q, k, v, dropout_p=0.1, dropout_mask=mask)


def test_dropout_mask_without_dropout_is_rejected():
    q, k, v, _ = full_problem()
    with pytest.raises(ValueError, match="dropout_mask must be None when dropout_p is 0"):
        reference.attention(q, k, v, dropout_mask=np.ones((5, 6), bool))


def test_a_sink_is_a_key_whose_value_is_zero():
    """A learnable sink gives what one more key does whose score in every row of head h is sink[h] and whose
    value is zero (its k is made to give that score); a row that sees no key gives out 0 and lse = sink."""
    rng = np.random.default_rng(10)
    q, dout = rng.standard_normal((2, 1, 5, 2, 4))
    k, v = rng.standard_normal((2, 1, 6, 2, 4))
    sink = np.array([0.7, -1.5])
    mask = np.ones((1, 1, 5, 6), bool)
    mask[..., 2, :] = False  # row 2 sees no key
    out, lse = reference.attention(q, k, v, attn_mask=mask, learnable_sink=sink, return_lse=True)
    # the extra key: q . k_sink scale = sink for every row, through a bias column over a zero key
    k_ext, v_ext = np.concatenate([k, np.zeros((1, 1, 2, 4))], axis=1), np.concatenate([v, np.zeros((1, 1, 2, 4))], axis=1)
    bias = np.concatenate([np.where(mask, 0.0, -np.inf).repeat(2, axis=1), np.broadcast_to(sink[None, :, None, None],
                                                                                       (1, 2, 5, 1))], axis=-1)
    want_out, want_lse = reference.attention(q, k_ext, v_ext, attn_mask=bias, return_lse=True)
    np.testing.assert_allclose(out, want_out, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-13)
    assert (out[:, 2] == 0).all() and np.array_equal(lse[0, :, 2], sink)
    *_, dsink = reference.attention_backward(dout, q, k, v, out, lse, attn_mask=mask, learnable_sink=sink,
                                             return_dsink=True)
    *_, dbias = reference.attention_backward(dout, q, k_ext, v_ext, want_out, want_lse, attn_mask=bias,
                                             return_dbias=True)
    np.testing.assert_allclose(dsink, dbias[0, :, :, -1].sum(axis=-1), rtol=1e-12, atol=1e-15)


def test_return_dsink_needs_a_sink():
    q, k, v, dout = full_problem()
    out, lse = reference.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="reference.attention_backward: return_dsink"):
        reference.attention_backward(dout, q, k, v, out, lse, return_dsink=True)


@pytest.mark.parametrize("mask", [None, np.ones((5, 6), bool)])
def test_return_dbias_needs_a_float_mask(mask):
    q, k, v, dout = full_problem()
    out, lse = reference.attention(q, k, v, attn_mask=mask, return_lse=True)
    with pytest.raises(ValueError, match="reference.attention_backward: return_dbias"):
        reference.attention_backward(dout, q, k, v, out, lse, attn_mask=mask, return_dbias=True)


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


@pytest.mark.gpu
def test_reference_takes_cupy_arrays_mixed_with_numpy():
    import cupy

    q, k, v, dout = full_problem()
    bias = np.random.default_rng(12).standard_normal((2, 5, 6))
    slopes = np.array([0.5, 0.25], np.float32)
    kw = dict(attn_mask=bias, alibi_slopes=slopes, softcap=3.0, dropout_p=0.2, dropout_seed=5)
    want = reference.attention(q, k, v, **kw)
    got = reference.attention(cupy.asarray(q), k, cupy.asarray(v), **{**kw, "attn_mask": cupy.asarray(bias)})
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, want)
