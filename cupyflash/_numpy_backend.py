"""Tiled NumPy backend: FlashAttention-2, block by block, with every variant of docs/variants.md.

The readable mirror of the CUDA kernels. The seqlen_q x seqlen_k score matrix never exists: only
one (block_q x block_k) tile of it at a time, for all batches and heads at once (every tile op is
vectorised over batch and heads). What the variants (window, softcap, ALiBi, bool mask or bias,
dropout) ask of a tile comes from :mod:`cupyflash._variants`, the twin of ``cuda_src/mask.cuh``.

Layout inside the backend: heads are split as ``(nheads_kv, group)`` with
``group = nheads // nheads_kv``; query head ``h = h_kv * group + g`` reads kv head
``h_kv = h // group``. q-side arrays are ``(batch, nheads_kv, group, seqlen_q, headdim)`` and k/v
are ``(batch, nheads_kv, 1, seqlen_k, headdim)``, so GQA/MQA is a broadcast over the group axis,
never a repeat of k/v.

Forward (per query tile, outer loop; the key tiles of its causal/window band, inner loop)::

    s      = (q_i @ k_j^T) * scale
    x      = score(s)                       softcap, ALiBi, bias; -inf where masked
    m_new  = max(m, rowmax(x))
    p      = exp(x - m_new)
    alpha  = exp(m - m_new)                 rescales what was accumulated
    l      = alpha * l + rowsum(p)          before dropout: lse is the softmax's
    acc    = alpha * acc + (p * keep / (1 - dropout_p)) @ v_j
    m      = m_new
    l      = l + exp(sink)                  with a learnable sink (a key whose value is zero; shifted
                                            by max(m, sink) like the others)
    out    = acc / l,   lse = m + log(l)        added in float64, rounded once to lse's dtype

Backward (per key tile, outer loop; the query tiles of its band, inner loop)::

    delta  = rowsum(dout * out)             once, before the loops
    r      = 1 / (rowsum(exp(x - lse))      float32/float64 inputs, once, before the loops (below);
                  + exp(sink - lse))        the sink's term 0 without a sink
    p      = r * exp(x - lse)               recomputed, never stored
    pd     = keep * p / (1 - dropout_p)     the weights out used (pd = p without dropout)
    dv_j  += pd^T @ dout_i
    dp     = keep * (dout_i @ v_j^T) / (1 - dropout_p)
    ds     = p * (dp - delta_i)             the score's gradient = dbias
    dx     = ds * (1 - tanh(s / softcap)^2) softcap (dx = ds otherwise)
    dk_j  += scale * dx^T @ q_i
    dq_i  += scale * dx @ k_j               dq accumulates in compute dtype

A masked pair (score -inf) adds exactly nothing, even against NaN or inf data: p and ds are 0
there, and a product whose right operand has a non-finite row sums that row apart, leaving out the
masked pairs (0 * nan is nan). Tiles whose rows are all finite pay nothing for this. A row with no
unmasked pair has l = 0: out 0, lse -inf, and p = 0 in the backward. A NaN score makes m and lse
NaN; a +inf score (and no NaN) makes lse +inf.

lse and its rounding: p = exp(x - lse) inherits lse's absolute error in every probability of the
row, and rounding lse costs |lse| eps, which naive attention (exp(x - max) / sum, exact for a one-hot
row) does not pay; at large logits that dominates the gradients' error. lse is formed once, m + log(l)
in float64, and rounded once; for float32 and float64 inputs the backward then divides each row's
recomputed probabilities by their sum, r above, the kernels' renormalized recomputation
(``row_renormalizer`` in cuda_src/mask.cuh, with the same rule): only a sum within 8 unit roundoffs of
(1 + |lse| log2 e) of 1 is divided out, so an lse of more keys than these (a blockwise or ring backward)
leaves the probabilities as recomputed; float64 rows with |lse| log2 e <= ``_plan.RENORMALIZED_LSE2``
are left alone, their rounding far below the fidelity floor. tests/test_fidelity.py has the numbers.

Extra memory: O(block_q * block_k * batch * nheads) for a tile plus
O(seqlen * headdim * batch * nheads) for the compute-dtype copies and accumulators (and a dbias
accumulator of the mask's shape); never seqlen_q * seqlen_k.
"""

from __future__ import annotations

import numpy as np

from . import _plan, _validate, _variants
from ._validate import compute_dtype

__all__ = ["forward", "backward", "sink_gradient", "BLOCK_Q", "BLOCK_K"]

BLOCK_Q = 64
BLOCK_K = 64


def _split_q(x, nheads_kv, dtype):
    """(b, s, nheads, d) -> (b, nheads_kv, group, s, d) in ``dtype`` (a copy)."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, nheads_kv, h // nheads_kv, d).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(x, dtype=dtype)


def _split_kv(x, dtype):
    """(b, s, nheads_kv, d) -> (b, nheads_kv, 1, s, d) in ``dtype`` (a copy)."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype)[:, :, None]


def _merge_q(x):
    """(b, nheads_kv, group, s, d) -> (b, s, nheads, d) (a view)."""
    b, hkv, g, s, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, s, hkv * g, d)


def _finite_rows(x):
    """Per sequence position of a split array (..., s, d): all of its values are finite."""
    return np.isfinite(x).all(axis=tuple(range(x.ndim - 2)) + (-1,))


def _tiles(begin, end, block):
    """Starts of the block-aligned tiles covering [begin, end)."""
    return range(begin - begin % block, end, block) if end > begin else range(0)


def _matmul(a, b, masked, b_rows_ok):
    """``a @ b`` where the masked pairs ``masked[..., m, n]`` (a is 0 there) take nothing from row n
    of b even when it is not finite (0 * nan is nan). ``b_rows_ok`` flags the rows of b that are
    finite in every batch and head: the others are summed apart, pair by pair; ``masked`` None says
    there is nothing to leave out."""
    if masked is None or b_rows_ok.all():
        return np.matmul(a, b)
    bad = ~b_rows_ok
    out = np.matmul(a[..., b_rows_ok], b[..., b_rows_ok, :])
    terms = a[..., bad, None] * b[..., bad, :][..., None, :, :]  # (..., m, bad rows, d)
    return out + np.where(masked[..., bad, None], a.dtype.type(0), terms).sum(axis=-2)


@np.errstate(invalid="ignore", over="ignore")  # NaN and inf in the data propagate as the rules say
def forward(q, k, v, spec, *, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Return ``(out, lse)``: out like q in the caller's layout, lse (batch, nheads, seqlen_q) in
    the compute dtype."""
    batch, seqlen_q, nheads, headdim = q.shape
    cdt = compute_dtype(spec.dtype)
    neg_inf = cdt.type(-np.inf)

    qc = _split_q(q, spec.nheads_kv, cdt)
    kc = _split_kv(k, cdt)
    vc = _split_kv(v, cdt)
    v_ok = _finite_rows(vc)
    lead = qc.shape[:3]  # (batch, nheads_kv, group)

    out = spec.empty(np.empty, q.shape, q.dtype)
    lse = np.empty(lead + (seqlen_q,), dtype=_validate.lse_dtype(spec.dtype))
    rdrop = cdt.type(1 / (1 - spec.dropout_p))
    sink = _heads_sink(spec, lead)

    for q_start in range(0, seqlen_q, block_q):
        q_end = min(q_start + block_q, seqlen_q)
        q_i = qc[..., q_start:q_end, :]
        n_q = q_end - q_start

        m = np.full(lead + (n_q,), neg_inf, dtype=cdt)
        l = np.zeros(lead + (n_q,), dtype=cdt)
        acc = np.zeros(lead + (n_q, headdim), dtype=cdt)

        for k_start in _tiles(*_variants.key_range(spec, q_start, q_end), block_k):
            k_end = min(k_start + block_k, spec.seqlen_k)
            s = np.matmul(q_i, kc[..., k_start:k_end, :].swapaxes(-1, -2))
            s *= spec.scale
            x, _ = _variants.scores(spec, s, q_start, k_start)

            m_new = np.maximum(m, x.max(axis=-1))  # NaN once the row holds one
            # A row that has seen only masked keys has m_new = -inf; subtract 0
            # instead so exp(-inf - (-inf)) never happens (p and alpha are 0).
            m_safe = np.where(m_new == neg_inf, cdt.type(0), m_new)
            p = np.exp(x - m_safe[..., None])
            alpha = np.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            if spec.dropout:
                p = p * np.where(_variants.keep(spec, q_start, q_end, k_start, k_end), rdrop, cdt.type(0))
            acc *= alpha[..., None]
            v_rows_ok = v_ok[k_start:k_end]
            masked = None if v_rows_ok.all() else x == neg_inf
            acc += _matmul(p, vc[..., k_start:k_end, :], masked, v_rows_ok)
            m = m_new

        # l sums exp(x - shift). A learnable sink joins the sum (not a row with a +inf score): shifted by
        # max(shift, sink), which leaves a NaN sink out of the max and makes the sum NaN.
        keys = l != 0  # a row that saw no key keeps out 0, whatever its sink
        shift, o_factor = np.where(m == neg_inf, cdt.type(0), m), cdt.type(1)
        if sink is not None:
            joins = m != np.inf
            joint = np.where(joins, np.fmax(shift, sink), shift)
            o_factor = np.exp(shift - joint)
            l = np.where(joins, l * o_factor + np.exp(sink - joint), l)
            shift = joint
        # Rows that saw no unmasked key (and no sink): l == 0 -> out 0, lse -inf. With a +inf score
        # exp(inf - inf) made l NaN, but lse is +inf.
        dead = l == 0
        l_safe = np.where(dead, cdt.type(1), l)
        out[:, q_start:q_end] = _merge_q(acc * np.where(keys, o_factor / l_safe, cdt.type(0))[..., None])
        # shift + log(l) in float64, rounded once to lse's dtype (see the module's notes on lse).
        lse_rows = shift.astype(np.float64) + np.log(l_safe.astype(np.float64))
        lse[..., q_start:q_end] = np.where(dead, -np.inf, np.where(m == np.inf, np.inf, lse_rows))

    return out, lse.reshape(batch, nheads, seqlen_q)


def _heads_sink(spec, lead):
    """The learnable sink (in the compute dtype, _validate) broadcast against (batch, nheads_kv, group, rows);
    None without one."""
    sink = spec.learnable_sink
    return None if sink is None else sink.reshape(1, lead[1], lead[2], 1)


def sink_gradient(dout, out, lse, spec):
    """d loss / d learnable_sink, (nheads,) in the sink's dtype: a key whose value is zero has the score
    gradient p_sink (0 - delta), so dsink = -sum over rows of exp(sink - lse) delta. dout and out as the
    backward takes them (packed: (total_q, heads, headdim) with lse (nheads, total_q))."""
    cdt = compute_dtype(spec.dtype)
    if spec.varlen:
        dout, out, lse = dout[None], out[None], lse[None]
    delta = np.einsum("bshd,bshd->bhs", dout.astype(cdt), out.astype(cdt))
    lse = lse.astype(cdt)
    with np.errstate(over="ignore", invalid="ignore"):
        # lse -inf: a row with no key and no sink (out 0) adds nothing, even where its dout holds NaN
        terms = np.where(lse == -np.inf, cdt.type(0), np.exp(spec.learnable_sink[:, None] - lse) * delta)
        return -terms.sum(axis=(0, 2))


def _row_renormalizers(qc, kc, lse_safe, spec, block_q, block_k):
    """Per row, 1 / total where total = rowsum(exp(x - lse)) (+ exp(sink - lse) with a learnable sink, whose
    probability carries the same rounding) is within lse's rounding of 1, else 1 (the module's notes on lse;
    cuda_src/mask.cuh, row_renormalizer)."""
    cdt = lse_safe.dtype
    sums = np.zeros(lse_safe.shape, cdt)
    for q_start in range(0, qc.shape[3], block_q):
        q_end = min(q_start + block_q, qc.shape[3])
        for k_start in _tiles(*_variants.key_range(spec, q_start, q_end), block_k):
            k_end = min(k_start + block_k, spec.seqlen_k)
            s = np.matmul(qc[..., q_start:q_end, :], kc[..., k_start:k_end, :].swapaxes(-1, -2))
            s *= spec.scale
            x, _ = _variants.scores(spec, s, q_start, k_start)
            p = np.exp(x - lse_safe[..., q_start:q_end, None])
            sums[..., q_start:q_end] += np.where(x == cdt.type(-np.inf), cdt.type(0), p).sum(axis=-1)
    unit = cdt.type(np.finfo(cdt).eps / 2)
    lse2 = np.abs(lse_safe * cdt.type(np.log2(np.e)))
    tolerance = 8 * unit * (1 + lse2)
    sink = _heads_sink(spec, lse_safe.shape)
    totals = sums if sink is None else sums + np.exp(sink - lse_safe)
    near_one = (sums > 0) & (np.abs(totals - 1) <= tolerance)
    if cdt == np.float64:
        near_one &= ~(lse2 <= _plan.RENORMALIZED_LSE2)
    return np.where(near_one, 1 / np.where(near_one, totals, 1), cdt.type(1))


@np.errstate(invalid="ignore", over="ignore")  # NaN and inf in the data propagate as the rules say
def backward(dout, q, k, v, out, lse, spec, deterministic=False, want_dbias=False, *,
             block_q=BLOCK_Q, block_k=BLOCK_K):
    """Return ``(dq, dk, dv, dbias)``: the gradients with q's, k's and v's shapes and dtypes in the
    caller's layout, and dbias in the mask's shape and dtype (None unless ``want_dbias``).

    NumPy is deterministic whatever ``deterministic`` says.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = spec.seqlen_k
    cdt = compute_dtype(spec.dtype)
    neg_inf = cdt.type(-np.inf)
    rdrop = cdt.type(1 / (1 - spec.dropout_p))

    qc = _split_q(q, spec.nheads_kv, cdt)
    doc = _split_q(dout, spec.nheads_kv, cdt)
    kc = _split_kv(k, cdt)
    vc = _split_kv(v, cdt)
    lead = qc.shape[:3]

    # delta = rowsum(dout * out), in compute dtype, once.
    delta = np.einsum("bsnd,bsnd->bns", dout.astype(cdt), out.astype(cdt))
    delta = np.ascontiguousarray(delta.reshape(lead + (seqlen_q,)))
    # Fully masked rows have lse = -inf; use +inf there so p = exp(x - inf) = 0.
    lse_c = lse.reshape(lead + (seqlen_q,)).astype(cdt)
    lse_safe = np.where(lse_c == neg_inf, cdt.type(np.inf), lse_c)
    row_scale = (_row_renormalizers(qc, kc, lse_safe, spec, block_q, block_k)
                 if _plan.renormalizes(spec.dtype.name) else None)

    # Rows whose data is all finite: a tile of such rows needs no care for its masked pairs.
    q_ok, do_ok, k_ok, v_ok = (_finite_rows(x) for x in (qc, doc, kc, vc))
    q_side_ok = q_ok & do_ok & np.isfinite(delta).all(axis=(0, 1, 2)) & ~np.isnan(lse_c).any(axis=(0, 1, 2))
    k_side_ok = k_ok & v_ok

    dq = np.zeros(qc.shape, dtype=cdt)
    dk = spec.empty(np.empty, k.shape, k.dtype)
    dv = spec.empty(np.empty, v.shape, v.dtype)
    if want_dbias:
        # Accumulated in the 4-D shape the mask broadcast from; its size-1 axes sum.
        mask4 = (1,) * (4 - len(spec.mask_shape)) + tuple(spec.mask_shape)
        dbias = np.zeros(mask4, dtype=cdt)
        summed = tuple(a for a in range(4) if mask4[a] == 1)

    for k_start in range(0, seqlen_k, block_k):
        k_end = min(k_start + block_k, seqlen_k)
        n_k = k_end - k_start
        k_j = kc[..., k_start:k_end, :]
        v_j = vc[..., k_start:k_end, :]
        dk_acc = np.zeros(lead + (n_k, headdim), dtype=cdt)
        dv_acc = np.zeros(lead + (n_k, headdim), dtype=cdt)

        for q_start in _tiles(*_variants.query_range(spec, k_start, k_end), block_q):
            q_end = min(q_start + block_q, seqlen_q)
            q_i = qc[..., q_start:q_end, :]
            do_i = doc[..., q_start:q_end, :]

            s = np.matmul(q_i, k_j.swapaxes(-1, -2))
            s *= spec.scale
            x, dcap = _variants.scores(spec, s, q_start, k_start)
            clean = q_side_ok[q_start:q_end].all() and k_side_ok[k_start:k_end].all()
            masked = None if clean else x == neg_inf
            masked_t = None if clean else masked.swapaxes(-1, -2)
            p = np.exp(x - lse_safe[..., q_start:q_end, None])
            if row_scale is not None:
                p *= row_scale[..., q_start:q_end, None]
            dp = np.matmul(do_i, v_j.swapaxes(-1, -2))
            if masked is not None:
                p = np.where(masked, cdt.type(0), p)  # exp(-inf - nan) is nan
            pd = p
            if spec.dropout:  # multiplied, not selected: a dropped inf or nan still gives nan
                drop = np.where(_variants.keep(spec, q_start, q_end, k_start, k_end), rdrop, cdt.type(0))
                pd, dp = p * drop, dp * drop

            dv_acc += _matmul(pd.swapaxes(-1, -2), do_i, masked_t, do_ok[q_start:q_end])
            ds = p * (dp - delta[..., q_start:q_end, None])
            if masked is not None:
                ds = np.where(masked, cdt.type(0), ds)  # 0 * nan from dout, v or delta
            if want_dbias:
                rows = slice(q_start, q_end) if mask4[2] != 1 else slice(None)
                cols = slice(k_start, k_end) if mask4[3] != 1 else slice(None)
                dbias[:, :, rows, cols] += ds.reshape(batch, nheads, q_end - q_start, n_k).sum(summed, keepdims=True)
            dx = ds
            if dcap is not None:
                dx = ds * dcap
                if masked is not None:
                    dx = np.where(masked, cdt.type(0), dx)  # dcap is nan where s is
            dk_acc += spec.scale * _matmul(dx.swapaxes(-1, -2), q_i, masked_t, q_ok[q_start:q_end])
            dq[..., q_start:q_end, :] += spec.scale * _matmul(dx, k_j, masked, k_ok[k_start:k_end])

        # GQA: a kv head's gradient is the sum over the query heads reading it.
        dk[:, k_start:k_end] = dk_acc.sum(axis=2).transpose(0, 2, 1, 3)
        dv[:, k_start:k_end] = dv_acc.sum(axis=2).transpose(0, 2, 1, 3)

    dq_out = spec.empty(np.empty, q.shape, q.dtype)
    dq_out[...] = _merge_q(dq)
    if not want_dbias:
        return dq_out, dk, dv, None
    return dq_out, dk, dv, dbias.reshape(spec.mask_shape).astype(spec.attn_mask.dtype)
