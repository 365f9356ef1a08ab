"""Public entry points: validate into one :class:`~cupyflash._spec.Spec`, then dispatch on the array type.

All-NumPy arguments run :mod:`cupyflash._numpy_backend`; all-CuPy arguments run
:mod:`cupyflash._cuda_backend`, imported only when first needed so that ``import cupyflash`` works
without cupy or a GPU. Both backends expose::

    forward(q, k, v, spec) -> (out, lse)
    backward(dout, q, k, v, out, lse, spec, deterministic, want_dbias) -> (dq, dk, dv, dbias or None)

and receive q, k, v, dout and out as (batch, seqlen, heads, headdim) views whatever the caller's
layout; they allocate outputs in the caller's layout (``Spec.empty``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

from . import _validate, _varlen

__all__ = ["attention", "attention_backward", "attention_vjp"]

Array = Any  # numpy.ndarray or cupy.ndarray
Window = Tuple[int, int]


def _backend(kind):
    """The backend module of an array kind, imported at its first call."""
    backend = _BACKENDS.get(kind)
    if backend is None:
        backend = _BACKENDS[kind] = _import_backend(kind)
    return backend


_BACKENDS = {}


def _import_backend(kind):
    if kind == "numpy":
        from . import _numpy_backend

        return _numpy_backend
    try:
        from . import _cuda_backend
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == "cupy" or exc.name.startswith("cupy.") or exc.name.startswith("cupy_backends")):
            raise ImportError(
                "cupyflash: CuPy arrays need cupy; from the cupyflash checkout run "
                f"pip install \".[cuda12]\" (or \".[cuda13]\") ({exc})"
            ) from exc
        raise
    return _cuda_backend


def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The keywords of a packed variable-length batch, for the validation."""
    return dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k)


def _signature(arrays, scalars, alibi_slopes, attn_mask, learnable_sink, packed):
    """(key of a call's check, host offsets): the check of a training loop's calls runs once. ALiBi's slopes
    and a learnable sink, which the kernels read where they lie, join the key by their addresses too: the
    Spec keeps them. A packed call's key holds its offsets' contents, read here once for both, or only their
    addresses where they stay on the device (_validate.packed_signature). (None, None) for a call with an
    attn_mask or a key that cannot be made."""
    if attn_mask is not None:
        return None, None
    by_address = (alibi_slopes, learnable_sink)
    key = _validate.signature(arrays + by_address, scalars)  # None unless every array is a CuPy one
    if key is not None:
        key += tuple(None if x is None else x.data.ptr for x in by_address)
    if key is None or all(x is None for x in packed.values()):
        return key, None
    offsets, host = _validate.packed_signature(**packed)
    return (None, None) if offsets is None else (key + offsets, host)


def _forward(spec, q, k, v):
    if spec.varlen:
        return _varlen.forward(_backend(spec.kind), q, k, v, spec)
    out, lse = _backend(spec.kind).forward(spec.swap_layout(q), spec.swap_layout(k), spec.swap_layout(v), spec)
    return spec.swap_layout(out), lse


def _backward(spec, dout, q, k, v, out, lse, deterministic, return_dbias, return_dsink):
    backend = _backend(spec.kind)
    if spec.varlen:  # return_dbias needs a mask, which a packed batch cannot have
        grads = _varlen.backward(backend, dout, q, k, v, out, lse, spec, deterministic)
    else:
        dq, dk, dv, dbias = backend.backward(*(spec.swap_layout(x) for x in (dout, q, k, v, out)), lse, spec,
                                             deterministic, return_dbias)
        grads = tuple(spec.swap_layout(x) for x in (dq, dk, dv)) + ((dbias,) if return_dbias else ())
    if return_dsink:
        dout, out = (x if spec.varlen else spec.swap_layout(x) for x in (dout, out))
        grads += (backend.sink_gradient(dout, out, lse, spec),)
    return grads


def attention(q: Array, k: Array, v: Array, *, causal: bool = False, scale: Optional[float] = None,
              window_size: Window = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Array] = None,
              attn_mask: Optional[Array] = None, dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
              learnable_sink: Optional[Array] = None, return_lse: bool = False, layout: str = "bshd",
              cu_seqlens_q: Optional[Array] = None,
              cu_seqlens_k: Optional[Array] = None, max_seqlen_q: Optional[int] = None,
              max_seqlen_k: Optional[int] = None) -> Union[Array, Tuple[Array, Array]]:
    """Exact attention ``Dropout(Softmax(Mask(scale · q kᵀ))) v``, tile by tile.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim) with
    ``nheads % nheads_kv == 0`` (query head h reads kv head ``h // (nheads // nheads_kv)``);
    ``layout="bhsd"`` takes (batch, nheads, seqlen, headdim) instead, as torch SDPA does.
    ``scale`` defaults to ``1/sqrt(headdim)``. ``causal=True`` hides key j from query i when
    ``j > i + seqlen_k - seqlen_q`` (bottom-right aligned). ``window_size=(left, right)`` lets
    query i see keys ``i + seqlen_k - seqlen_q - left … + right`` (-1: unbounded). ``softcap > 0``
    caps scores at ``softcap · tanh(score / softcap)``. ``alibi_slopes`` (float32, (nheads,) or
    (batch, nheads)) subtracts ``slope · |i + seqlen_k - seqlen_q - j|``. ``attn_mask``: bool
    (True = takes part) or float (added to the score), broadcastable to (batch, nheads, seqlen_q,
    seqlen_k). ``dropout_p > 0`` drops probabilities with a counter-based generator seeded by
    ``dropout_seed`` (required). ``learnable_sink`` ((nheads,), float32; float64 for float64 inputs) gives each
    query head a sink logit whose term ``exp(sink)`` joins every row's softmax sum and adds nothing to out
    (gpt-oss' attention sinks; -inf: none). Exact rules: docs/variants.md.

    Packed variable-length batches (flash-attn's varlen): with ``cu_seqlens_q`` and
    ``cu_seqlens_k`` (int32, (batch + 1,), from 0), q is (total_q, nheads, headdim), k and v are
    (total_k, nheads_kv, headdim), sequence b owning rows ``cu_seqlens[b]:cu_seqlens[b + 1]``, and
    lse is (nheads, total_q); every keyword applies per sequence (no ``attn_mask``). CuPy offsets
    with ``max_seqlen_q`` and ``max_seqlen_k`` given stay on the device: not read, so not checked
    (offsets that break their rules leave rows unwritten, never read or write past the arrays).
    Otherwise the offsets are read and checked on the host: CuPy ones at the cost of a device
    synchronisation, NumPy ones (allowed with CuPy q, k, v) at none.

    Returns ``out`` (q's shape, layout and dtype), or ``(out, lse)`` with ``return_lse=True``; lse
    is (batch, nheads, seqlen_q), float32 (float64 for float64 inputs), the natural-log
    log-sum-exp of each row's scores before dropout (and its sink). A row that sees no key gives out 0, lse
    -inf (its sink's logit with a sink).
    """
    packed = _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    key, host = _signature((q, k, v), ("attention", causal, scale, window_size, softcap, dropout_p, dropout_seed,
                                       layout), alibi_slopes, attn_mask, learnable_sink, packed)
    spec = _validate.memoized(key, lambda: _validate.check_call(
        "attention", q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        learnable_sink=learnable_sink, layout=layout, host_offsets=host, **packed))
    return_lse = _validate.check_flag("attention", "return_lse", return_lse)
    out, lse = _forward(spec, q, k, v)
    return (out, lse) if return_lse else out


def attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *, causal: bool = False,
                       scale: Optional[float] = None, window_size: Window = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: Optional[Array] = None, attn_mask: Optional[Array] = None,
                       dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                       learnable_sink: Optional[Array] = None, deterministic: bool = False,
                       return_dbias: bool = False, return_dsink: bool = False, layout: str = "bshd",
                       cu_seqlens_q: Optional[Array] = None,
                       cu_seqlens_k: Optional[Array] = None, max_seqlen_q: Optional[int] = None,
                       max_seqlen_k: Optional[int] = None) -> Tuple[Array, ...]:
    """Gradients ``(dq, dk, dv)`` of ``sum(dout * attention(q, k, v, ...))``.

    ``out`` and ``lse`` are what :func:`attention` returned (with ``return_lse=True``) for the same
    arrays and keywords (the same ``dropout_seed`` replays the same dropout). P is recomputed from
    lse; ``delta = rowsum(dout * out)``. Each gradient has its input's shape, layout and dtype.
    ``return_dbias=True`` (with a float ``attn_mask``) also returns ``dbias``, the gradient of the
    mask, in its shape and dtype (summed over its broadcast dimensions); ``return_dsink=True`` (with a
    ``learnable_sink``) then ``dsink``, the sink's gradient, in its shape and dtype.
    """
    fn = "attention_backward"
    packed = _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    def check():
        spec = _validate.check_call(fn, q, k, v, causal=causal, scale=scale, window_size=window_size,
                                    softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask,
                                    dropout_p=dropout_p, dropout_seed=dropout_seed, learnable_sink=learnable_sink,
                                    layout=layout, host_offsets=host, **packed)
        dbias = _validate.check_backward_arrays(fn, dout, out, lse, spec, return_dbias=return_dbias, q=q)
        dsink = _validate.check_return_dsink(fn, return_dsink, spec)
        return spec, dbias, dsink, _validate.check_flag(fn, "deterministic", deterministic)

    key, host = _signature((q, k, v, dout, out, lse), (fn, causal, scale, window_size, softcap, dropout_p,
                                                       dropout_seed, layout, deterministic, return_dbias, return_dsink),
                           alibi_slopes, attn_mask, learnable_sink, packed)
    spec, return_dbias, return_dsink, deterministic = _validate.memoized(key, check)
    return _backward(spec, dout, q, k, v, out, lse, deterministic, return_dbias, return_dsink)


def attention_vjp(q: Array, k: Array, v: Array, *, causal: bool = False, scale: Optional[float] = None,
                  window_size: Window = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Array] = None,
                  attn_mask: Optional[Array] = None, dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                  learnable_sink: Optional[Array] = None, deterministic: bool = False, return_dbias: bool = False,
                  return_dsink: bool = False, layout: str = "bshd", cu_seqlens_q: Optional[Array] = None,
                  cu_seqlens_k: Optional[Array] = None, max_seqlen_q: Optional[int] = None,
                  max_seqlen_k: Optional[int] = None) -> Tuple[Array, Callable[[Array], Tuple[Array, ...]]]:
    """Run the forward pass; return ``(out, vjp)`` with ``vjp(dout) -> (dq, dk, dv[, dbias][, dsink])``.

    With ``dropout_p > 0`` and no ``dropout_seed``, one is drawn and kept for ``vjp``.
    """
    fn = "attention_vjp"
    spec = _validate.check_call(fn, q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p,
                                dropout_seed=dropout_seed, learnable_sink=learnable_sink, layout=layout,
                                seed_required=False, **_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    deterministic = _validate.check_flag(fn, "deterministic", deterministic)
    return_dbias = _validate.check_return_dbias(fn, return_dbias, spec)
    return_dsink = _validate.check_return_dsink(fn, return_dsink, spec)
    if spec.dropout and spec.dropout_seed is None:
        seed = int(np.random.default_rng().integers(0, 2**64, dtype=np.uint64))
        spec = dataclasses.replace(spec, dropout_seed=seed)
    out, lse = _forward(spec, q, k, v)

    def vjp(dout):
        _validate.check_backward_arrays(f"{fn}.vjp", dout, out, lse, spec, return_dbias=return_dbias, q=q)
        return _backward(spec, dout, q, k, v, out, lse, deterministic, return_dbias, return_dsink)

    return out, vjp
