"""Merging attentions of the same queries over disjoint key sets, by their log-sum-exps.

If ``(out_i, lse_i)`` is attention over key set ``K_i`` (as ``attention(..., return_lse=True)``
returns it), attention over their union is::

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

The rule behind split-KV decoding, ring attention and any chunking a user does by hand. It runs
on NumPy or CuPy arrays alike (array operations, no kernel of its own).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

from . import _validate
from ._spec import LAYOUTS

__all__ = ["merge_attention"]

Array = Any


def _xp(kind):
    if kind == "cupy":
        import cupy

        return cupy
    return np


def _check(fn, outs, lses, layout):
    if not isinstance(layout, str) or layout not in LAYOUTS:
        _validate._fail(ValueError, fn, "layout", f"must be one of {', '.join(map(repr, LAYOUTS))}", repr(layout))
    if isinstance(outs, (str, bytes)) or not isinstance(outs, Sequence) or len(outs) == 0:
        _validate._fail(TypeError, fn, "outs", "must be a non-empty sequence of arrays", _validate._type_name(outs))
    if isinstance(lses, (str, bytes)) or not isinstance(lses, Sequence) or len(lses) != len(outs):
        _validate._fail(ValueError, fn, "lses", f"must be a sequence of {len(outs)} arrays, one per out",
                        _validate._type_name(lses) if not isinstance(lses, Sequence) else f"{len(lses)} arrays")
    named = [(f"outs[{i}]", x) for i, x in enumerate(outs)] + [(f"lses[{i}]", x) for i, x in enumerate(lses)]
    kind = _validate._check_arrays(fn, named)
    first = outs[0]
    if first.ndim != 4:
        _validate._fail(ValueError, fn, "outs[0]", f"must have 4 dimensions {_validate._LAYOUT_WORDS[layout]}",
                        f"{first.ndim} dimensions with shape {tuple(first.shape)}")
    _validate._check_dtype(fn, "outs[0]", first)
    for i, x in enumerate(outs[1:], 1):
        if tuple(x.shape) != tuple(first.shape):
            _validate._fail(ValueError, fn, f"outs[{i}].shape", f"must equal outs[0].shape={tuple(first.shape)}",
                            tuple(x.shape))
        if x.dtype != first.dtype:
            _validate._fail(TypeError, fn, f"outs[{i}].dtype", f"must equal outs[0].dtype={first.dtype.name}",
                            np.dtype(x.dtype).name)
    ax = _validate._AXES[layout]
    want = (first.shape[ax["batch"]], first.shape[ax["heads"]], first.shape[ax["seqlen"]])
    lse_dtype = _validate.lse_dtype(first.dtype)
    for i, x in enumerate(lses):
        if tuple(x.shape) != want:
            _validate._fail(ValueError, fn, f"lses[{i}].shape", f"must be (batch, nheads, seqlen_q)={want}",
                            tuple(x.shape))
        if x.dtype != lse_dtype:
            _validate._fail(TypeError, fn, f"lses[{i}].dtype",
                            f"must be {lse_dtype.name} for {np.dtype(first.dtype).name} outputs", np.dtype(x.dtype).name)
    return kind


def merge_attention(outs: Sequence[Array], lses: Sequence[Array], *, layout: str = "bshd") -> Tuple[Array, Array]:
    """Combine attentions of the same queries over disjoint key sets into attention over their union.

    ``outs[i]`` (batch, seqlen_q, nheads, headdim) — or (batch, nheads, seqlen_q, headdim) with
    ``layout="bhsd"`` — and ``lses[i]`` (batch, nheads, seqlen_q) are what ``attention(...,
    return_lse=True)`` returned for the i-th key set. Returns ``(out, lse)`` in the same shapes
    and dtypes, computed in the compute dtype (float32, float64 for float64). A row that no part
    saw (every lse -inf) gives out 0 and lse -inf; a NaN lse makes its row NaN.
    """
    fn = "merge_attention"
    kind = _check(fn, outs, lses, layout)
    xp = _xp(kind)
    acc = _validate.compute_dtype(outs[0].dtype)
    lse_parts = xp.stack([x.astype(acc, copy=False) for x in lses])  # (parts, batch, nheads, seqlen_q)
    m = lse_parts.max(axis=0)
    m_safe = xp.where(xp.isfinite(m), m, acc.type(0))  # all -inf (or +inf) rows: no m - m = NaN
    weights = xp.exp(lse_parts - m_safe)
    total = weights.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # total 0: no part saw the row (lse -inf, out 0); NaN and inf carry through the arithmetic
        lse = xp.where(total == 0, m, m_safe + xp.log(total))
        weights = xp.where(total == 0, acc.type(0), weights / total)
    # weights (parts, batch, nheads, seqlen_q) -> the outs' axes
    w = weights.transpose(0, 1, 3, 2) if layout == "bshd" else weights
    out = xp.zeros(outs[0].shape, acc)
    for i, part in enumerate(outs):
        out += w[i][..., None] * part.astype(acc, copy=False)
    return out.astype(outs[0].dtype), lse.astype(lses[0].dtype)
