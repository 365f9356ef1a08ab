"""Fidelity at large logits, measured against an extended-precision evaluation.

A float64 reference rounds the way naive float64 attention does, so the difference between the two
understates naive attention's own error (at logits of a few hundred, by two orders of magnitude) and
makes any other float64 algorithm look worse than it is. Here the ground truth is the same formula in
``numpy.longdouble`` (a 64-bit mantissa on x86-64), and cupyflash's float32 and float64 results must
stay within the rule of the float32/float64 issue: out within 2x, gradients within 3x the error of naive
attention in the same dtype, both against that ground truth, plus 1e-13 of the largest value.

Two sources of error are not the algorithm's and blur that comparison at large logits, so the tests that
go up to inputs x20 (logits x400) take them apart:

* score rounding: x = scale q.k is rounded (|x| eps per score) in cupyflash and in the naive computation
  independently, and either may be the luckier one; at logits x100 and more in float32 (x400 in float64)
  that alone puts a random-input case past the rule now and then, whatever the softmax does;
* cancellation in ds = p (dp - delta): delta = rowsum(dout * out) (FlashAttention's) against the naive
  rowsum(p * dp), which for a one-hot row cancels dp's own rounding exactly; the difference is a few eps
  of the magnitude (without cancellation) of the gradients, independent of the logits' size.

The exact-score tests take q and k on a dyadic grid and a power-of-two scale, so that every score is exact
in every computation (cupyflash, naive, ground truth), and allow FLOOR_ULPS eps of each tensor's
magnitude (tests/helpers.error_scales, without its logit term) for the second: what is left is the error
of the softmax itself, and that is where the rounding of lse would show (|lse| eps in every recomputed
probability; lse ~ the largest logit) if the backward did not renormalize (cuda_src/mask.cuh,
row_renormalizer).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from cupyflash import _validate
from helpers import eps, error_scales, naive_attention, naive_attention_backward

LD = np.longdouble
pytestmark = pytest.mark.skipif(np.finfo(LD).eps > np.finfo(np.float64).eps / 100,
                                reason="numpy.longdouble is no wider than float64 on this platform")
FACTORS = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}
# The exact-score tests' floor, in eps of the compute dtype times each tensor's magnitude: sweeps of 400
# cases per dtype and logit scale needed at most 0.5 (a float64 lse for float32 inputs, or float64) where
# a float32 lse needs 2 at logits x4, 24 at x20 and 250 at x400.
FLOOR_ULPS = 2.0


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


def assert_within_the_rule(ours, naive, exact, floors=None):
    for name, factor in FACTORS.items():
        truth = exact[name]
        err_ours = float(np.abs(np.asarray(ours[name]).astype(LD) - truth).max())
        err_naive = float(np.abs(np.asarray(naive[name]).astype(LD) - truth).max())
        floor = 1e-13 * float(np.abs(truth).max()) + (floors or {}).get(name, 0.0)
        bound = factor * err_naive + floor
        assert err_ours <= bound, f"{name}: error {err_ours:.3g} > {factor} x naive {err_naive:.3g} + floor {floor:.3g}"


def run(q, k, v, dout, causal, scale=None, floor_ulps=0.0, to_device=lambda x: x, to_host=np.asarray):
    """cupyflash's out and gradients within the rule, plus ``floor_ulps`` eps(compute dtype) of each
    tensor's magnitude."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    dq_, dk_, dv_ = (to_device(x) for x in (q, k, v))
    out, lse = cupyflash.attention(dq_, dk_, dv_, causal=causal, scale=scale, return_lse=True)
    grads = cupyflash.attention_backward(to_device(dout), dq_, dk_, dv_, out, lse, causal=causal, scale=scale)
    ours = dict(zip(FACTORS, (to_host(x) for x in (out, *grads))))
    naive_out, _ = naive_attention(q, k, v, causal, scale)
    naive = dict(zip(FACTORS, (naive_out, *naive_attention_backward(dout, q, k, v, causal, scale))))
    floors = None
    if floor_ulps:
        unit = floor_ulps * eps(_validate.compute_dtype(q.dtype))
        floors = {name: unit * size for name, size in error_scales(q, k, v, dout, causal, scale).items()}
    assert_within_the_rule(ours, naive, extended(q, k, v, dout, causal, scale), floors)


def inputs(seed, dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, logit_scale):
    """Random q, k, v, dout; q and k scaled so that the logits reach about logit_scale times those of
    unit inputs."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim)) * np.sqrt(logit_scale)
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim)) * np.sqrt(logit_scale)
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    dout = rng.standard_normal((batch, seqlen_q, nheads, headdim))
    return tuple(x.astype(dtype) for x in (q, k, v, dout))


def exact_inputs(seed, dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, logit_scale):
    """``(q, k, v, dout), scale`` like :func:`inputs`, but with every score exact: q and k on a dyadic grid
    (16 to 32 steps per standard deviation) and scale the power of two nearest 1/sqrt(headdim), so each
    product q_d k_d is a whole number of grid steps squared and no sum of them reaches 2^24 of those."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(logit_scale)
    step = 2.0 ** (np.floor(np.log2(sigma)) - 4)
    q = np.round(rng.standard_normal((batch, seqlen_q, nheads, headdim)) * sigma / step) * step
    k = np.round(rng.standard_normal((batch, seqlen_k, nheads_kv, headdim)) * sigma / step) * step
    assert np.abs(q).max() * np.abs(k).max() * headdim < 2.0**24 * step**2
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    dout = rng.standard_normal((batch, seqlen_q, nheads, headdim))
    scale = 2.0 ** -np.round(np.log2(np.sqrt(headdim)))
    return tuple(x.astype(dtype) for x in (q, k, v, dout)), float(scale)


def run_exact(seed, dtype, logit_scale, causal, shape, **device):
    (q, k, v, dout), scale = exact_inputs(seed, dtype, *shape, logit_scale)
    run(q, k, v, dout, causal, scale=scale, floor_ulps=FLOOR_ULPS, **device)


# The shape of the float64 report: dq and dk looked 47x worse than naive against a float64 reference.
REPORTED = dict(batch=2, seqlen_q=129, seqlen_k=257, nheads=4, nheads_kv=2, headdim=96)


def test_reported_shape_at_logits_times_64():
    """q, k and v times 8 (logits about 64x those of unit inputs), causal, float64."""
    q, k, v, dout = inputs(0, np.float64, logit_scale=64, **REPORTED)
    run(q, k, 8 * v, dout, causal=True)


SHAPES = [(1, 40, 70, 2, 1, 32), (2, 65, 33, 2, 2, 64), (1, 17, 130, 4, 2, 16), (1, 64, 96, 2, 1, 128)]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), logit_scale=st.sampled_from([1, 4, 20]), causal=st.booleans(),
       shape=st.sampled_from(SHAPES))
def test_float64_numpy_backend_within_the_rule(seed, logit_scale, causal, shape):
    """Random inputs up to x4.5, the rule as it stands; from logits x100 score rounding and delta's
    cancellation put a case past it now and then (KNOWN_GAPS has one of each; the exact-score test goes to
    x400)."""
    run(*inputs(seed, np.float64, *shape, logit_scale), causal)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       logit_scale=st.sampled_from([1, 4, 20, 100, 400]), causal=st.booleans(), shape=st.sampled_from(SHAPES))
def test_exact_scores_within_the_rule(seed, dtype, logit_scale, causal, shape):
    """Inputs x1 to x20 with exact scores: lse's rounding (|lse| eps in every recomputed probability, 250
    eps of the gradients' magnitude at x400 in float32) is divided out by the backward's renormalized
    recomputation, so what is left is as good as with an exact lse."""
    run_exact(seed, dtype, logit_scale, causal, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["default", "simt"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_kernels_exact_scores_at_logits_x400(dtype, family, monkeypatch):
    """Both kernel families that float32 and float64 run on (tensor cores, CUDA cores), each shape of
    SHAPES, causal and not: the renormalized recomputation, and scores whose scale goes into the
    exponent's FMA (x = s (scale log2 e) would round every exact score by |x| eps)."""
    cp = pytest.importorskip("cupy")
    from cupyflash import _cuda_backend

    if family == "default":
        monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(_cuda_backend.FAMILY_VARIABLE, family)
    for seed, shape in enumerate(SHAPES):
        for causal in (False, True):
            run_exact(seed, dtype, 400, causal, shape, to_device=cp.asarray, to_host=cp.asnumpy)


# Cases that fail, each for its reason. strict: a case fails the suite once it passes, so its entry goes
# with the fix.
SCORES = ("score rounding: at logits x100 each score carries |x| eps of its own rounding, independent of the "
          "naive computation's, and here the naive one is the luckier (the exact-score tests exclude it)")
DELTA = ("cancellation in ds = p (dp - delta) with delta = rowsum(dout * out), which the naive rowsum(p * dp) "
         "escapes on a near one-hot row: fails even with a float64 lse, passes with the exact-score tests' floor")
KNOWN_GAPS = [
    ("random", 35937337, np.float64, 100, False, (1, 64, 96, 2, 1, 128), SCORES),
    ("random", 2, np.float32, 20, False, (1, 40, 70, 2, 1, 32), DELTA),
]


@pytest.mark.parametrize("kind, seed, dtype, logit_scale, causal, shape", [
    pytest.param(*case[:-1], marks=pytest.mark.xfail(strict=True, reason=case[-1])) for case in KNOWN_GAPS])
def test_known_gaps(kind, seed, dtype, logit_scale, causal, shape):
    if kind == "exact":
        run_exact(seed, dtype, logit_scale, causal, shape)
    else:
        run(*inputs(seed, dtype, *shape, logit_scale), causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, logit_scale", [(np.float32, 1), (np.float64, 1), (np.float64, 64)])
def test_cuda_kernels_within_the_rule(dtype, logit_scale):
    """The reported shape on the CUDA kernels (float32 and float64 run on CUDA cores)."""
    cp = pytest.importorskip("cupy")
    q, k, v, dout = inputs(1, dtype, logit_scale=logit_scale, **REPORTED)
    run(q, k, v, dout, True, to_device=cp.asarray, to_host=cp.asnumpy)
