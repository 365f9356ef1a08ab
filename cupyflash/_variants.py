"""The variants of the score, tile by tile: the NumPy twin of ``cuda_src/mask.cuh``.

The rules are docs/variants.md. Everything here is a function of the call's
:class:`~cupyflash._spec.Spec` and of tile coordinates, never of q, k or v. A tile is the query
rows ``[q_start, q_end)`` by the keys ``[k_start, k_end)``; tile arrays have the backend's head
layout ``(batch, nheads_kv, group, tq, tk)`` (query head ``h = h_kv * group + g``) or broadcast
to it.

* :func:`key_range`, :func:`query_range`: the band of keys a query tile needs, and of queries a
  key tile needs; tiles outside the causal/window band are skipped, not masked.
* :func:`tile_is_interior`: no element of the tile is hidden by the window, so a tile without a
  bool mask needs no element-wise visibility.
* :func:`visible`, :func:`scores`, :func:`keep`: per element, the visibility, the transformed score
  with the softcap derivative, and the dropout keep bits.
* :func:`kernel_variant`: what the CUDA kernels take for a call, the ``Feature`` bits of its
  ``Variant`` type and the ``VariantParams`` members it sets; the CUDA backend turns it into the
  kernel's template argument and parameters without knowing any variant.
"""

from __future__ import annotations

import numpy as np

from . import _csource, _philox

__all__ = ["key_range", "query_range", "tile_is_interior", "visible", "scores", "keep", "kernel_variant"]

#: The Feature bits of ``cuda_src/mask.cuh``, {name: bit}, read from its ``enum Feature``.
FEATURES = _csource.enum_values(_csource.source("mask.cuh"), "Feature")
#: The features that may hide a key from a row that multiplies its data (``Variant::hides_keys``).
HIDES_KEYS = FEATURES["WINDOW"] | FEATURES["BOOL_MASK"] | FEATURES["BIAS"]


def _by_group(spec, x):
    """(batch, nheads, ...) -> (batch, nheads_kv, group, ...)."""
    return x.reshape(x.shape[0], spec.nheads_kv, spec.group, *x.shape[2:])


def key_range(spec, q_start, q_end):
    """``(k_start, k_end)``: the keys that some query of ``[q_start, q_end)`` may see (empty when
    ``k_start == k_end``). Query i sees keys ``i + offset - left ... i + offset + right``."""
    left, right = spec.window
    k_start = max(0, q_start + spec.offset - left) if left >= 0 else 0
    k_end = min(spec.seqlen_k, q_end + spec.offset + right) if right >= 0 else spec.seqlen_k
    return k_start, max(k_start, k_end)


def query_range(spec, k_start, k_end):
    """``(q_start, q_end)``: the queries that may see some key of ``[k_start, k_end)``."""
    left, right = spec.window
    q_start = max(0, k_start - spec.offset - right) if right >= 0 else 0
    q_end = min(spec.seqlen_q, k_end - spec.offset + left) if left >= 0 else spec.seqlen_q
    return q_start, max(q_start, q_end)


def tile_is_interior(spec, q_start, q_end, k_start, k_end):
    """True when the window hides no element of the tile (a bool mask or a bias still applies)."""
    left, right = spec.window
    # The right edge binds hardest on the tile's first row and last key, the left edge on its last
    # row and first key.
    return ((right < 0 or k_end - 1 <= q_start + spec.offset + right)
            and (left < 0 or k_start >= q_end - 1 + spec.offset - left))


def visible(spec, q_start, q_end, k_start, k_end):
    """Bool, broadcastable to (batch, nheads_kv, group, tq, tk): query i sees key j through the
    window (causal folded in) and a bool ``attn_mask``."""
    left, right = spec.window
    i = np.arange(q_start, q_end)[:, None] + spec.offset  # the key aligned with query i
    j = np.arange(k_start, k_end)
    vis = np.ones((q_end - q_start, k_end - k_start), dtype=bool)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    if spec.mask_kind == "bool":
        vis = vis & _by_group(spec, spec.attn_mask[:, :, q_start:q_end, k_start:k_end])
    return vis


def scores(spec, s, q_start, k_start):
    """``(x, dcap)`` for the tile of ``s = scale * q k^T`` (batch, nheads_kv, group, tq, tk) whose
    first element is (q_start, k_start).

    x is the score in natural units: softcap, then ALiBi, then the bias, in s's dtype, and -inf
    where the pair is invisible or the bias is -inf (masked whatever the data: inf + -inf would be
    NaN). ``dcap = 1 - tanh(s / softcap)^2`` is d(x)/d(s) for the backward, None without softcap: taken as
    ``4 e / (1 + e)^2`` with ``e = exp(-2 |s| / softcap)``, whose rounding stays relative where ``1 - t * t``
    would cancel (t near ±1, where it would keep only t's rounding), and 0 where t rounds to ±1 (there the
    capped score no longer moves with s).
    """
    dt = s.dtype
    q_end, k_end = q_start + s.shape[-2], k_start + s.shape[-1]
    x, dcap = s, None
    if spec.softcap:
        u = s / dt.type(spec.softcap)
        t, e = np.tanh(u), np.exp(-2 * np.abs(u))
        x, dcap = dt.type(spec.softcap) * t, np.where(np.abs(t) == 1, dt.type(0), 4 * e / (1 + e) ** 2)
    if spec.alibi_slopes is not None:
        slopes = _by_group(spec, spec.alibi_slopes).astype(dt)[..., None, None]
        distance = np.abs(np.arange(q_start, q_end)[:, None] + spec.offset - np.arange(k_start, k_end))
        x = x - slopes * distance.astype(dt)
    if spec.mask_kind == "bias":
        bias = _by_group(spec, spec.attn_mask[:, :, q_start:q_end, k_start:k_end]).astype(dt)
        x = np.where(bias == -np.inf, bias, x + bias)
    if spec.mask_kind == "bool" or not tile_is_interior(spec, q_start, q_end, k_start, k_end):
        x = np.where(visible(spec, q_start, q_end, k_start, k_end), x, dt.type(-np.inf))
    return x, dcap


def keep(spec, q_start, q_end, k_start, k_end):
    """Dropout keep bits of the tile, bool (batch, nheads_kv, group, tq, tk): the same for any
    tiling, a pure function of (seed, b, h, i, j)."""
    b = spec.batch_offset + np.arange(spec.batch)[:, None, None, None]
    h = np.arange(spec.nheads)[:, None, None]
    i = np.arange(q_start, q_end)[:, None]
    j = np.arange(k_start, k_end)
    return _by_group(spec, _philox.keep(spec.dropout_seed, spec.dropout_p, b, h, i, j))


def kernel_variant(spec):
    """``(features, mask_dtype, fields)`` of the call's kernel: the FEATURES bits compiled into its
    ``Variant`` (``cuda_src/mask.cuh``), the dtype name of its mask ('bool' without one), and the
    ``VariantParams`` members it sets, {name: value}. An array value stands for its device pointer and,
    in the members ``name_sb, name_sh, name_sq, name_sk`` (as many as it has axes), its element strides;
    absent members are 0."""
    left, right = spec.window
    on = []
    fields = {"window_left": left, "window_right": right}
    if spec.has_window:
        on.append("WINDOW")
    if left >= 0:  # a left bound: its compare, which causal tiles are spared
        on.append("WINDOW_LEFT")
    if spec.softcap > 0:
        on.append("SOFTCAP")
        fields["softcap"] = spec.softcap
    if spec.alibi_slopes is not None:
        on.append("ALIBI")
        fields["alibi"] = spec.alibi_slopes
    mask_dtype = "bool"
    if spec.attn_mask is not None:
        on.append("BOOL_MASK" if spec.mask_kind == "bool" else "BIAS")
        mask_dtype = np.dtype(spec.attn_mask.dtype).name
        fields["mask"] = spec.attn_mask
    if spec.dropout:
        on.append("DROPOUT")
        fields["dropout_scale"] = 1.0 / (1.0 - spec.dropout_p)
        fields["dropout_threshold"] = _philox.threshold(spec.dropout_p)
        fields["seed_lo"], fields["seed_hi"] = _philox.split_seed(spec.dropout_seed)
        fields["batch_offset"] = spec.batch_offset
    if spec.varlen:
        on.append("PACKED")
    return sum(FEATURES[name] for name in on), mask_dtype, fields
