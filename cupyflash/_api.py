"""Public entry points: validate, then dispatch on the array type.

All-NumPy arguments run :mod:`cupyflash._numpy_backend`; all-CuPy arguments
run :mod:`cupyflash._cuda_backend`, imported only when first needed so that
``import cupyflash`` works without cupy or a GPU. Both backends expose::

    forward(q, k, v, causal, scale) -> (out, lse)
    backward(dout, q, k, v, out, lse, causal, scale, deterministic) -> (dq, dk, dv)

and receive validated arguments with ``scale`` already a Python float.
"""

from __future__ import annotations

from . import _validate

__all__ = ["attention", "attention_backward", "attention_vjp"]


def _backend(kind):
    if kind == "numpy":
        from . import _numpy_backend

        return _numpy_backend
    try:
        from . import _cuda_backend
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == "cupy" or exc.name.startswith("cupy.") or exc.name.startswith("cupy_backends")):
            raise ImportError(
                "cupyflash: CuPy arrays need cupy; install cupyflash[cuda12] or cupyflash[cuda13] "
                f"({exc})"
            ) from exc
        raise
    return _cuda_backend


def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Exact softmax attention, ``softmax(scale * q k^T) v``, tile by tile.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k,
    nheads_kv, headdim) with ``nheads % nheads_kv == 0`` (query head h reads
    kv head ``h // (nheads // nheads_kv)``). ``scale`` defaults to
    ``1/sqrt(headdim)``. ``causal=True`` hides key j from query i when
    ``j > i + seqlen_k - seqlen_q`` (bottom-right aligned).

    Returns ``out`` (q's shape and dtype), or ``(out, lse)`` with
    ``return_lse=True``; lse is (batch, nheads, seqlen_q), float32 (float64
    for float64 inputs), the natural-log logsumexp of each row of scaled
    scores. A row that sees no key gives out 0 and lse -inf.
    """
    kind, scale = _validate.check_forward("attention", q, k, v, scale)
    out, lse = _backend(kind).forward(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, deterministic=False):
    """Gradients ``(dq, dk, dv)`` of ``sum(dout * attention(q, k, v))``.

    ``out`` and ``lse`` are what :func:`attention` returned (with
    ``return_lse=True``) for the same q, k, v, causal and scale. P is
    recomputed from lse; ``delta = rowsum(dout * out)``. Each gradient has
    its input's shape and dtype.
    """
    kind, scale = _validate.check_backward("attention_backward", dout, q, k, v, out, lse, scale)
    return _backend(kind).backward(dout, q, k, v, out, lse, bool(causal), scale, bool(deterministic))


def attention_vjp(q, k, v, *, causal=False, scale=None, deterministic=False):
    """Run the forward pass; return ``(out, vjp)`` with ``vjp(dout) -> (dq, dk, dv)``."""
    kind, scale = _validate.check_forward("attention_vjp", q, k, v, scale)
    causal, deterministic = bool(causal), bool(deterministic)
    backend = _backend(kind)
    out, lse = backend.forward(q, k, v, causal, scale)

    def vjp(dout):
        _validate.check_backward("attention_vjp.vjp", dout, q, k, v, out, lse, scale)
        return backend.backward(dout, q, k, v, out, lse, causal, scale, deterministic)

    return out, vjp
