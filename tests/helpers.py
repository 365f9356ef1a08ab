"""Reusable test helpers (CPU and GPU suites import these).

* :func:`naive_attention` / :func:`naive_attention_backward`: the textbook
  full-matrix computation done *in the input dtype*, every intermediate
  rounded to it (16-bit matmuls accumulate in float32 and round the result,
  as tensor cores and PyTorch do). Their error against the float64
  reference is the yardstick of FlashAttention's accuracy rule. They, and
  :func:`error_scales`, take the variant keywords of ``cupyflash.attention``
  (window_size, softcap, alibi_slopes, attn_mask, dropout_p, dropout_seed), and ``batch_offset``:
  the dropout bits of a packed batch's sequence run alone.
* :func:`assert_close_flash_rule`: max|out - ref| <= factor * max|naive - ref|
  + floor.
* :func:`flash_floor`: the rounding floor of the rule (see the notes above it).

Everything accepts NumPy or CuPy arrays (CuPy is moved to the host with
``.get()``) and works in NumPy.
"""

from __future__ import annotations

import numpy as np

import ml_dtypes

from cupyflash import _philox

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))


def to_numpy(x):
    """NumPy view/copy of a NumPy or CuPy array."""
    if not isinstance(x, np.ndarray) and hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def eps(dtype):
    """Machine epsilon (spacing of 1.0) of ``dtype``, bfloat16 included."""
    return float(ml_dtypes.finfo(np.dtype(dtype)).eps)


def _wide(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _split_heads(x):
    """(b, s, h, d) -> (b, h, s, d)."""
    return np.swapaxes(x, 1, 2)


def _expand(x, nheads):
    return np.repeat(x, nheads // x.shape[2], axis=2)


def round_to_tf32(x):
    """float32 values rounded to TF32 (10 mantissa bits), to nearest with ties away from zero, as the
    tensor cores' `cvt.rna.tf32.f32`."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return rounded.astype(np.uint32).view(np.float32)


class _Rounder:
    """R(x): round to the input dtype; W(x): widen to the compute dtype. With tf32 (float32 inputs) every
    product's operands are rounded to TF32 first, as float32 attention in TF32 computes."""

    def __init__(self, dtype, tf32=False):
        self.dtype = np.dtype(dtype)
        self.wide = _wide(dtype)
        self.tf32 = tf32

    def R(self, x):
        return np.asarray(x, dtype=self.wide).astype(self.dtype).astype(self.wide)

    def mm(self, a, b):
        """Matmul accumulated in the compute dtype, result rounded."""
        if self.tf32:
            a, b = round_to_tf32(a), round_to_tf32(b)
        return self.R(np.matmul(a.astype(self.wide), b.astype(self.wide)))


class _Variants:
    """The variant keywords of one call, as float64/bool arrays broadcastable to (b, h, sq, sk).

    ``visible``: window (causal folded in) and bool mask; ``alibi``: slope * distance (or None);
    ``bias``: a float mask (or None); ``keep_scale``: keep / (1 - dropout_p) (or None); ``sink``: the
    learnable sink as (1, h, 1, 1) (or None).
    """

    def __init__(self, q, k, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                 attn_mask=None, dropout_p=0.0, dropout_seed=None, batch_offset=0, learnable_sink=None):
        b, sq, h, _ = q.shape
        sk = k.shape[1]
        i = np.arange(sq)[:, None] + (sk - sq)  # the key aligned with query i
        j = np.arange(sk)[None, :]
        left, right = window_size
        right = 0 if causal else right
        self.visible = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
        self.softcap = float(softcap)
        self.alibi = None
        if alibi_slopes is not None:
            slopes = np.broadcast_to(to_numpy(alibi_slopes).astype(np.float64), (b, h))
            self.alibi = slopes[:, :, None, None] * np.abs(i - j)
        self.bias = self.mask_shape = self.mask_dtype = None
        if attn_mask is not None:
            mask = to_numpy(attn_mask)
            if mask.dtype == np.bool_:
                self.visible = self.visible & mask
            else:
                self.bias = mask.astype(np.float64)
                self.mask_shape, self.mask_dtype = mask.shape, mask.dtype
        self.sink = None if learnable_sink is None else to_numpy(learnable_sink).astype(np.float64)[None, :, None, None]
        self.keep_scale = None
        if dropout_p > 0:
            keep = _philox.keep_mask((b, h, sq, sk), dropout_p, dropout_seed, batch_offset)
            self.keep_scale = keep / (1.0 - dropout_p)

    def unbroadcast(self, g):
        """A (b, h, sq, sk) gradient summed down to the mask's shape."""
        g = g.sum(axis=tuple(range(4 - len(self.mask_shape))))
        axes = tuple(a for a, n in enumerate(self.mask_shape) if n == 1 and g.shape[a] != 1)
        return g.sum(axis=axes, keepdims=True).reshape(self.mask_shape)


def _naive_probs(q, k, scale, r, var):
    """Rounded scores' softmax, like flash-attn's attention_ref: ``(qs, kh, p, lse, tanh)`` with
    tanh = tanh(s / softcap) (None without softcap); a learnable sink joins each row's max and sum."""
    nheads = q.shape[2]
    qs = r.R(_split_heads(q).astype(r.wide) * scale)  # scale applied to q first
    kh = _split_heads(_expand(k, nheads)).astype(r.wide)
    s = r.mm(qs, np.swapaxes(kh, -1, -2))
    th = None
    if var.softcap:
        th = r.R(np.tanh(r.R(s / var.softcap)))
        s = r.R(var.softcap * th)
    if var.alibi is not None:
        s = r.R(s - r.R(var.alibi))
    if var.bias is not None:
        s = r.R(s + r.R(var.bias))
    s = np.where(var.visible, s, -np.inf)
    dead = np.isneginf(s).all(axis=-1, keepdims=True)
    m = s.max(axis=-1, keepdims=True)
    if var.sink is not None:
        m = np.maximum(m, var.sink)
    m = np.where(np.isneginf(m), 0.0, m).astype(r.wide)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    if var.sink is not None:
        l = r.R(l + np.exp(var.sink - m))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = r.R(np.where(dead, 0.0, e / np.where(l == 0, 1, l)))
        lse = np.where(l == 0, -np.inf, m + np.log(l))[..., 0]
    return qs, kh, p, r.R(lse), th


def _quiet(fn):
    """The naive same-dtype computation may overflow (that is its error)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def naive_attention(q, k, v, causal, scale, tf32=False, **variants):
    """Full-matrix attention in the input dtype (float32 in TF32 with ``tf32``); returns ``(out, lse)``.

    out has q's dtype; lse is (batch, nheads, seqlen_q) in the input dtype
    (rounded, like everything else). ``scale`` must be a float.
    """
    q, k, v = to_numpy(q), to_numpy(k), to_numpy(v)
    r = _Rounder(q.dtype, tf32)
    var = _Variants(q, k, causal, **variants)
    _, _, p, lse, _ = _naive_probs(q, k, scale, r, var)
    if var.keep_scale is not None:
        p = r.R(p * var.keep_scale)
    vh = _split_heads(_expand(v, q.shape[2]))
    out = r.mm(p, vh)
    return _split_heads(out).astype(q.dtype), lse.astype(q.dtype)


@_quiet
def naive_attention_backward(dout, q, k, v, causal, scale, return_dbias=False, return_dsink=False, tf32=False,
                             **variants):
    """Full-matrix gradients in the input dtype, rounding as autograd would.

    Returns ``(dq, dk, dv)`` in the input dtype (and dbias in the mask's
    shape and dtype with ``return_dbias``, then dsink in the compute dtype
    with ``return_dsink``). Every product is rounded to the input dtype, the
    softmax backward ``P * (dP - rowsum(P * dP))`` is done in the compute
    dtype and rounded once, GQA sums over heads in the compute dtype and
    rounds once.
    """
    dout, q, k, v = to_numpy(dout), to_numpy(q), to_numpy(k), to_numpy(v)
    r = _Rounder(q.dtype, tf32)
    nheads, nheads_kv = q.shape[2], k.shape[2]
    var = _Variants(q, k, causal, **variants)
    qs, kh, p, lse, th = _naive_probs(q, k, scale, r, var)
    vh = _split_heads(_expand(v, nheads)).astype(r.wide)
    do = _split_heads(dout).astype(r.wide)
    dp = r.mm(do, np.swapaxes(vh, -1, -2))
    pd = p
    if var.keep_scale is not None:
        pd, dp = r.R(p * var.keep_scale), r.R(dp * var.keep_scale)
    dv_rep = r.mm(np.swapaxes(pd, -1, -2), do)
    delta = r.R(np.sum(p * dp, axis=-1, keepdims=True))
    ds = r.R(p * (dp - delta))
    dx = ds if th is None else r.R(ds * r.R(1.0 - th * th))
    dqs = r.mm(dx, kh)
    dk_rep = r.mm(np.swapaxes(dx, -1, -2), qs)
    dq = r.R(dqs * scale)

    def group_sum(x):  # (b, h, s, d) -> (b, s, h_kv, d)
        b, h, s, d = x.shape
        return r.R(x.reshape(b, nheads_kv, h // nheads_kv, s, d).sum(axis=2)).swapaxes(1, 2)

    grads = (
        _split_heads(dq).astype(q.dtype),
        group_sum(dk_rep).astype(k.dtype),
        group_sum(dv_rep).astype(v.dtype),
    )
    if return_dbias:
        grads += (r.R(var.unbroadcast(ds)).astype(var.mask_dtype),)
    if return_dsink:  # the sink's score: gradient p_sink (0 - delta)
        p_sink = r.R(np.where(np.isneginf(lse), 0.0, np.exp(var.sink[..., 0] - lse)))
        grads += (r.R(-(p_sink * delta[..., 0]).sum(axis=(0, 2))),)
    return grads


def assert_close_flash_rule(out, ref, naive, factor, floor, name="out"):
    """FlashAttention's accuracy rule, elementwise max over the tensor.

    max|out - ref| <= factor * max|naive - ref| + floor.

    Entries where ``ref`` is not finite (lse = -inf on a fully masked row)
    must be identical in ``out``; the rest are compared. A NaN in ``out``
    where ``ref`` is finite always fails. A non-finite naive error (the
    same-dtype computation overflowed) makes the bound infinite.
    """
    out = to_numpy(out).astype(np.float64)
    ref = to_numpy(ref).astype(np.float64)
    naive = to_numpy(naive).astype(np.float64)
    assert out.shape == ref.shape == naive.shape, (name, out.shape, ref.shape, naive.shape)
    finite = np.isfinite(ref)
    if not finite.all():
        bad = ~finite & ~((out == ref) | (np.isnan(out) & np.isnan(ref)))
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} entries where the reference is not finite differ, "
            f"e.g. out={out[bad][:4]} ref={ref[bad][:4]}"
        )
    if not finite.any():
        return
    err = np.abs(out[finite] - ref[finite])
    nerr = np.abs(naive[finite] - ref[finite])
    max_err = float(err.max()) if not np.isnan(err).any() else float("nan")
    naive_err = float(nerr.max()) if np.isfinite(nerr).all() else float("inf")
    bound = factor * naive_err + floor
    if not (max_err <= bound):
        worst = np.unravel_index(int(np.nanargmax(np.abs(out - ref) * finite)), ref.shape) if finite.all() else None
        raise AssertionError(
            f"{name}: max|out-ref| = {max_err:.6g} exceeds {factor} x max|naive-ref| "
            f"({naive_err:.6g}) + floor ({floor:.6g}) = {bound:.6g}"
            + (f"; worst at index {worst}: out={out[worst]!r} ref={ref[worst]!r}" if worst else "")
        )


def relative_error(out, ref):
    """‖out - ref‖ / ‖ref‖ over the whole tensor (Frobenius), finite entries."""
    out = to_numpy(out).astype(np.float64)
    ref = to_numpy(ref).astype(np.float64)
    finite = np.isfinite(ref)
    num = np.linalg.norm(out[finite] - ref[finite])
    den = np.linalg.norm(ref[finite])
    return float(num / den) if den > 0 else float(num)


# ---------------------------------------------------------------------------
# Hypothesis strategy for attention problems (shared by CPU and GPU suites).

#: Cap on batch * nheads * seqlen_q * seqlen_k * headdim so each example is cheap.
COST_CAP = 8_000_000


class Problem:
    """One drawn attention problem; :meth:`arrays` makes its data."""

    def __init__(self, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, causal, scale, logit_std, seed):
        self.batch, self.seqlen_q, self.seqlen_k = batch, seqlen_q, seqlen_k
        self.nheads, self.nheads_kv, self.headdim = nheads, nheads_kv, headdim
        self.dtype, self.causal, self.scale = np.dtype(dtype), causal, scale
        self.logit_std, self.seed = logit_std, seed

    @property
    def scale_value(self):
        return self.scale if self.scale is not None else 1.0 / np.sqrt(self.headdim)

    @property
    def unit(self):
        """True when q, k, v and dout are all standard normal."""
        return self.logit_std is None

    def arrays(self, xp=np):
        """(q, k, v, dout): fresh random data in ``self.dtype``.

        q and k are scaled so the scaled logits have standard deviation
        ``logit_std`` (up to 1e4: a missing max subtraction overflows);
        v and dout are standard normal.
        """
        rng = np.random.default_rng(self.seed)
        if self.unit:
            sigma = 1.0
        else:
            sigma = float(np.sqrt(self.logit_std / (self.scale_value * np.sqrt(self.headdim))))
        qshape = (self.batch, self.seqlen_q, self.nheads, self.headdim)
        kshape = (self.batch, self.seqlen_k, self.nheads_kv, self.headdim)
        q = rng.standard_normal(qshape) * sigma
        k = rng.standard_normal(kshape) * sigma
        v = rng.standard_normal(kshape)
        dout = rng.standard_normal(qshape)
        return tuple(xp.asarray(x.astype(self.dtype)) for x in (q, k, v, dout))

    def __repr__(self):
        return (
            f"Problem(batch={self.batch}, seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
            f"nheads={self.nheads}, nheads_kv={self.nheads_kv}, headdim={self.headdim}, "
            f"dtype={self.dtype.name}, causal={self.causal}, scale={self.scale}, "
            f"logit_std={self.logit_std}, seed={self.seed})"
        )


def problems(dtypes=DTYPES, max_batch=3, max_seqlen=300, max_nheads=4, max_headdim=256, cost_cap=COST_CAP, unit=None):
    """Hypothesis strategy of :class:`Problem`.

    ``unit=True`` forces standard-normal data, ``False`` forbids it.
    """
    from hypothesis import strategies as st

    @st.composite
    def draw_problem(draw):
        batch = draw(st.integers(1, max_batch))
        nheads = draw(st.integers(1, max_nheads))
        nheads_kv = draw(st.sampled_from([d for d in range(1, nheads + 1) if nheads % d == 0]))
        seqlen_q = draw(st.integers(1, max_seqlen))
        seqlen_k = draw(st.integers(1, max_seqlen))
        headdim = draw(st.integers(1, max_headdim))
        # Keep each example cheap: shrink headdim until the cost is capped.
        headdim = max(1, min(headdim, cost_cap // (batch * nheads * seqlen_q * seqlen_k)))
        dtype = draw(st.sampled_from([np.dtype(d) for d in dtypes]))
        causal = draw(st.booleans())
        scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
        if unit is True:
            logit_std = None
        elif unit is False:
            logit_std = draw(st.floats(0.1, 1e4))
        else:
            logit_std = draw(st.one_of(st.none(), st.floats(0.1, 1e4)))
        seed = draw(st.integers(0, 2**32 - 1))
        return Problem(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, causal, scale, logit_std, seed)

    return draw_problem()


# ---------------------------------------------------------------------------
# Rounding floors.
#
# Any finite-precision attention computes the scaled logits s = scale * q.k
# with an absolute error of about eps_c * L, where eps_c is the compute
# dtype's epsilon and L = scale * max_ij sum_d |q_id k_jd| (+ log seqlen_k
# for lse); storing lse = m + log(l) for the backward adds the same amount.
# So every probability carries a relative error of about eps_c * L, on top
# of the eps of the input dtype from rounding inputs/outputs (the backward's
# delta = rowsum(dout * out) uses the *rounded* out). The naive same-dtype
# computation is sometimes luckier than that (a one-hot softmax row is exact
# in it, while FlashAttention's exp(s - lse) is not), so the rule
# "<= factor x naive error" needs a floor of a few units of
#     (eps_dtype + eps_c * L) x (the tensor's magnitude without cancellation)
# where that magnitude is computed from the float64 P and absolute values:
#     out: P |v|     dv: P^T |dout|     ds_abs = P * (|dout| |v|^T + rowsum(|dout| |out|))
#     dq: scale ds_abs |k|               dk: scale ds_abs^T |q|
# and for lse (compute dtype, absolute): eps_c * L.


def error_scales(q, k, v, dout, causal, scale, **variants):
    """Dict of the magnitudes that set the rounding floors (see above).

    With variants, L also counts |ALiBi| and |bias| (the score's rounding
    grows with every term added to it), the magnitudes use P as dropout
    weighs it, and ``dbias`` is the magnitude of the bias gradient.
    """
    q, k, v, dout = (to_numpy(x).astype(np.float64) for x in (q, k, v, dout))
    nheads = q.shape[2]
    var = _Variants(q, k, causal, **variants)
    _, _, p, lse, th = _naive_probs(q, k, scale, _Rounder(np.float64), var)
    aq, ak = np.abs(q), np.abs(_expand(k, nheads))
    av, ado = np.abs(_expand(v, nheads)), np.abs(dout)
    terms = scale * np.einsum("bqhd,bkhd->bhqk", aq, ak, optimize=True)
    for extra in (var.alibi, var.bias):
        if extra is not None:
            terms = terms + np.where(np.isfinite(extra), np.abs(extra), 0.0)
    logits = np.where(var.visible, terms, 0.0)
    L = float(logits.max()) + float(np.log(k.shape[1]))
    if var.sink is not None:
        L = max(L, float(np.abs(var.sink[np.isfinite(var.sink)]).max(initial=0.0)) + float(np.log(k.shape[1] + 1)))
    keep = 1.0 if var.keep_scale is None else var.keep_scale
    pd = p * keep
    out_abs = np.einsum("bhqk,bkhd->bqhd", pd, av, optimize=True)
    dv_abs = np.einsum("bhqk,bqhd->bkhd", pd, ado, optimize=True)
    dp_abs = np.einsum("bqhd,bkhd->bhqk", ado, av, optimize=True) * keep
    delta_abs = np.einsum("bqhd,bqhd->bhq", ado, out_abs)[..., None]
    ds_abs = p * (dp_abs + delta_abs)
    dx_abs = ds_abs if th is None else ds_abs * (1.0 - th * th)
    dq_abs = scale * np.einsum("bhqk,bkhd->bqhd", dx_abs, ak, optimize=True)
    dk_abs = scale * np.einsum("bhqk,bqhd->bkhd", dx_abs, aq, optimize=True)
    scales = {
        "L": L,
        "out": float(out_abs.max()),
        "lse": 1.0,
        "dq": float(dq_abs.max()),
        "dk": float(dk_abs.max()),
        "dv": float(dv_abs.max()),
    }
    if var.bias is not None:
        scales["dbias"] = float(var.unbroadcast(ds_abs).max())
    if var.sink is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            p_sink = np.where(np.isneginf(lse), 0.0, np.exp(var.sink[..., 0] - lse))
        scales["dsink"] = float((p_sink * delta_abs[..., 0]).sum(axis=(0, 2)).max())
    return scales


#: Floors of the accuracy rule, in units of flash_floor, for the forward (out, lse) and the
#: gradients; shared by the NumPy and GPU suites.
FWD_FLOOR_ULPS = 4
BWD_FLOOR_ULPS = 8


def flash_floor(name, dtype, scales, ulps):
    """``ulps`` x (eps_dtype + eps_c * L) x magnitude of tensor ``name``.

    For ``lse`` (always in the compute dtype): ``ulps x eps_c x (L + 1)``.
    """
    eps_c = eps(_wide(dtype))
    if name == "lse":
        return ulps * eps_c * (scales["L"] + 1.0)
    return ulps * (eps(dtype) + eps_c * scales["L"]) * scales[name]


# Norm-wise relative bound at unit scale (N(0,1) data, default scale).
REL_BOUND = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# The norm-wise bound is meaningless on a handful of entries where one
# cancelling sum decides it (e.g. seqlen_q=1, headdim=1); ask it of tensors
# with at least this many entries.
REL_MIN_SIZE = 256


def check_relative(name, ours, ref, p):
    """At unit scale (N(0,1) data, default scale), ||ours - ref|| / ||ref|| <= REL_BOUND."""
    bound = REL_BOUND.get(p.dtype)
    if bound is None or not (p.unit and p.scale is None) or np.size(ref) < REL_MIN_SIZE:
        return
    if name in ("dq", "dk") and p.seqlen_k < 2:
        return  # one key: dq = dk = 0 exactly, a relative error is undefined
    rel = relative_error(ours, ref)
    assert rel <= bound, f"{name}: ||err||/||ref|| = {rel:.3g} > {bound:g} for {p}"


def sink_gradients_with_nan_in_a_row_without_keys(module, dtype, xp=np):
    """dsink of a causal call whose rows 0-3 see no key, head 0 without a sink (so those rows' lse is -inf),
    with NaN in dout at such a row of head 0, and with that NaN replaced by 0."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 6, 2, 8)).astype(dtype)
    k, v = (rng.standard_normal((1, 2, 2, 8)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(dtype)
    sink = np.array([-np.inf, 0.5], np.float64 if dtype == np.float64 else np.float32)
    q, k, v, sink = (xp.asarray(x) for x in (q, k, v, sink))
    out, lse = module.attention(q, k, v, causal=True, learnable_sink=sink, return_lse=True)
    results = []
    for value in (np.nan, 0.0):
        dout[0, 1, 0, 3] = value
        *_, dsink = module.attention_backward(xp.asarray(dout), q, k, v, out, lse, causal=True, learnable_sink=sink,
                                              return_dsink=True)
        results.append(dsink if xp is np else dsink.get())
    return results
