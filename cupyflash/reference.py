"""Float64 reference attention on the full score matrix.

The ground truth every test compares to: plain NumPy/SciPy, the whole
``(batch, nheads, seqlen_q, seqlen_k)`` score matrix in float64. Accepts
NumPy or CuPy inputs (CuPy arrays are copied to the host with ``.get()``)
and always returns float64 NumPy arrays.

Fully masked query rows (causal with ``seqlen_q > seqlen_k``) give out 0,
lse -inf and zero gradients, without NaN. NaN or inf inside the data
propagate as the arithmetic makes them.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

from . import _validate

__all__ = ["attention", "attention_backward", "causal_mask"]


def _host64(x):
    if _validate.array_kind(x) == "cupy":
        x = x.get()
    return np.asarray(x).astype(np.float64)


def causal_mask(seqlen_q, seqlen_k):
    """Boolean (seqlen_q, seqlen_k), True where key j is hidden from query i.

    Bottom-right aligned: hidden when ``j > i + seqlen_k - seqlen_q``.
    """
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return j > i + (seqlen_k - seqlen_q)


def _expand_kv(x, nheads):
    """(b, s, nheads_kv, d) -> (b, s, nheads, d): query head h reads kv head h // group."""
    group = nheads // x.shape[2]
    return np.repeat(x, group, axis=2)


def _probabilities(q, k, causal, scale):
    """Scaled scores' softmax P, lse and the fully-masked-row flags, float64."""
    nheads = q.shape[2]
    kr = _expand_kv(k, nheads)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr, optimize=True) * scale
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal:
        mask = causal_mask(seqlen_q, seqlen_k)
        s = np.where(mask, -np.inf, s)
        dead = mask.all(axis=1)  # rows that see no key
    else:
        dead = np.zeros(seqlen_q, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = logsumexp(s, axis=-1)
        p = softmax(s, axis=-1)
    if dead.any():
        p[:, :, dead, :] = 0.0
        lse[:, :, dead] = -np.inf
    return p, lse


def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """softmax(scale * q k^T [+ causal mask]) v in float64 on the full matrix.

    Same signature as :func:`cupyflash.attention`. Returns float64 NumPy
    ``out`` (batch, seqlen_q, nheads, headdim) and, with ``return_lse``,
    ``lse`` (batch, nheads, seqlen_q).
    """
    _, scale = _validate.check_forward("reference.attention", q, k, v, scale, mixed_ok=True)
    q, k, v = _host64(q), _host64(k), _host64(v)
    p, lse = _probabilities(q, k, bool(causal), scale)
    vr = _expand_kv(v, q.shape[2])
    out = np.einsum("bhqk,bkhd->bqhd", p, vr, optimize=True)
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, deterministic=False):
    """Exact float64 gradients (dq, dk, dv) of ``sum(dout * attention(q, k, v))``.

    Same signature as :func:`cupyflash.attention_backward`. ``out`` and
    ``lse`` are checked for shape only and otherwise ignored: P is recomputed
    in float64 from q and k, so a low-precision ``out`` cannot leak into the
    ground truth. ``deterministic`` is accepted and ignored.
    """
    _, scale = _validate.check_backward(
        "reference.attention_backward", dout, q, k, v, out, lse, scale, strict=False
    )
    q, k, v, dout = _host64(q), _host64(k), _host64(v), _host64(dout)
    nheads, nheads_kv = q.shape[2], k.shape[2]
    group = nheads // nheads_kv
    p, _ = _probabilities(q, k, bool(causal), scale)
    kr, vr = _expand_kv(k, nheads), _expand_kv(v, nheads)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr, optimize=True)
    delta = np.sum(p * dp, axis=-1, keepdims=True)  # = rowsum(dout * out)
    ds = p * (dp - delta)
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, kr, optimize=True)
    dk_rep = scale * np.einsum("bhqk,bqhd->bkhd", ds, q, optimize=True)
    dv_rep = np.einsum("bhqk,bqhd->bkhd", p, dout, optimize=True)
    b, sk, _, d = k.shape
    dk = dk_rep.reshape(b, sk, nheads_kv, group, d).sum(axis=3)
    dv = dv_rep.reshape(b, sk, nheads_kv, group, d).sum(axis=3)
    return dq, dk, dv
