"""Argument checking shared by every public entry point.

Everything here runs before any work is done, so a bad call writes nothing.
Every message comes from :func:`_fail`, so they all read alike::

    attention: k.shape[3] (headdim) must equal q.shape[3]=64, got 32

This module never imports cupy: CuPy arrays are recognised by the module
their type comes from.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import ml_dtypes

__all__ = [
    "MAX_HEADDIM",
    "SUPPORTED_DTYPES",
    "array_kind",
    "compute_dtype",
    "lse_dtype",
    "check_forward",
    "check_backward",
    "check_dout",
]

#: Largest head dimension the kernels handle.
MAX_HEADDIM = 256

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: Input dtypes every backend accepts.
SUPPORTED_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))

_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def _fail(exc, fn, what, expected, got):
    """Raise ``exc`` with the one message format used everywhere."""
    raise exc(f"{fn}: {what} {expected}, got {got}")


def compute_dtype(dtype):
    """float64 inputs compute in float64; everything else in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def lse_dtype(dtype):
    """dtype of the log-sum-exp returned for inputs of ``dtype``."""
    return compute_dtype(dtype)


def array_kind(x):
    """'numpy', 'cupy', or None for anything that is not an array."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__ or ""
    if (mod == "cupy" or mod.startswith("cupy.") or mod.startswith("cupy_")) and hasattr(x, "shape"):
        return "cupy"
    return None


def _type_name(x):
    t = type(x)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def _dtype_name(dtype):
    return np.dtype(dtype).name


def _check_arrays(fn, named):
    """Check that every value is an array, all of one kind, on one device.

    ``named`` is a list of ``(name, value)``. Returns 'numpy' or 'cupy'.
    """
    kinds = {}
    for name, x in named:
        kind = array_kind(x)
        if kind is None:
            _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _type_name(x))
        kinds[name] = kind
    first_name, first_kind = named[0][0], kinds[named[0][0]]
    for name, _ in named[1:]:
        if kinds[name] != first_kind:
            _fail(
                TypeError,
                fn,
                name,
                f"must be a {first_kind} array like {first_name} (NumPy and CuPy arrays cannot be mixed)",
                f"a {kinds[name]} array",
            )
    if first_kind == "cupy":
        first_dev = named[0][1].device.id
        for name, x in named[1:]:
            dev = x.device.id
            if dev != first_dev:
                _fail(
                    ValueError,
                    fn,
                    f"{name} and {first_name}",
                    f"must be on the same device ({first_name} is on device {first_dev})",
                    f"{name} on device {dev}",
                )
    return first_kind


def _check_dtype(fn, name, x):
    dt = np.dtype(x.dtype)
    if dt not in SUPPORTED_DTYPES:
        _fail(TypeError, fn, f"{name}.dtype", f"must be {_DTYPE_NAMES}", _dtype_name(dt))


def _check_rank(fn, name, x):
    if x.ndim != 4:
        _fail(
            ValueError,
            fn,
            f"{name}",
            "must have 4 dimensions (batch, seqlen, nheads, headdim)",
            f"{x.ndim} dimensions with shape {tuple(x.shape)}",
        )


def check_scale(fn, scale, headdim):
    """Return ``scale`` as a Python float (default ``1/sqrt(headdim)``)."""
    if scale is None:
        return 1.0 / math.sqrt(headdim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        _fail(TypeError, fn, "scale", "must be a finite positive real number or None", repr(scale))
    try:
        value = float(scale)
    except (OverflowError, TypeError, ValueError):
        _fail(ValueError, fn, "scale", "must be a finite positive real number", repr(scale))
    if not math.isfinite(value) or value <= 0.0:
        _fail(ValueError, fn, "scale", "must be a finite positive real number", repr(scale))
    return value


def check_forward(fn, q, k, v, scale, mixed_ok=False):
    """Validate the inputs of a forward pass.

    Returns ``(kind, scale)`` with ``kind`` in {'numpy', 'cupy'} (the kind of
    ``q``) and ``scale`` a Python float. ``mixed_ok`` (for the reference)
    allows NumPy and CuPy arrays together.
    """
    if mixed_ok:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if array_kind(x) is None:
                _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _type_name(x))
        kind = array_kind(q)
    else:
        kind = _check_arrays(fn, [("q", q), ("k", k), ("v", v)])
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rank(fn, name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_dtype(fn, name, x)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            _fail(TypeError, fn, f"{name}.dtype", f"must equal q.dtype={_dtype_name(q.dtype)}", _dtype_name(x.dtype))

    batch, seqlen_q, nheads, headdim = q.shape
    if batch == 0:
        _fail(ValueError, fn, "q.shape[0] (batch)", "must be at least 1", 0)
    if seqlen_q == 0:
        _fail(ValueError, fn, "q.shape[1] (seqlen_q)", "must be at least 1", 0)
    if nheads == 0:
        _fail(ValueError, fn, "q.shape[2] (nheads)", "must be at least 1", 0)
    if headdim == 0 or headdim > MAX_HEADDIM:
        _fail(ValueError, fn, "q.shape[3] (headdim)", f"must be between 1 and {MAX_HEADDIM}", headdim)

    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != batch:
            _fail(ValueError, fn, f"{name}.shape[0] (batch)", f"must equal q.shape[0]={batch}", x.shape[0])
        if x.shape[3] != headdim:
            _fail(ValueError, fn, f"{name}.shape[3] (headdim)", f"must equal q.shape[3]={headdim}", x.shape[3])
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    if v.shape[1] != seqlen_k:
        _fail(ValueError, fn, "v.shape[1] (seqlen_k)", f"must equal k.shape[1]={seqlen_k}", v.shape[1])
    if v.shape[2] != nheads_kv:
        _fail(ValueError, fn, "v.shape[2] (nheads_kv)", f"must equal k.shape[2]={nheads_kv}", v.shape[2])
    if seqlen_k == 0:
        _fail(ValueError, fn, "k.shape[1] (seqlen_k)", "must be at least 1", 0)
    if nheads_kv == 0:
        _fail(ValueError, fn, "k.shape[2] (nheads_kv)", "must be at least 1", 0)
    if nheads % nheads_kv != 0:
        _fail(
            ValueError,
            fn,
            "k.shape[2] (nheads_kv)",
            f"must divide q.shape[2] (nheads)={nheads}",
            nheads_kv,
        )
    return kind, check_scale(fn, scale, headdim)


def check_dout(fn, dout, q, name="dout"):
    """``dout`` (or ``out``) must be an array with q's shape and dtype."""
    if array_kind(dout) is None:
        _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _type_name(dout))
    if tuple(dout.shape) != tuple(q.shape):
        _fail(ValueError, fn, f"{name}.shape", f"must equal q.shape={tuple(q.shape)}", tuple(dout.shape))
    if dout.dtype != q.dtype:
        _fail(TypeError, fn, f"{name}.dtype", f"must equal q.dtype={_dtype_name(q.dtype)}", _dtype_name(dout.dtype))


def check_lse(fn, lse, q, strict_dtype=True):
    if array_kind(lse) is None:
        _fail(TypeError, fn, "lse", "must be a numpy.ndarray or cupy.ndarray", _type_name(lse))
    batch, seqlen_q, nheads, _ = q.shape
    want = (batch, nheads, seqlen_q)
    if tuple(lse.shape) != want:
        _fail(ValueError, fn, "lse.shape", f"must be (batch, nheads, seqlen_q)={want}", tuple(lse.shape))
    if strict_dtype:
        dt = lse_dtype(q.dtype)
        if lse.dtype != dt:
            _fail(
                TypeError,
                fn,
                "lse.dtype",
                f"must be {dt.name} for {_dtype_name(q.dtype)} inputs",
                _dtype_name(lse.dtype),
            )


def check_backward(fn, dout, q, k, v, out, lse, scale, strict=True):
    """Validate the arguments of a backward pass; returns ``(kind, scale)``.

    ``strict=False`` (used by the float64 reference) only checks that ``out``
    and ``lse`` have the right shapes, not their dtypes, and allows NumPy and
    CuPy arrays to be mixed.
    """
    if strict:
        _check_arrays(fn, [("q", q), ("k", k), ("v", v), ("dout", dout), ("out", out), ("lse", lse)])
    kind, scale = check_forward(fn, q, k, v, scale, mixed_ok=not strict)
    check_dout(fn, dout, q, "dout")
    if strict:
        check_dout(fn, out, q, "out")
    else:
        if array_kind(out) is None:
            _fail(TypeError, fn, "out", "must be a numpy.ndarray or cupy.ndarray", _type_name(out))
        if tuple(out.shape) != tuple(q.shape):
            _fail(ValueError, fn, "out.shape", f"must equal q.shape={tuple(q.shape)}", tuple(out.shape))
    check_lse(fn, lse, q, strict_dtype=strict)
    return kind, scale
