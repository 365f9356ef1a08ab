"""Every variant of the formula on the CUDA kernels (marker `gpu`): window, softcap, ALiBi, bool
masks, float biases with their gradient, dropout, learnable sinks with theirs — alone and combined,
on every dtype and kernel family — against the float64 reference by flash-attn's rule (2x out, 3x
gradients of the same-dtype naive error, plus a rounding floor), with every output poisoned before
the kernels run. Then the equivalences no tolerance can be tuned to, the dropout bits, and NaN
containment."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from cupyflash import _plan
from helpers import (BFLOAT16, BWD_FLOOR_ULPS, DTYPES, FWD_FLOOR_ULPS, Problem, assert_close_flash_rule, error_scales,
                     flash_floor, naive_attention, naive_attention_backward,
                     sink_gradients_with_nan_in_a_row_without_keys)
from test_gpu import bitwise_equal, poisoned_outputs  # noqa: F401  (fixture)
from test_gpu import to_device as _to_device

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")
from cupyflash import _cuda_backend  # noqa: E402

RNG = np.random.default_rng(2026)


def to_device(x):
    """Host array to the device bit for bit (bool masks as they are)."""
    return cp.asarray(x) if x.dtype == np.bool_ else _to_device(x)


def slopes(nheads, batch=None):
    shape = (nheads,) if batch is None else (batch, nheads)
    return RNG.uniform(0.01, 0.5, shape).astype(np.float32)


def sinks(nheads, dtype):
    """Sink logits of every size against N(0, 1) scores: above them, among them, far below; one head none."""
    sink = RNG.choice([4.0, 0.5, -1.0, -30.0], nheads) + RNG.uniform(-0.5, 0.5, nheads)
    sink[RNG.integers(nheads)] = -np.inf
    return sink.astype(dtype)


def variant(name, p, dtype=None):
    """Keywords of one named variant for problem ``p`` (host arrays)."""
    b, h, sq, sk = p.batch, p.nheads, p.seqlen_q, p.seqlen_k
    dtype = dtype or p.dtype
    return {
        "window": dict(window_size=(int(RNG.integers(0, sk)), int(RNG.integers(-1, 8)))),
        "sliding": dict(causal=True, window_size=(int(RNG.integers(0, 64)), -1)),
        "softcap": dict(softcap=float(RNG.uniform(1.0, 30.0))),
        "alibi": dict(alibi_slopes=slopes(h)),
        "alibi_batch": dict(alibi_slopes=slopes(h, b), causal=True),
        "padding": dict(attn_mask=RNG.random((b, 1, 1, sk)) > 0.25),
        "bool_mask": dict(attn_mask=RNG.random((b, h, sq, sk)) > 0.5),
        "bias": dict(attn_mask=RNG.standard_normal((1, h, sq, sk)).astype(dtype)),
        "bias_2d": dict(attn_mask=(RNG.standard_normal((sq, sk)) * 3).astype(np.float32)),
        "dropout": dict(dropout_p=float(RNG.uniform(0.05, 0.5)), dropout_seed=int(RNG.integers(0, 2**63))),
        "sink": dict(learnable_sink=sinks(h, np.float64 if dtype == np.float64 else np.float32)),
        "all": dict(causal=True, window_size=(int(RNG.integers(0, 100)), -1), softcap=5.0, alibi_slopes=slopes(h),
                    attn_mask=RNG.standard_normal((b, 1, sq, sk)).astype(dtype), dropout_p=0.2,
                    dropout_seed=int(RNG.integers(0, 2**63)),
                    learnable_sink=sinks(h, np.float64 if dtype == np.float64 else np.float32)[::-1]),  # strided
    }[name]


def _device(kw):
    return {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


LAYOUTS = ("contiguous", "bhsd", "padded", "offset")


def laid_out(x, layout):
    """A host (batch, seqlen, heads, headdim) array on the device as `layout` stores it: "contiguous";
    "bhsd", stored (batch, heads, seqlen, headdim) and seen through a transpose; "padded", in rows of
    headdim + 8 elements; "offset", in rows of headdim + 1 elements from the second (no row, and not the
    first element, on a 16-byte boundary)."""
    if layout == "bhsd":
        return to_device(np.ascontiguousarray(np.swapaxes(x, 1, 2))).swapaxes(1, 2)
    if layout in ("padded", "offset"):
        pad, start = (8, 0) if layout == "padded" else (1, 1)
        rows = np.zeros(x.shape[:-1] + (x.shape[-1] + pad,), x.dtype)
        rows[..., start:start + x.shape[-1]] = x
        return to_device(rows)[..., start:start + x.shape[-1]]
    return to_device(x)


def run_with_reference(problem, layout="contiguous", **kw):
    """(host data, kernels' results, reference's results) of the forward and backward of `problem` with the
    variant keywords `kw` (causal set); q, k, v and dout reach the kernels in `layout` (LAYOUTS)."""
    q, k, v, dout = problem.arrays()
    kw.setdefault("causal", problem.causal)
    bias = kw.get("attn_mask") is not None and kw["attn_mask"].dtype != np.bool_
    sink = kw.get("learnable_sink") is not None
    dev = _device(kw)
    q_dev, k_dev, v_dev, dout_dev = (laid_out(x, layout) for x in (q, k, v, dout))
    out, lse = cupyflash.attention(q_dev, k_dev, v_dev, scale=problem.scale, return_lse=True, **dev)
    grads = cupyflash.attention_backward(dout_dev, q_dev, k_dev, v_dev, out, lse, scale=problem.scale,
                                         return_dbias=bias, return_dsink=sink, **dev)
    names = ("out", "lse", "dq", "dk", "dv") + ("dbias",) * bias + ("dsink",) * sink
    got = dict(zip(names, (x.get() for x in (out, lse, *grads))))

    ref_kw = dict(kw)
    if kw.get("dropout_p", 0) > 0:
        ref_kw["dropout_mask"] = cupyflash.dropout_mask((problem.batch, problem.nheads, problem.seqlen_q,
                                                         problem.seqlen_k), kw["dropout_p"], kw["dropout_seed"])
        del ref_kw["dropout_seed"]
    scale = problem.scale_value
    ref_out, ref_lse = cupyflash.reference.attention(q, k, v, scale=scale, return_lse=True, **ref_kw)
    ref = dict(zip(names, (ref_out, ref_lse, *cupyflash.reference.attention_backward(
        dout, q, k, v, ref_out, ref_lse, scale=scale, return_dbias=bias, return_dsink=sink, **ref_kw))))
    return (q, k, v, dout), got, ref


def check(problem, layout="contiguous", **kw):
    """Forward and backward of `problem` with the variant keywords `kw` against the reference by
    flash-attn's rule; q, k, v and dout reach the kernels in `layout` (LAYOUTS)."""
    (q, k, v, dout), got, ref = run_with_reference(problem, layout, **kw)
    scale, causal = problem.scale_value, kw.pop("causal", problem.causal)
    bias, sink = "dbias" in got, "dsink" in got
    naive = dict(zip(("out", "lse"), naive_attention(q, k, v, causal, scale, **kw)))
    naive.update(zip(("dq", "dk", "dv") + ("dbias",) * bias + ("dsink",) * sink,
                     naive_attention_backward(dout, q, k, v, causal, scale, return_dbias=bias, return_dsink=sink, **kw)))
    scales = error_scales(q, k, v, dout, causal, scale, **kw)
    for name in got:
        forward = name in ("out", "lse")
        floor = flash_floor(name, problem.dtype, scales, FWD_FLOOR_ULPS if forward else BWD_FLOOR_ULPS)
        assert_close_flash_rule(got[name], ref[name], naive[name], 2 if forward else 3, floor,
                                name=f"{name} of {problem} with {sorted(kw)}")


VARIANTS = ("window", "sliding", "softcap", "alibi", "alibi_batch", "padding", "bool_mask", "bias", "bias_2d",
            "dropout", "sink", "all")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant(dtype, name):
    p = Problem(2, 150, 203, 4, 2, 64, dtype, False, None, None, VARIANTS.index(name))
    check(p, **variant(name, p))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [False, True])
def test_a_sink_that_takes_most_of_each_row(dtype, causal):
    """float32's and float64's renormalized backward divides the keys' probabilities and the sink's by their
    total (mask.cuh, row_renormalizer): a sink with most of each row leaves the gradients at their dtype's
    precision."""
    p = Problem(2, 150, 203, 4, 2, 64, dtype, causal, None, None, 11)
    check(p, learnable_sink=np.full(4, 8.0 + np.log(203), np.float64 if dtype == np.float64 else np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_a_row_without_key_or_sink_adds_nothing_to_dsink(dtype):
    """sink_grad.cu skips a row with lse -inf (no key, no sink), whose dout may hold NaN."""
    with_nan, without = sink_gradients_with_nan_in_a_row_without_keys(cupyflash, dtype, xp=cp)
    np.testing.assert_array_equal(with_nan, without)


# element loads; the column-sliced dK/dV of wide heads; float64's warps in pairs at head tile 128
@pytest.mark.parametrize("dtype, headdim", [(dtype, headdim) for dtype in DTYPES for headdim in (59, 256)]
                         + [(np.dtype(np.float64), 100)], ids=lambda x: getattr(x, "name", x))
def test_all_variants_at_other_head_dims(dtype, headdim):
    p = Problem(1, 130, 97, 4, 1, headdim, dtype, True, None, 25.0, headdim)
    check(p, **variant("all", p))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=lambda d: d.name)
@pytest.mark.parametrize("name", ["window", "sliding"])
def test_windows_in_wide_key_tiles(dtype, name, monkeypatch):
    """The Hopper forward's 192-key tiles (taken here from the first key on, _plan.SM90_WIDE_KEY_TILE_FROM)
    under windows: tiles that straddle both of a row's bounds."""
    monkeypatch.setattr(_plan, "SM90_WIDE_KEY_TILE_FROM", 0)
    monkeypatch.setattr(_cuda_backend, "_FORWARD_CALLS", {})  # no call planned before with 128-key tiles
    p = Problem(2, 150, 403, 4, 2, 64, dtype, False, None, None, 7 + VARIANTS.index(name))
    check(p, **variant(name, p))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=lambda d: d.name)
@pytest.mark.parametrize("scale", [None, 1e-5], ids=["default_scale", "scale_1e-5"])
def test_alibi_tiles_before_and_after_the_diagonals(dtype, scale):
    """ALiBi over key tiles wholly before and wholly after their rows' diagonals, whose key term the Hopper
    forward adds on the tensor cores (AlibiKeyTerm); at scale 1e-5 float16 cannot hold the second head's
    slope / scale, whose tiles then take element checks."""
    p = Problem(1, 520, 600, 2, 1, 128, dtype, False, scale, None if scale is None else 2.0, 11)
    check(p, alibi_slopes=np.array([0.25, 1.0], np.float32))
    check(Problem(1, 600, 520, 2, 1, 128, dtype, True, scale, None if scale is None else 2.0, 12),
          alibi_slopes=np.array([[0.25, 1.0]], np.float32))


class ScoresFarBelowTheCap(Problem):
    """Keys along a common direction and every other query row against it: those rows' raw scores all lie
    near -2 cap, which the softcap takes to about -0.96 cap; the other rows' are standard."""

    def __init__(self, dtype, headdim, causal, cap, seed):
        super().__init__(2, 150, 203, 4, 2, headdim, dtype, causal, None, None, seed)
        self.cap = cap

    def arrays(self, xp=np):
        q, k, v, dout = super().arrays(xp)
        along = 2 * self.cap / (self.headdim * self.scale_value)  # q.k scale = -2 cap for q = -along, k = 1 + noise
        k = (k.astype(np.float32) / 4 + 1).astype(self.dtype)
        q[:, ::2] = (-along + q[:, ::2].astype(np.float32) / 4).astype(self.dtype)
        return q, k, v, dout


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=lambda d: d.name)
@pytest.mark.parametrize("headdim", [100, 256])
@pytest.mark.parametrize("cap", [3.0, 50.0, 76.0, 80.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcapped_rows_far_below_the_cap(dtype, headdim, cap, causal):
    """The Hopper forward shifts bfloat16 softcapped scores by a constant instead of a running max where
    cap log2(e) <= _plan.SM90_BOUNDED_LIMIT (cap 76.2) at head tiles from 128 (softmax.cuh, bounded_shift):
    rows whose every score lies near -cap keep their probabilities in range, beside rows near the cap;
    cap 80 and float16 keep the running max."""
    assert _plan.sm90_bounded_scores(dtype.name, 128, _plan.variant(_plan.FEATURES["SOFTCAP"]), cap) == (
        dtype == BFLOAT16 and cap < 80)
    check(ScoresFarBelowTheCap(dtype, headdim, causal, cap, int(cap) + headdim + causal), softcap=cap)


@pytest.mark.parametrize("headdim", [100, 128])
def test_softcapped_long_rows_on_the_deeper_ring(headdim):
    """A bfloat16 softcap alone on rows of _plan.SM90_BOUNDED_STAGES_FROM keys or more takes three K/V stages
    and one query buffer: more work tiles than multiprocessors (blocks take several in turn, each waiting for
    its queries), the ring wrapping around its three stages, the last key tile cut short."""
    seqlen_k = _plan.SM90_BOUNDED_STAGES_FROM + 52
    launch = _plan.forward_sm90("bfloat16", headdim, _plan.variant(_plan.FEATURES["SOFTCAP"]), seqlen_k, softcap=50.0)
    assert launch.name.split(", ")[3:5] == [str(_plan.SM90_BOUNDED_STAGES), "1"], launch.name
    check(Problem(2, 17 * 128 + 30, seqlen_k, 4, 2, headdim, BFLOAT16, False, None, None, headdim), softcap=50.0)


@pytest.mark.long_running
@settings(max_examples=30)
@given(dtype=st.sampled_from(DTYPES), names=st.sets(st.sampled_from(VARIANTS[:-1]), min_size=1, max_size=3),
       seqlen_q=st.sampled_from([1, 17, 128, 300]), seqlen_k=st.sampled_from([1, 5, 129, 257]),
       heads=st.sampled_from([(4, 4), (4, 2), (2, 1)]), headdim=st.sampled_from([64, 37, 128]),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1))
def test_random_combinations(dtype, names, seqlen_q, seqlen_k, heads, headdim, layout, seed):
    p = Problem(2, seqlen_q, seqlen_k, heads[0], heads[1], headdim, dtype, False, None, None, seed)
    kw = {}
    for name in sorted(names):  # later keys win where two variants set the same keyword
        kw.update(variant(name, p))
    check(p, layout, **kw)


def _run(q, k, v, **kw):
    return cupyflash.attention(to_device(q), to_device(k), to_device(v), return_lse=True, **_device(kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_equivalences(dtype):
    """window == bool mask; ALiBi == float mask; window (-1, 0) == causal; zero bias == none."""
    p = Problem(2, 97, 130, 4, 2, 64, dtype, False, None, None, 5)
    q, k, v, _ = p.arrays()
    i = np.arange(97)[:, None] + 130 - 97
    j = np.arange(130)[None, :]
    tol = dict(rtol=0, atol=1e-5 if dtype == np.float32 else 2e-3)

    def close(a, b):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.get().astype(np.float64), y.get().astype(np.float64), **tol)

    close(_run(q, k, v, window_size=(20, 3)), _run(q, k, v, attn_mask=(j >= i - 20) & (j <= i + 3)))
    s = slopes(4)
    alibi_bias = (-s[:, None, None] * np.abs(i - j)).astype(np.float32)
    close(_run(q, k, v, alibi_slopes=s), _run(q, k, v, attn_mask=alibi_bias))
    close(_run(q, k, v, window_size=(-1, 0)), _run(q, k, v, causal=True))
    close(_run(q, k, v, attn_mask=np.zeros((97, 130), dtype)), _run(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_dropout_bits_match_dropout_mask(dtype):
    """q = 0 gives uniform P; v = identity puts keep_ij / (seqlen_k (1 - p)) at out[i, j]."""
    sk, p_drop, seed = 48, 0.3, 12345
    q = np.zeros((2, 70, 4, 64), dtype)
    k = RNG.standard_normal((2, sk, 2, 64)).astype(dtype)
    v = np.zeros((2, sk, 2, 64), dtype)
    v[:, np.arange(sk), :, np.arange(sk)] = 1
    out = cupyflash.attention(to_device(q), to_device(k), to_device(v), dropout_p=p_drop, dropout_seed=seed)
    keep = out.get()[..., :sk].astype(np.float64).transpose(0, 2, 1, 3) > 0
    assert np.array_equal(keep, cupyflash.dropout_mask((2, 4, 70, sk), p_drop, seed))
    assert np.array_equal(keep, cupyflash.dropout_mask((2, 4, 70, sk), p_drop, seed, xp=cp).get())
    n = keep.size
    assert abs((~keep).sum() - n * p_drop) < 5 * np.sqrt(n * p_drop * (1 - p_drop))


def test_dropout_seeds():
    p = Problem(1, 200, 200, 2, 2, 64, np.float16, True, None, None, 1)
    q, k, v, dout = (to_device(x) for x in p.arrays())
    a = cupyflash.attention(q, k, v, dropout_p=0.2, dropout_seed=1)
    assert bitwise_equal(a, cupyflash.attention(q, k, v, dropout_p=0.2, dropout_seed=1))
    assert not bitwise_equal(a, cupyflash.attention(q, k, v, dropout_p=0.2, dropout_seed=2))
    out, vjp = cupyflash.attention_vjp(q, k, v, dropout_p=0.2)  # draws a seed and keeps it
    first = vjp(dout)
    assert all(bitwise_equal(x, y) for x, y in zip(first, vjp(dout)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_masked_values_never_reach_a_row(dtype):
    """NaN and inf in keys, values, queries or output gradients a row cannot see stay out of it."""
    q = k = np.ones((1, 3, 1, 1), dtype)
    v = np.array([1, 2, np.nan], dtype).reshape(1, 3, 1, 1)
    out = cupyflash.attention(to_device(q), to_device(k), to_device(v), causal=True).get().astype(np.float64)
    assert out[0, :2, 0, 0].tolist() == [1.0, 1.5] and np.isnan(out[0, 2, 0, 0])

    p = Problem(1, 150, 200, 2, 2, 64, dtype, True, None, None, 3)
    q, k, v, dout = p.arrays()
    late_v, late_k = v.copy(), k.copy()
    late_v[:, 190:] = np.inf  # keys 190.. are seen only by queries 140.. (offset 50)
    late_k[:, 195:] = np.nan
    out = cupyflash.attention(*(to_device(x) for x in (q, late_k, late_v)), causal=True).get().astype(np.float64)
    assert np.isfinite(out[:, :140]).all() and np.isnan(out[:, 145:]).all()

    dout[:, :3] = np.nan  # queries 0..2 see keys 0..52 only
    q[:, 5] = np.nan  # query 5 sees keys 0..55
    dq, dk, dv = _gradients(q, k, v, dout, causal=True)
    assert np.isfinite(dk[:, 56:]).all() and np.isfinite(dv[:, 56:]).all() and np.isfinite(dq[:, 6:]).all()

    # a key-padding mask over garbage keys
    k[:, 150:], v[:, 150:] = np.nan, np.nan
    pad = np.zeros((1, 1, 1, 200), bool)
    pad[..., :150] = True
    out = cupyflash.attention(*(to_device(x) for x in (q[:, 6:], k, v)), attn_mask=to_device(pad)).get()
    assert np.isfinite(out.astype(np.float64)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("window", [None, (40, 0)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_one_nonfinite_value_reaches_only_the_rows_that_see_it(dtype, value, window, dropout_p):
    """A single NaN or inf in v, in either 16-bit half of a 32-bit word (even and odd columns) and in the
    diagonal tiles of several query tiles: only the rows that see its key lose their finite value there,
    whether dropout drops the pair or not (a dropped pair still multiplies its value by zero)."""
    sq = 300
    q, k, v = (RNG.standard_normal((1, sq, 2, 64)).astype(dtype) for _ in range(3))
    kw = dict(causal=True) if window is None else dict(window_size=window)
    if dropout_p:
        kw.update(dropout_p=dropout_p, dropout_seed=3)
    clean = cupyflash.attention(*(to_device(x) for x in (q, k, v)), **kw).get().astype(np.float64)
    for key, col in [(131, 0), (250, 37), (299, 63), (5, 8)]:
        bad_v = v.copy()
        bad_v[0, key, 1, col] = value
        out = cupyflash.attention(*(to_device(x) for x in (q, k, bad_v)), **kw).get().astype(np.float64)
        sees = np.arange(sq) >= key
        if window is not None:
            sees &= np.arange(sq) <= key + window[0]
        assert not np.isfinite(out[0, sees, 1, col]).any(), (key, col)
        others = np.ones(out.shape, bool)
        others[0, sees, 1, col] = False
        assert np.isfinite(out[others]).all(), (key, col)
        np.testing.assert_allclose(out[others], clean[others], atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("headdim", [64, 5])  # 16-byte loads; one element at a time
def test_nonfinite_row_flags(dtype, headdim):
    """nonfinite.cu flags exactly the 16-row groups of each head that hold NaN or inf, in strided tensors too."""
    from types import SimpleNamespace

    from cupyflash import _cuda_backend, _plan

    batch, seqlen, heads = 2, 75, 3
    x = RNG.standard_normal((batch, seqlen, heads, headdim)).astype(dtype)
    for value in (np.nan, np.inf, -np.inf):
        for _ in range(4):
            x[tuple(RNG.integers(0, n) for n in x.shape)] = value
    spec = SimpleNamespace(batch=batch, headdim=headdim, dtype=np.dtype(dtype))
    device_x = to_device(np.ascontiguousarray(x.transpose(2, 0, 1, 3))).transpose(1, 2, 0, 3)  # heads slowest
    flags, = _cuda_backend._flag_nonfinite(_plan.variant(_plan.FEATURES["WINDOW"]), spec, 0, (device_x, heads))
    bad = ~np.isfinite(x.astype(np.float64)).all(axis=3)  # (batch, seqlen, heads)
    rows = _plan.NONFINITE_ROWS
    chunks = -(-seqlen // rows)
    padded = np.zeros((batch, rows * chunks, heads), bool)
    padded[:, :seqlen] = bad
    want = padded.reshape(batch, chunks, rows, heads).any(axis=2).transpose(0, 2, 1)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(flags.get().astype(bool), want)


def _gradients(q, k, v, dout, **kw):
    q, k, v, dout = (to_device(x) for x in (q, k, v, dout))
    kw = _device(kw)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **kw)
    return [x.get().astype(np.float64) for x in cupyflash.attention_backward(dout, q, k, v, out, lse, **kw)]


def cell_mask(shape, cell=64):
    """A bool mask made of cells that are all False, all True or random, so tiles of every kind occur."""
    b, h, sq, sk = shape
    kinds = RNG.integers(0, 3, (b, h, -(-sq // cell), -(-sk // cell)))
    kinds = kinds.repeat(cell, axis=2).repeat(cell, axis=3)[:, :, :sq, :sk]
    return np.where(kinds == 2, RNG.random(shape) > 0.5, kinds == 1)


@pytest.mark.parametrize("shape", [(2, 1, 1, 300), (1, 3, 200, 1), (2, 3, 200, 300), (1, 1, 200, 300), (2, 3, 1, 1)])
def test_bool_mask_cells(shape):
    """The cells of a bool mask (mask_cells.cu: 0 hidden, 1 visible, 2 mixed) against NumPy, for masks
    broadcast along every axis; then attention with such a mask, whose tiles are skipped, interior,
    masked, and checked for bounds and the diagonal alone, against the reference."""
    from cupyflash import _cuda_backend, _plan, _validate

    cell = 1 << _plan.MASK_CELL_LOG2
    sq, sk = 200, 300
    mask = cell_mask(shape, cell)
    q = cp.zeros((2, sq, 3, 8), cp.float16)
    k = cp.zeros((2, sk, 3, 8), cp.float16)
    spec = _validate.check_call("test", q, k, k, attn_mask=to_device(mask))
    got = _cuda_backend._variant(spec, 0)[2].get()
    want = np.empty(got.shape, np.uint8)
    rows = 1 if shape[2] == 1 else cell
    cols = 1 if shape[3] == 1 else cell
    for index in np.ndindex(*want.shape):
        b, h, cq, ck = index
        entries = mask[b, h, cq * rows:(cq + 1) * rows, ck * cols:(ck + 1) * cols]
        want[index] = 2 if entries.any() and not entries.all() else int(entries.all())
    assert got.shape == tuple(1 if n == 1 else m for n, m in zip(shape, (2, 3, -(-sq // cell), -(-sk // cell))))
    np.testing.assert_array_equal(got, want)
    for causal in (False, True):  # causal: tiles whose cells are all visible but that the diagonal crosses
        check(Problem(2, sq, sk, 3, 1, 64, np.float16, causal, None, None, 5), attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_of_whole_key_tiles(dtype, causal):
    """A key-padding mask hiding whole key tiles at the ends of rows (which the kernels do not visit), a
    different number per sequence: the reference's results by the rule; then over NaN keys and values, with
    all the keys of one sequence hidden: the same results, out 0 and lse -inf where a row sees no key, finite
    gradients."""
    def padding(lengths):
        return (np.arange(700)[None, :] < np.array(lengths)[:, None])[:, None, None, :]

    p = Problem(4, 300, 700, 2, 1, 128, dtype, causal, None, None, 12)
    check(p, attn_mask=padding([700, 260, 131, 1]))

    lengths = [700, 260, 131, 0]
    mask = padding(lengths)
    q, k, v, dout = p.arrays()
    clean, _ = _run(q, k, v, attn_mask=mask, causal=causal)
    for b, n in enumerate(lengths):
        k[b, n:], v[b, n:] = np.nan, np.nan
    out, lse = _run(q, k, v, attn_mask=mask, causal=causal)
    out, lse = out.get().astype(np.float64), lse.get()
    assert (out[3] == 0).all() and np.isneginf(lse[3]).all()
    np.testing.assert_allclose(out, clean.get().astype(np.float64), atol=2e-2, rtol=0)
    assert all(np.isfinite(g).all() for g in _gradients(q, k, v, dout, attn_mask=mask, causal=causal))


def test_fully_masked_rows_by_mask():
    """A row whose keys are all masked gives out 0, lse -inf, zero gradients, never NaN."""
    p = Problem(2, 64, 80, 2, 2, 64, np.float16, False, None, None, 4)
    q, k, v, dout = p.arrays()
    mask = RNG.random((2, 1, 64, 80)) > 0.5
    mask[:, :, 10] = False
    bias = np.where(mask, 0.0, -np.inf).astype(np.float32)
    for kw in (dict(attn_mask=mask), dict(attn_mask=bias)):
        out, lse = _run(q, k, v, **kw)
        assert (out.get()[:, 10] == 0).all() and np.isneginf(lse.get()[:, :, 10]).all()
        assert all(np.isfinite(g).all() for g in _gradients(q, k, v, dout, **kw))


def test_layout_bhsd_is_a_view_of_bshd():
    p = Problem(2, 70, 90, 4, 2, 64, np.float16, True, None, None, 8)
    q, k, v, dout = (to_device(x) for x in p.arrays())
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    t = [x.swapaxes(1, 2).copy() for x in (q, k, v, dout)]
    out_t, lse_t = cupyflash.attention(*t[:3], causal=True, return_lse=True, layout="bhsd")
    assert out_t.flags.c_contiguous and bitwise_equal(out_t.swapaxes(1, 2), out) and bitwise_equal(lse_t, lse)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    grads_t = cupyflash.attention_backward(t[3], *t[:3], out_t, lse_t, causal=True, layout="bhsd")
    assert all(bitwise_equal(a.swapaxes(1, 2), b) for a, b in zip(grads_t, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_lse_of_nan_and_inf_rows(dtype):
    """A NaN score makes its row's lse NaN; a +inf score makes it +inf (never -inf, which means 'saw no key')."""
    q = np.ones((1, 3, 1, 8), dtype)
    k = np.ones((1, 4, 1, 8), dtype)
    v = np.ones((1, 4, 1, 8), dtype)
    q[0, 1, 0, 0] = np.nan
    q[0, 2, 0, 0] = np.inf
    _, lse = _run(q, k, v)
    lse = lse.get()[0, 0]
    assert np.isfinite(lse[0]) and np.isnan(lse[1]) and lse[2] == np.inf


def test_slopes_and_sinks_are_checked_and_planned_once_and_read_at_each_call(monkeypatch):
    """Calls with ALiBi's slopes and a learnable sink reuse one check and one plan per arrays (their addresses),
    and the kernels read the arrays at each call: values changed in place take effect, and other arrays of
    those values give the same bits."""
    from cupyflash import _validate

    p = Problem(1, 70, 90, 4, 2, 64, np.dtype(np.float16), True, None, None, 3)
    q, k, v, dout = (to_device(x) for x in p.arrays())
    first = dict(alibi_slopes=cp.asarray(slopes(4)), learnable_sink=cp.asarray(np.array([1.0, -1.0, 0.5, 2.0],
                                                                                       np.float32)))

    def run(kw):
        out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True, **kw)
        grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, return_dsink=True,
                                             deterministic=True, **kw)
        return [x.get() for x in (out, lse, *grads)]

    before = run(first)
    second = {name: x.copy() for name, x in first.items()}
    for x in second.values():
        x *= 2
    fresh = run(second)

    def never(*args, **kw):
        raise AssertionError("checked or planned again")

    monkeypatch.setattr(_validate, "check_call", never)
    monkeypatch.setattr(_cuda_backend, "_forward_call", never)
    monkeypatch.setattr(_cuda_backend, "_backward_call", never)
    for x in first.values():
        x *= 2  # in place: the same addresses, the second call's values
    again = run(first)
    assert all(np.array_equal(a.view(f"u{a.itemsize}"), f.view(f"u{f.itemsize}")) for a, f in zip(again, fresh))
    assert not np.array_equal(before[0], again[0])
