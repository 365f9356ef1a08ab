"""Tiled NumPy backend: FlashAttention-2, block by block.

The readable mirror of the CUDA kernels. The seqlen_q x seqlen_k score
matrix never exists: only one (block_q x block_k) tile of it at a time, for
all batches and heads at once (every tile op is vectorised over batch and
heads).

Layout inside the backend: heads are split as ``(nheads_kv, group)`` with
``group = nheads // nheads_kv``; query head ``h = h_kv * group + g`` reads kv
head ``h_kv = h // group``. q-side arrays are ``(batch, nheads_kv, group,
seqlen_q, headdim)`` and k/v are ``(batch, nheads_kv, 1, seqlen_k, headdim)``,
so GQA/MQA is a broadcast over the group axis, never a repeat of k/v.

Forward (per query tile, outer loop; key/value tiles, inner loop)::

    s      = (q_i @ k_j^T) * scale          causal: -inf above the diagonal
    m_new  = max(m, rowmax(s))
    p      = exp(s - m_new)
    alpha  = exp(m - m_new)                 rescales what was accumulated
    l      = alpha * l + rowsum(p)
    acc    = alpha * acc + p @ v_j
    m      = m_new
    out    = acc / l,   lse = m + log(l)

Backward (per key tile, outer loop; query tiles, inner loop)::

    delta  = rowsum(dout * out)             once, before the loops
    p      = exp(s - lse)                   recomputed, never stored
    dv_j  += p^T @ dout_i
    dp     = dout_i @ v_j^T
    ds     = p * (dp - delta_i)
    dk_j  += scale * ds^T @ q_i
    dq_i  += scale * ds @ k_j               dq accumulates in compute dtype

Extra memory: O(block_q * block_k * batch * nheads) for a tile plus
O(seqlen * headdim * batch * nheads) for the compute-dtype copies and
accumulators; never seqlen_q * seqlen_k.
"""

from __future__ import annotations

import numpy as np

from ._validate import compute_dtype

__all__ = ["forward", "backward", "BLOCK_Q", "BLOCK_K"]

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


def _merge_q(x, dtype):
    """(b, nheads_kv, group, s, d) -> (b, s, nheads, d) in ``dtype``."""
    b, hkv, g, s, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2, 4).reshape(b, s, hkv * g, d), dtype=dtype)


def _tile_mask(q_start, q_end, k_start, k_end, offset):
    """True where key j is hidden from query i: j > i + offset."""
    i = np.arange(q_start, q_end)[:, None]
    j = np.arange(k_start, k_end)[None, :]
    return j > i + offset


def forward(q, k, v, causal, scale, *, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Return ``(out, lse)``: out like q, lse (batch, nheads, seqlen_q) float32/64."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    cdt = compute_dtype(q.dtype)
    offset = seqlen_k - seqlen_q  # causal: key j visible to query i iff j <= i + offset
    neg_inf = cdt.type(-np.inf)

    qc = _split_q(q, nheads_kv, cdt)
    kc = _split_kv(k, cdt)
    vc = _split_kv(v, cdt)
    lead = qc.shape[:3]  # (batch, nheads_kv, group)

    out = np.empty(qc.shape, dtype=cdt)
    lse = np.empty(lead + (seqlen_q,), dtype=cdt)

    for q_start in range(0, seqlen_q, block_q):
        q_end = min(q_start + block_q, seqlen_q)
        q_i = qc[..., q_start:q_end, :]
        n_q = q_end - q_start

        m = np.full(lead + (n_q,), neg_inf, dtype=cdt)
        l = np.zeros(lead + (n_q,), dtype=cdt)
        acc = np.zeros(lead + (n_q, headdim), dtype=cdt)

        # Causal: the last row of this tile sees keys < q_end + offset; tiles
        # past that are entirely above the diagonal and skipped.
        k_stop = min(seqlen_k, q_end + offset) if causal else seqlen_k
        for k_start in range(0, max(k_stop, 0), block_k):
            k_end = min(k_start + block_k, seqlen_k)
            s = np.matmul(q_i, kc[..., k_start:k_end, :].swapaxes(-1, -2))
            s *= scale
            # Only tiles crossing the diagonal need a mask: the first row of
            # the tile sees keys <= q_start + offset.
            if causal and k_end - 1 > q_start + offset:
                s[..., _tile_mask(q_start, q_end, k_start, k_end, offset)] = neg_inf

            m_new = np.maximum(m, s.max(axis=-1))
            # A row that has seen only masked keys has m_new = -inf; subtract 0
            # instead so exp(-inf - (-inf)) never happens (p and alpha are 0).
            m_safe = np.where(m_new == neg_inf, cdt.type(0), m_new)
            p = np.exp(s - m_safe[..., None])
            alpha = np.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            acc *= alpha[..., None]
            acc += np.matmul(p, vc[..., k_start:k_end, :])
            m = m_new

        # Rows that saw no key: l == 0 -> out 0, lse -inf.
        seen = l > 0
        l_safe = np.where(seen, l, cdt.type(1))
        out[..., q_start:q_end, :] = acc / l_safe[..., None]
        lse[..., q_start:q_end] = np.where(seen, m + np.log(l_safe), neg_inf)

    return _merge_q(out, q.dtype), lse.reshape(batch, nheads, seqlen_q)


def backward(dout, q, k, v, out, lse, causal, scale, deterministic=False, *, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Return ``(dq, dk, dv)`` with q's, k's and v's shapes and dtypes.

    NumPy is deterministic whatever ``deterministic`` says.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    group = nheads // nheads_kv
    cdt = compute_dtype(q.dtype)
    offset = seqlen_k - seqlen_q
    neg_inf = cdt.type(-np.inf)

    qc = _split_q(q, nheads_kv, cdt)
    doc = _split_q(dout, nheads_kv, cdt)
    kc = _split_kv(k, cdt)
    vc = _split_kv(v, cdt)
    lead = qc.shape[:3]

    # delta = rowsum(dout * out), in compute dtype, once.
    delta = np.einsum("bsnd,bsnd->bns", dout.astype(cdt), out.astype(cdt))
    delta = np.ascontiguousarray(delta.reshape(batch, nheads_kv, group, seqlen_q))
    # Fully masked rows have lse = -inf; use +inf there so p = exp(s - inf) = 0.
    lse_c = lse.astype(cdt).reshape(lead + (seqlen_q,))
    lse_safe = np.where(lse_c == neg_inf, cdt.type(np.inf), lse_c)

    dq = np.zeros(qc.shape, dtype=cdt)
    dk = np.empty((batch, nheads_kv, seqlen_k, headdim), dtype=cdt)
    dv = np.empty((batch, nheads_kv, seqlen_k, headdim), dtype=cdt)

    for k_start in range(0, seqlen_k, block_k):
        k_end = min(k_start + block_k, seqlen_k)
        n_k = k_end - k_start
        k_j = kc[..., k_start:k_end, :]
        v_j = vc[..., k_start:k_end, :]
        dk_acc = np.zeros(lead + (n_k, headdim), dtype=cdt)
        dv_acc = np.zeros(lead + (n_k, headdim), dtype=cdt)

        # Causal: key k_start is first seen by query k_start - offset; query
        # tiles wholly before that are above the diagonal and skipped.
        first_q = max(0, k_start - offset) if causal else 0
        for q_start in range((first_q // block_q) * block_q, seqlen_q, block_q):
            q_end = min(q_start + block_q, seqlen_q)
            q_i = qc[..., q_start:q_end, :]
            do_i = doc[..., q_start:q_end, :]

            s = np.matmul(q_i, k_j.swapaxes(-1, -2))
            s *= scale
            if causal and k_end - 1 > q_start + offset:
                s[..., _tile_mask(q_start, q_end, k_start, k_end, offset)] = neg_inf
            p = np.exp(s - lse_safe[..., q_start:q_end, None])

            dv_acc += np.matmul(p.swapaxes(-1, -2), do_i)
            dp = np.matmul(do_i, v_j.swapaxes(-1, -2))
            ds = p * (dp - delta[..., q_start:q_end, None])
            dk_acc += scale * np.matmul(ds.swapaxes(-1, -2), q_i)
            dq[..., q_start:q_end, :] += scale * np.matmul(ds, k_j)

        # GQA: a kv head's gradient is the sum over the query heads reading it.
        dk[:, :, k_start:k_end] = dk_acc.sum(axis=2)
        dv[:, :, k_start:k_end] = dv_acc.sum(axis=2)

    dq = _merge_q(dq, q.dtype)
    dk = np.ascontiguousarray(dk.transpose(0, 2, 1, 3), dtype=k.dtype)
    dv = np.ascontiguousarray(dv.transpose(0, 2, 1, 3), dtype=v.dtype)
    return dq, dk, dv
