"""Float64 reference attention on the full score matrix, with every variant of docs/variants.md.

The ground truth every test compares to: plain NumPy, the whole ``(batch, nheads, seqlen_q,
seqlen_k)`` score matrix in float64, written from the formulas of docs/variants.md and sharing
nothing with the tiled backends but argument checking and the dropout bits. Accepts NumPy or CuPy
inputs (CuPy arrays are copied to the host) and returns float64 NumPy arrays in the caller's layout.

A masked pair (score -inf: invisible, or made -inf by a float mask or by the data) adds exactly
nothing to any result, even where the q, k, v or dout rows involved hold NaN or inf. A row whose
every score is -inf gives out 0, lse -inf and zero gradients. Elsewhere NaN and inf propagate as
the arithmetic makes them. A learnable sink is one more score per row, its head's logit, whose value
is zero.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import _kvcache, _philox, _validate, _varlen

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = ["attention", "attention_backward", "attention_with_kvcache", "merge_attention", "causal_mask",
           "rotary_embedding", "visibility"]


def _host(x):
    if _validate.array_kind(x) == "cupy":
        x = x.get()
    return np.asarray(x)


def _host64(x):
    return _host(x).astype(np.float64)


def causal_mask(seqlen_q, seqlen_k):
    """Boolean (seqlen_q, seqlen_k), True where key j is hidden from query i.

    Bottom-right aligned: hidden when ``j > i + seqlen_k - seqlen_q``.
    """
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return j > i + (seqlen_k - seqlen_q)


def visibility(spec):
    """Bool, broadcastable to (batch, nheads, seqlen_q, seqlen_k): True where query i sees key j
    through the window (causal folded in) and a bool ``attn_mask``."""
    i = np.arange(spec.seqlen_q)[:, None] + spec.offset
    j = np.arange(spec.seqlen_k)[None, :]
    left, right = spec.window
    seen = np.ones((spec.seqlen_q, spec.seqlen_k), dtype=bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    seen = seen[None, None]
    if spec.mask_kind == "bool":
        seen = seen & _host(spec.attn_mask)
    return seen


def _expand_kv(x, nheads):
    """(b, s, nheads_kv, d) -> (b, s, nheads, d): query head h reads kv head h // group."""
    group = nheads // x.shape[2]
    return np.repeat(x, group, axis=2)


def _heads_first(x):
    """(b, s, h, d) -> (b, h, s, d)."""
    return x.transpose(0, 2, 1, 3)


def _to_caller(spec, x):
    """A contiguous array in the caller's layout from a (b, s, h, d) one."""
    return np.ascontiguousarray(spec.swap_layout(x))


def _softmax(spec, q, k):
    """The scaled scores before softcap ``x``, the live (unmasked) pairs, P and lse.

    q, k: float64 (b, s, h, d) and (b, s, h_kv, d); x and P are (b, h, seqlen_q, seqlen_k), ``live``
    broadcasts to that, lse is (b, h, seqlen_q).
    """
    qh, kh = _heads_first(q), _heads_first(_expand_kv(k, spec.nheads))
    with np.errstate(invalid="ignore", over="ignore"):
        # Entry (i, j) of a matmul reads row i of q and row j of k only: NaN stays in its pairs.
        x = spec.scale * (qh @ kh.swapaxes(-1, -2))
        s = spec.softcap * np.tanh(x / spec.softcap) if spec.softcap else x
        if spec.alibi_slopes is not None:
            i = np.arange(spec.seqlen_q)[:, None] + spec.offset
            j = np.arange(spec.seqlen_k)[None, :]
            s = s - _host64(spec.alibi_slopes)[:, :, None, None] * np.abs(i - j)
        live = visibility(spec)
        if spec.mask_kind == "bias":
            bias = _host64(spec.attn_mask)
            live = live & (bias != -np.inf)  # masked whatever the data: inf + -inf would be NaN
            s = s + bias
    s = np.where(live, s, -np.inf)
    live = live & (s != -np.inf)
    scores = s
    if spec.learnable_sink is not None:  # the sink: one more score in every row of its head
        sink = np.broadcast_to(_host64(spec.learnable_sink)[None, :, None, None], s.shape[:-1] + (1,))
        scores = np.concatenate([s, sink], axis=-1)
    m = scores.max(axis=-1, keepdims=True)  # NaN if the row holds one
    m = np.where(np.isfinite(m), m, 0.0)  # all -inf: l = 0, lse = -inf; +inf: l = lse = +inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lse = m + np.log(np.sum(np.exp(scores - m), axis=-1, keepdims=True))
        p = np.where(live, np.exp(s - lse), 0.0)
    return x, live, p, lse[..., 0]


def _softcap_slope(u):
    """d/du tanh(u) = 1 - tanh(u)^2, as 4 e / (1 + e)^2 with e = exp(-2 |u|): 1 - tanh^2 cancels where tanh
    nears ±1 and keeps only the rounding of tanh there (a relative error of 1e-10 at |u| = 8)."""
    e = np.exp(-2 * np.abs(u))
    return 4 * e / (1 + e) ** 2


def _live_matmul(a, live, b):
    """``a @ b`` over the live pairs only: sum_n a[..., m, n] b[..., n, :] where ``live[..., m, n]``.

    A masked pair adds exactly nothing even where b's row n holds NaN or inf (0 * inf is NaN), so
    the rows of b that hold one are summed apart, pair by pair; the clean rows make one product of
    their own (zeroing the dirty rows instead would turn an infinite live a[m, n] into NaN).
    """
    live = np.broadcast_to(live, a.shape)
    a = np.where(live, a, 0.0)
    dirty = ~np.isfinite(b).all(axis=(0, 1, 3))
    with np.errstate(invalid="ignore", over="ignore"):
        if not dirty.any():
            return a @ b
        out = a[..., ~dirty] @ b[..., ~dirty, :]
        terms = a[..., dirty, None] * b[..., None, dirty, :]  # (b, h, m, dirty rows, d)
        return out + np.where(live[..., dirty, None], terms, 0.0).sum(axis=-2)


def _dropout_scale(fn, spec, dropout_mask):
    """keep / (1 - dropout_p), broadcastable to (batch, nheads, seqlen_q, seqlen_k); None without
    dropout. An explicit ``dropout_mask`` wins over ``dropout_seed``."""
    shape = (spec.batch, spec.nheads, spec.seqlen_q, spec.seqlen_k)
    if not spec.dropout:
        if dropout_mask is not None:
            _fail_mask(fn, "must be None when dropout_p is 0", "an array")
        return None
    if dropout_mask is None:
        if spec.dropout_seed is None:
            _fail_mask(fn, "must be given (a bool keep-mask), or dropout_seed, when dropout_p > 0", "neither")
        keep = _philox.keep_mask(shape, spec.dropout_p, spec.dropout_seed, spec.batch_offset)
    else:
        if _validate.array_kind(dropout_mask) is None:
            _fail_mask(fn, "must be a bool numpy.ndarray or cupy.ndarray", type(dropout_mask).__name__, TypeError)
        if np.dtype(dropout_mask.dtype) != np.bool_:
            _fail_mask(fn, "must have dtype bool (True = kept)", np.dtype(dropout_mask.dtype).name, TypeError)
        try:
            keep = np.broadcast_to(_host(dropout_mask), shape)
        except ValueError:
            _fail_mask(fn, f"must broadcast to (batch, nheads, seqlen_q, seqlen_k)={shape}", tuple(dropout_mask.shape))
    return keep / (1.0 - spec.dropout_p)


def _fail_mask(fn, expected, got, exc=ValueError):
    _validate._fail(exc, fn, "dropout_mask", expected, got)


def _unbroadcast(g, shape):
    """Sum a (batch, nheads, seqlen_q, seqlen_k) gradient down to a mask's broadcast ``shape``."""
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as the arithmetic says
        g = g.sum(axis=tuple(range(g.ndim - len(shape))))
        axes = tuple(a for a, n in enumerate(shape) if n == 1 and g.shape[a] != 1)
        return g.sum(axis=axes, keepdims=True).reshape(shape)


def attention(q: Array, k: Array, v: Array, *, causal: bool = False, scale: Optional[float] = None,
              window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Array] = None,
              attn_mask: Optional[Array] = None, dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
              dropout_mask: Optional[Array] = None, learnable_sink: Optional[Array] = None, return_lse: bool = False,
              layout: str = "bshd",
              cu_seqlens_q: Optional[Array] = None, cu_seqlens_k: Optional[Array] = None,
              max_seqlen_q: Optional[int] = None,
              max_seqlen_k: Optional[int] = None) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """softmax(scores) v in float64 on the full matrix, every variant of docs/variants.md.

    Same keywords as :func:`cupyflash.attention`, plus ``dropout_mask``: an explicit bool
    keep-mask broadcastable to (batch, nheads, seqlen_q, seqlen_k), used instead of the bits of
    ``dropout_seed``. Returns float64 NumPy ``out`` in the caller's layout and, with
    ``return_lse``, ``lse`` (batch, nheads, seqlen_q) of the softmax before dropout.
    """
    fn = "reference.attention"
    spec = _validate.check_call(fn, q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p,
                                dropout_seed=dropout_seed, learnable_sink=learnable_sink, layout=layout,
                                mixed_ok=True, seed_required=False,
                                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                max_seqlen_k=max_seqlen_k)
    return_lse = _validate.check_flag(fn, "return_lse", return_lse)
    if spec.varlen:
        _no_mask_with_varlen(fn, dropout_mask)
        q, k, v = (_host64(x) for x in (q, k, v))
        out = np.zeros(q.shape)
        lse = np.full((spec.nheads, q.shape[0]), -np.inf)
        for _, rows_q, rows_k, one in _varlen._sequences(spec):
            if not one.seqlen_k and spec.learnable_sink is not None:  # no key: the sink's row alone
                lse[:, rows_q] = _host64(spec.learnable_sink)[:, None]
            if one.seqlen_k:
                out_b, lse_b = _forward(one, q[None, rows_q], k[None, rows_k], v[None, rows_k],
                                        _dropout_scale(fn, one, None))
                out[rows_q], lse[:, rows_q] = out_b[0], lse_b[0]
    else:
        scale_keep = _dropout_scale(fn, spec, dropout_mask)
        out, lse = _forward(spec, *(_host64(spec.swap_layout(x)) for x in (q, k, v)), scale_keep)
        out = _to_caller(spec, out)
    return (out, lse) if return_lse else out


def _no_mask_with_varlen(fn, dropout_mask):
    if dropout_mask is not None:
        _fail_mask(fn, "must be None with cu_seqlens (each sequence draws the bits of dropout_seed)", "an array")


def _forward(spec, q, k, v, scale_keep):
    """Dense float64 (out (batch, seqlen_q, nheads, headdim), lse) of (batch, seqlen, heads, headdim) arrays."""
    _, live, p, lse = _softmax(spec, q, k)
    vh = _heads_first(_expand_kv(v, spec.nheads))
    out = _live_matmul(p if scale_keep is None else p * scale_keep, live, vh)
    return out.transpose(0, 2, 1, 3), lse


def attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *, causal: bool = False,
                       scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: Optional[Array] = None, attn_mask: Optional[Array] = None,
                       dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                       dropout_mask: Optional[Array] = None, learnable_sink: Optional[Array] = None,
                       deterministic: bool = False, return_dbias: bool = False, return_dsink: bool = False,
                       layout: str = "bshd", cu_seqlens_q: Optional[Array] = None,
                       cu_seqlens_k: Optional[Array] = None, max_seqlen_q: Optional[int] = None,
                       max_seqlen_k: Optional[int] = None) -> Tuple[np.ndarray, ...]:
    """Exact float64 gradients (dq, dk, dv) of ``sum(dout * attention(q, k, v, ...))``.

    Same keywords as :func:`reference.attention`. ``out`` and ``lse`` are checked for shape only
    and otherwise ignored: P and out are recomputed in float64, so a low-precision ``out`` cannot
    leak into the ground truth. ``deterministic`` is accepted and ignored. ``return_dbias`` (with a
    float ``attn_mask``) also returns dbias, in the mask's own shape and dtype; ``return_dsink`` (with a
    ``learnable_sink``) then dsink, (nheads,) float64.
    """
    fn = "reference.attention_backward"
    spec = _validate.check_call(fn, q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p,
                                dropout_seed=dropout_seed, learnable_sink=learnable_sink, layout=layout,
                                mixed_ok=True, seed_required=False, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return_dbias = _validate.check_backward_arrays(fn, dout, out, lse, spec, strict=False, return_dbias=return_dbias)
    return_dsink = _validate.check_return_dsink(fn, return_dsink, spec)
    _validate.check_flag(fn, "deterministic", deterministic)
    dsink = (np.zeros(spec.nheads),) if return_dsink else ()
    if spec.varlen:
        _no_mask_with_varlen(fn, dropout_mask)
        dout, q, k, v = (_host64(x) for x in (dout, q, k, v))
        dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
        for _, rows_q, rows_k, one in _varlen._sequences(spec):
            if one.seqlen_k:  # (a row with no key has out 0: no sink gradient)
                grads = _backward(one, dout[None, rows_q], q[None, rows_q], k[None, rows_k], v[None, rows_k],
                                  _dropout_scale(fn, one, None))
                dq[rows_q], dk[rows_k], dv[rows_k] = (g[0] for g in grads[:3])
                if return_dsink:
                    dsink[0][:] += grads[4]
        return (dq, dk, dv) + dsink
    grads = _backward(spec, *(_host64(spec.swap_layout(x)) for x in (dout, q, k, v)),
                      _dropout_scale(fn, spec, dropout_mask))
    dq, dk, dv = (_to_caller(spec, g) for g in grads[:3])
    dbias = (_unbroadcast(grads[3], spec.mask_shape).astype(spec.attn_mask.dtype),) if return_dbias else ()
    return (dq, dk, dv) + dbias + ((grads[4],) if return_dsink else ())


def _backward(spec, dout, q, k, v, scale_keep):
    """Dense float64 (dq, dk, dv, ds, dsink) of (batch, seqlen, heads, headdim) arrays; ds is
    (batch, nheads, seqlen_q, seqlen_k), dsink (nheads,) (None without a learnable sink)."""
    x, live, p, lse = _softmax(spec, q, k)
    qh, doh = _heads_first(q), _heads_first(dout)
    kh, vh = (_heads_first(_expand_kv(y, spec.nheads)) for y in (k, v))
    pd = p if scale_keep is None else p * scale_keep  # the weights out actually used
    out = _live_matmul(pd, live, vh)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.sum(doh * out, axis=-1, keepdims=True)  # = sum_j P_ij dP'_ij
        dp = doh @ vh.swapaxes(-1, -2)
        if scale_keep is not None:
            dp = dp * scale_keep
        ds = np.where(live, p * (dp - delta), 0.0)
        dx = ds * _softcap_slope(x / spec.softcap) if spec.softcap else ds
    dq = spec.scale * _live_matmul(dx, live, kh)
    live_t = live.swapaxes(-1, -2)
    dk = spec.scale * _live_matmul(dx.swapaxes(-1, -2), live_t, qh)
    dv = _live_matmul(pd.swapaxes(-1, -2), live_t, doh)

    def group_sum(g):  # (b, h, seqlen_k, d) -> (b, seqlen_k, h_kv, d): GQA sums a group's heads
        b, h, s, d = g.shape
        with np.errstate(invalid="ignore"):  # inf - inf across heads is NaN, as the arithmetic says
            return g.reshape(b, spec.nheads_kv, h // spec.nheads_kv, s, d).sum(axis=2).transpose(0, 2, 1, 3)

    dsink = None
    if spec.learnable_sink is not None:  # the sink's score: gradient p_sink (0 - delta), its value being zero
        with np.errstate(invalid="ignore", over="ignore"):
            # a row with no key and no sink (lse -inf, out 0) adds nothing, even where its dout holds NaN
            terms = np.where(lse == -np.inf, 0.0,
                             np.exp(_host64(spec.learnable_sink)[None, :, None] - lse) * delta[..., 0])
            dsink = -terms.sum(axis=(0, 2))
    return dq.transpose(0, 2, 1, 3), group_sum(dk), group_sum(dv), ds, dsink


def merge_attention(outs: Sequence[Array], lses: Sequence[Array], *,
                    layout: str = "bshd") -> Tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` of attention over the union of disjoint key sets, from each set's
    ``(out_i, lse_i)``, in float64: ``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) out_i``;
    a row no part saw gives out 0 and lse -inf. Same arguments as :func:`cupyflash.merge_attention`."""
    from scipy.special import logsumexp

    from ._merge import _check

    _check("reference.merge_attention", outs, lses, layout)
    outs = [_host64(x) for x in outs]
    lse_parts = np.stack([_host64(x) for x in lses])
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = logsumexp(lse_parts, axis=0)
        weights = np.where(np.isneginf(lse), 0.0, np.exp(lse_parts - lse))
    w = weights.transpose(0, 1, 3, 2) if layout == "bshd" else weights
    return sum(w[i][..., None] * x for i, x in enumerate(outs)), lse


def rotary_embedding(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, heads, headdim) with the first rotary_dim columns of row s of sequence b rotated by
    rows ``positions[b, s]`` of cos and sin (seqlen_ro, rotary_dim / 2): x_r cos + rotate(x_r) sin in
    float64, where rotate maps each pair (x1, x2) to (-x2, x1), pairs being columns (2i, 2i + 1) when
    interleaved, else (i, i + rotary_dim / 2). Float64."""
    x, cos, sin = (_host64(t) for t in (x, cos, sin))
    rotary_dim = 2 * cos.shape[1]
    # each column's angle: its pair's
    c, s = ((np.repeat(t, 2, axis=1) if interleaved else np.tile(t, (1, 2))) for t in (cos, sin))
    c, s = (t[positions][:, :, None, :] for t in (c, s))
    xr = x[..., :rotary_dim]
    if interleaved:
        rotated = np.stack([-xr[..., 1::2], xr[..., 0::2]], axis=-1).reshape(xr.shape)
    else:
        rotated = np.concatenate([-xr[..., rotary_dim // 2:], xr[..., :rotary_dim // 2]], axis=-1)
    return np.concatenate([xr * c + rotated * s, x[..., rotary_dim:]], axis=-1)


def attention_with_kvcache(q: Array, k_cache: Array, v_cache: Array, k: Optional[Array] = None,
                           v: Optional[Array] = None, *, rotary_cos: Optional[Array] = None,
                           rotary_sin: Optional[Array] = None, cache_seqlens: Union[None, int, Array] = None,
                           cache_batch_idx: Optional[Array] = None, cache_leftpad: Optional[Array] = None,
                           block_table: Optional[Array] = None, causal: bool = False, scale: Optional[float] = None,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           rotary_interleaved: bool = True, alibi_slopes: Optional[Array] = None,
                           learnable_sink: Optional[Array] = None, return_lse: bool = False,
                           num_splits: int = 0) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Float64 ``out`` (and ``lse``) of :func:`cupyflash.attention_with_kvcache`'s call: sequence b's
    queries attend, through :func:`attention`, to its cache rows ``[cache_leftpad[b], cache_seqlens[b])``
    (read through ``block_table`` when paged, or from entry ``cache_batch_idx[b]``) followed by its new
    ``k``, ``v``. With ``rotary_cos`` and ``rotary_sin``, the new k and q first pass through :func:`rotary_embedding` at the call's positions
    and are rounded to their dtype, as the cache keeps k and the kernels take q.

    It writes nothing: the caches are only read, and the result is that of attending to cache plus
    new keys, which is what the real call returns after appending them. The arguments are checked
    as the real call checks them (NumPy and CuPy arrays may be mixed); ``num_splits`` is checked
    and otherwise ignored.
    """
    fn = "reference.attention_with_kvcache"
    call = _kvcache.check_call(fn, q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                               cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                               cache_leftpad=cache_leftpad, block_table=block_table, causal=causal, scale=scale,
                               window_size=window_size, softcap=softcap, rotary_interleaved=rotary_interleaved,
                               alibi_slopes=alibi_slopes, learnable_sink=learnable_sink, num_splits=num_splits,
                               writes=False, mixed_ok=True)
    return_lse = _validate.check_flag(fn, "return_lse", return_lse)
    spec = call.spec
    if rotary_cos is not None:
        starts = call.cache_seqlens[:, None]
        q_positions = starts + np.arange(spec.seqlen_q) * int(spec.causal or spec.has_window)
        k = rotary_embedding(k, rotary_cos, rotary_sin, starts + np.arange(call.seqlen_new),
                             call.rotary_interleaved).astype(spec.dtype)
        q = rotary_embedding(q, rotary_cos, rotary_sin, q_positions, call.rotary_interleaved).astype(spec.dtype)
    q, k_cache, v_cache = (_host(x) for x in (q, k_cache, v_cache))
    k, v = (None if x is None else _host(x) for x in (k, v))
    slopes = None if spec.alibi_slopes is None else _host(spec.alibi_slopes)
    out = np.zeros(q.shape)
    lse = np.full((spec.batch, spec.nheads, spec.seqlen_q), -np.inf)
    for b in range(spec.batch):
        positions = np.arange(call.leftpad[b], call.cache_seqlens[b])
        pages, rows = call.pages[b, positions // call.page_size], positions % call.page_size
        keys, values = (np.concatenate([cache[pages, rows]] + ([] if new is None else [new[b]]))[None]
                        for cache, new in ((k_cache, k), (v_cache, v)))
        if keys.shape[1] == 0:  # no key: out 0, lse -inf or the sink's logit
            if spec.learnable_sink is not None:
                lse[b] = _host64(spec.learnable_sink)[:, None]
            continue
        out[b], lse[b] = (x[0] for x in attention(
            q[b:b + 1], keys, values, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[b], learnable_sink=spec.learnable_sink,
            return_lse=True))
    return (out, lse) if return_lse else out
