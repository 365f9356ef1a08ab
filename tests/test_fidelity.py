"""Fidelity at large logits, measured against an extended-precision evaluation.

A float64 reference rounds the way naive float64 attention does, so the difference between the two
understates naive attention's own error (at logits of a few hundred, by two orders of magnitude) and
makes any other float64 algorithm look worse than it is. Here the ground truth is the same formula in
``numpy.longdouble`` (a 64-bit mantissa on x86-64), and cupyflash's float32 and float64 results must
stay within the rule of the float32/float64 issue: out within 2x, gradients within 3x the error of naive
attention in the same dtype, both against that ground truth, plus 1e-13 of the largest value.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from helpers import naive_attention, naive_attention_backward

LD = np.longdouble
pytestmark = pytest.mark.skipif(np.finfo(LD).eps > np.finfo(np.float64).eps / 100,
                                reason="numpy.longdouble is no wider than float64 on this platform")
FACTORS = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}


def extended(q, k, v, dout, causal, scale):
    """out, dq, dk, dv of plain softmax attention in longdouble; (batch, seqlen, heads, headdim) arrays,
    GQA; a row that sees no key gives zeros."""
    nheads, nheads_kv = q.shape[2], k.shape[2]
    group = nheads // nheads_kv
    qq, kk, vv, dd = (np.moveaxis(np.asarray(x).astype(LD), 2, 1) for x in (q, k, v, dout))
    kk, vv = np.repeat(kk, group, 1), np.repeat(vv, group, 1)
    seqlen_q, seqlen_k = qq.shape[2], kk.shape[2]
    s = qq @ kk.swapaxes(-1, -2) * LD(scale)
    visible = np.ones((seqlen_q, seqlen_k), bool)
    if causal:
        visible = np.arange(seqlen_k)[None] <= np.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    seen = visible.any(-1)[:, None]
    s = np.where(visible, s, -np.inf)
    m = np.where(seen, s.max(-1, keepdims=True), 0)
    p = np.where(visible, np.exp(s - m), 0)
    p = np.where(seen, p / np.where(seen, p.sum(-1, keepdims=True), 1), 0)
    out = p @ vv
    dp = dd @ vv.swapaxes(-1, -2)
    ds = p * (dp - (dd * out).sum(-1, keepdims=True))

    def per_kv_head(x):  # sum each GQA group's query heads
        b, _, n, d = x.shape
        return x.reshape(b, nheads_kv, group, n, d).sum(2)

    dq = ds @ kk * LD(scale)
    dk = per_kv_head(ds.swapaxes(-1, -2) @ qq * LD(scale))
    dv = per_kv_head(p.swapaxes(-1, -2) @ dd)
    return {name: np.moveaxis(x, 1, 2) for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))}


def assert_within_the_rule(ours, naive, exact):
    for name, factor in FACTORS.items():
        truth = exact[name]
        err_ours = float(np.abs(np.asarray(ours[name]).astype(LD) - truth).max())
        err_naive = float(np.abs(np.asarray(naive[name]).astype(LD) - truth).max())
        bound = factor * err_naive + 1e-13 * float(np.abs(truth).max())
        assert err_ours <= bound, f"{name}: error {err_ours:.3g} > {factor} x naive {err_naive:.3g} + floor"


def run(q, k, v, dout, causal, to_device=lambda x: x, to_host=np.asarray):
    scale = 1.0 / np.sqrt(q.shape[-1])
    dq_, dk_, dv_ = (to_device(x) for x in (q, k, v))
    out, lse = cupyflash.attention(dq_, dk_, dv_, causal=causal, return_lse=True)
    grads = cupyflash.attention_backward(to_device(dout), dq_, dk_, dv_, out, lse, causal=causal)
    ours = dict(zip(FACTORS, (to_host(x) for x in (out, *grads))))
    naive_out, _ = naive_attention(q, k, v, causal, scale)
    naive = dict(zip(FACTORS, (naive_out, *naive_attention_backward(dout, q, k, v, causal, scale))))
    assert_within_the_rule(ours, naive, extended(q, k, v, dout, causal, scale))


def inputs(seed, dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, logit_scale):
    """Random q, k, v, dout; q and k scaled so that the logits reach about logit_scale times those of
    unit inputs."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim)) * np.sqrt(logit_scale)
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim)) * np.sqrt(logit_scale)
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    dout = rng.standard_normal((batch, seqlen_q, nheads, headdim))
    return tuple(x.astype(dtype) for x in (q, k, v, dout))


# The shape of the float64 report: dq and dk looked 47x worse than naive against a float64 reference.
REPORTED = dict(batch=2, seqlen_q=129, seqlen_k=257, nheads=4, nheads_kv=2, headdim=96)


def test_reported_shape_at_logits_times_64():
    """q, k and v times 8 (logits about 64x those of unit inputs), causal, float64."""
    q, k, v, dout = inputs(0, np.float64, logit_scale=64, **REPORTED)
    run(q, k, 8 * v, dout, causal=True)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), logit_scale=st.sampled_from([1, 4, 20, 100]), causal=st.booleans(),
       shape=st.sampled_from([(1, 40, 70, 2, 1, 32), (2, 65, 33, 2, 2, 64), (1, 17, 130, 4, 2, 16)]))
def test_float64_numpy_backend_within_the_rule(seed, logit_scale, causal, shape):
    run(*inputs(seed, np.float64, *shape, logit_scale), causal)


# Open (the float32/float64 issue asks for inputs up to x20, logits up to x400): the recomputed
# probabilities exp(x - lse) inherit the rounding of lse, stored in the compute dtype, |lse| eps, which
# naive attention (exp(x - max) / sum) does not pay; at large logits and in float32 that exceeds the
# rule. strict: these fail the suite once they pass, so the marker goes with the fix.
KNOWN_GAPS = [(1015, np.float64, 400, False, (1, 40, 70, 2, 1, 32)), (2, np.float32, 20, False, (1, 40, 70, 2, 1, 32))]


@pytest.mark.xfail(strict=True, reason="lse in the compute dtype: |lse| eps in every recomputed probability")
@pytest.mark.parametrize("seed, dtype, logit_scale, causal, shape", KNOWN_GAPS)
def test_known_gaps(seed, dtype, logit_scale, causal, shape):
    run(*inputs(seed, dtype, *shape, logit_scale), causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, logit_scale", [(np.float32, 1), (np.float64, 1), (np.float64, 64)])
def test_cuda_kernels_within_the_rule(dtype, logit_scale):
    """The reported shape on the CUDA kernels (float32 and float64 run on CUDA cores)."""
    cp = pytest.importorskip("cupy")
    q, k, v, dout = inputs(1, dtype, logit_scale=logit_scale, **REPORTED)
    run(q, k, v, dout, True, to_device=cp.asarray, to_host=cp.asnumpy)
