"""Argument checking shared by every public entry point; it builds the call's :class:`Spec`.

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

from ._spec import LAYOUTS, Spec

__all__ = [
    "MAX_HEADDIM",
    "SUPPORTED_DTYPES",
    "array_kind",
    "compute_dtype",
    "lse_dtype",
    "check_call",
    "check_backward_arrays",
    "check_flag",
    "check_return_dbias",
    "check_return_dsink",
    "check_seed",
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


#: array_kind by type: a call asks it of each of its arguments.
_ARRAY_KINDS = {np.ndarray: "numpy", type(None): None}


def array_kind(x):
    """'numpy', 'cupy', or None for anything that is not an array."""
    kind = _ARRAY_KINDS.get(type(x), False)
    if kind is False:
        t = type(x)
        mod = t.__module__ or ""
        kind = _ARRAY_KINDS[t] = ("numpy" if issubclass(t, np.ndarray) else
                                  "cupy" if mod == "cupy" or mod.startswith(("cupy.", "cupy_")) else None)
    return None if kind == "cupy" and not hasattr(x, "shape") else kind


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
        native = dt.newbyteorder("=")
        if not dt.isnative and native in SUPPORTED_DTYPES:
            _fail(TypeError, fn, f"{name}.dtype", "must be in the machine's byte order",
                  f"{dt.str} (byte-swapped {native.name})")
        _fail(TypeError, fn, f"{name}.dtype", f"must be {_DTYPE_NAMES}", _dtype_name(dt))


# Axis of each dimension in the two layouts, for shapes and messages.
_AXES = {"bshd": {"batch": 0, "seqlen": 1, "heads": 2, "headdim": 3},
         "bhsd": {"batch": 0, "heads": 1, "seqlen": 2, "headdim": 3}}
_LAYOUT_WORDS = {"bshd": "(batch, seqlen, nheads, headdim)", "bhsd": "(batch, nheads, seqlen, headdim)"}


def _check_rank(fn, name, x, layout):
    if x.ndim != 4:
        _fail(ValueError, fn, name, f"must have 4 dimensions {_LAYOUT_WORDS[layout]}",
              f"{x.ndim} dimensions with shape {tuple(x.shape)}")


def check_flag(fn, name, value):
    """Flags take bools (or NumPy bool scalars) and nothing else."""
    if not isinstance(value, (bool, np.bool_)):
        _fail(TypeError, fn, name, "must be a bool", repr(value))
    return bool(value)


def _real(fn, name, value, what, type_what=None):
    """A real scalar (Python, NumPy or ml_dtypes) as a Python float; ``type_what`` (default
    ``what``) is what a value of the wrong type is told."""
    if type(value) is float:  # the common case, without the ABC checks below
        return value
    type_what = type_what or what
    if isinstance(value, (bool, np.bool_)):
        _fail(TypeError, fn, name, f"must be {type_what}", repr(value))
    if not isinstance(value, numbers.Real):
        kind = getattr(getattr(value, "dtype", None), "kind", None)
        if kind not in ("f", "i", "u", "V") or getattr(value, "ndim", 1) != 0:
            _fail(TypeError, fn, name, f"must be {type_what}", repr(value))
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError):
        _fail(ValueError, fn, name, f"must be {what}", repr(value))


def _check_scale(fn, scale, headdim, dtype):
    """``scale`` as a Python float (default ``1/sqrt(headdim)``), finite in the compute dtype."""
    if scale is None:
        return 1.0 / math.sqrt(headdim)
    value = _real(fn, "scale", scale, "a finite positive real number", "a finite positive real number or None")
    if not math.isfinite(value) or value <= 0.0:
        _fail(ValueError, fn, "scale", "must be a finite positive real number", repr(scale))
    limit = float(np.finfo(compute_dtype(dtype)).max)
    if value > limit:
        _fail(ValueError, fn, "scale", f"must be finite in the compute dtype {compute_dtype(dtype).name} "
              f"(at most {limit:.4g}) for {_dtype_name(dtype)} inputs", repr(scale))
    return value


def _check_int(fn, name, value, what):
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        _fail(TypeError, fn, name, f"must be {what}", repr(value))
    return int(value)


def _check_window(fn, window_size, causal):
    """The effective (left, right): -1 = unbounded; causal means right = 0."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        _fail(TypeError, fn, "window_size", "must be a pair (left, right) of ints", repr(window_size))
    left, right = (_check_int(fn, f"window_size[{i}]", w, "an int >= -1") for i, w in enumerate(window_size))
    for i, w in enumerate((left, right)):
        if w < -1:
            _fail(ValueError, fn, f"window_size[{i}]", "must be >= -1 (-1 = unbounded)", w)
    return left, 0 if causal else right


def _check_softcap(fn, softcap):
    value = _real(fn, "softcap", softcap, "a finite real number >= 0")
    if not math.isfinite(value) or value < 0.0:
        _fail(ValueError, fn, "softcap", "must be a finite real number >= 0 (0 = off)", repr(softcap))
    return value


def _check_same_kind(fn, name, x, kind, q, mixed_ok):
    got = array_kind(x)
    if got is None:
        _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _type_name(x))
    if mixed_ok:
        return
    if got != kind:
        _fail(TypeError, fn, name, f"must be a {kind} array like q (NumPy and CuPy arrays cannot be mixed)",
              f"a {got} array")
    if kind == "cupy" and x.device.id != q.device.id:
        _fail(ValueError, fn, f"{name} and q", f"must be on the same device (q is on device {q.device.id})",
              f"{name} on device {x.device.id}")


def _broadcast(x, shape):
    """A stride-0 view of ``x`` broadcast to ``shape`` (NumPy or CuPy)."""
    if array_kind(x) == "cupy":
        import cupy

        return cupy.broadcast_to(x, shape)
    return np.broadcast_to(x, shape)


def _check_alibi(fn, slopes, batch, nheads, kind, q, mixed_ok):
    """float32 slopes of shape (nheads,) or (batch, nheads), seen as (batch, nheads)."""
    _check_same_kind(fn, "alibi_slopes", slopes, kind, q, mixed_ok)
    if np.dtype(slopes.dtype) != np.float32:
        _fail(TypeError, fn, "alibi_slopes.dtype", "must be float32", _dtype_name(slopes.dtype))
    if tuple(slopes.shape) not in ((nheads,), (batch, nheads)):
        _fail(ValueError, fn, "alibi_slopes.shape", f"must be (nheads,)=({nheads},) or (batch, nheads)="
              f"({batch}, {nheads})", tuple(slopes.shape))
    return _broadcast(slopes, (batch, nheads))


def _check_sink(fn, sink, nheads, kind, q, mixed_ok):
    """Sink logits, one per query head: an (nheads,) array in the accumulation dtype, which the kernels read where
    it is (a converted copy would not follow the caller's updates of it in place)."""
    _check_same_kind(fn, "learnable_sink", sink, kind, q, mixed_ok)
    want, dt = compute_dtype(q.dtype), np.dtype(sink.dtype)
    if dt != want:
        got = _dtype_name(dt) if dt.isnative else f"{dt.str} (byte-swapped {dt.newbyteorder('=').name})"
        _fail(TypeError, fn, "learnable_sink.dtype", f"must be {want.name} for {_dtype_name(q.dtype)} inputs (the "
              f"accumulation dtype)", got)
    if tuple(sink.shape) != (nheads,):
        _fail(ValueError, fn, "learnable_sink.shape", f"must be (nheads,)=({nheads},)", tuple(sink.shape))
    return sink


def _check_mask(fn, mask, target, kind, q, mixed_ok):
    """A bool or float mask broadcastable to (batch, nheads, seqlen_q, seqlen_k), seen as that shape."""
    _check_same_kind(fn, "attn_mask", mask, kind, q, mixed_ok)
    dt = np.dtype(mask.dtype)
    if dt != np.bool_ and dt not in SUPPORTED_DTYPES:
        _fail(TypeError, fn, "attn_mask.dtype", f"must be bool or {_DTYPE_NAMES}", _dtype_name(dt))
    shape = tuple(mask.shape)
    if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        _fail(ValueError, fn, "attn_mask.shape", f"must broadcast to (batch, nheads, seqlen_q, seqlen_k)={target}",
              shape)
    return _broadcast(mask.reshape((1,) * (4 - len(shape)) + shape), target)


def check_seed(fn, seed):
    """A dropout seed: an int in [0, 2**64)."""
    value = _check_int(fn, "dropout_seed", seed, "an int in [0, 2**64)")
    if not 0 <= value < 2**64:
        _fail(ValueError, fn, "dropout_seed", "must be an int in [0, 2**64)", value)
    return value


def _check_dropout(fn, dropout_p, dropout_seed, seed_required):
    p = _real(fn, "dropout_p", dropout_p, "a real number in [0, 1)")
    if not 0.0 <= p < 1.0:
        _fail(ValueError, fn, "dropout_p", "must be in [0, 1)", repr(dropout_p))
    if dropout_seed is None:
        if p > 0.0 and seed_required:
            _fail(ValueError, fn, "dropout_seed", "must be given (an int in [0, 2**64)) when dropout_p > 0", None)
        return p, None
    return p, check_seed(fn, dropout_seed)


def _check_offsets_array(fn, name, cu, kind, q, mixed_ok):
    """cu_seqlens' type, dtype and shape: int32, (batch + 1,). A NumPy array may go with CuPy q, k, v
    (offsets known on the host: no device read)."""
    if not (kind == "cupy" and array_kind(cu) == "numpy"):
        _check_same_kind(fn, name, cu, kind, q, mixed_ok)
    if np.dtype(cu.dtype) != np.int32:
        _fail(TypeError, fn, f"{name}.dtype", "must be int32", _dtype_name(cu.dtype))
    if cu.ndim != 1 or cu.shape[0] < 2:
        _fail(ValueError, fn, f"{name}.shape", "must be (batch + 1,) with batch >= 1", tuple(cu.shape))


def _host_offsets(cu_seqlens_q, cu_seqlens_k):
    """Both offsets as host int64 arrays; CuPy ones are read to the host together, in one device
    synchronisation."""
    on_device = [array_kind(cu) == "cupy" for cu in (cu_seqlens_q, cu_seqlens_k)]
    if all(on_device) and cu_seqlens_q.device.id == cu_seqlens_k.device.id:
        import cupy

        with cu_seqlens_q.device:
            both = cupy.concatenate((cu_seqlens_q, cu_seqlens_k)).get()
        return both[:cu_seqlens_q.shape[0]].astype(np.int64), both[cu_seqlens_q.shape[0]:].astype(np.int64)
    return tuple(np.asarray(cu.get() if kind else cu).astype(np.int64)
                 for cu, kind in zip((cu_seqlens_q, cu_seqlens_k), on_device))


def _check_offsets(fn, name, host):
    if host[0] != 0:
        _fail(ValueError, fn, f"{name}[0]", "must be 0", int(host[0]))
    steps = np.diff(host)
    if (steps < 0).any():
        at = int(np.argmax(steps < 0))
        _fail(ValueError, fn, name, "must be non-decreasing",
              f"{name}[{at + 1}]={int(host[at + 1])} < {name}[{at}]={int(host[at])}")


def offsets_stay_on_device(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Whether a packed call leaves its offsets unread: contiguous CuPy ones on one device, with both
    max_seqlen_* given (the longest lengths then come from the caller, as in flash-attn). Their contents are not
    checked: the kernels clamp them into the tensors (cuda_src/params.cuh, packed_start), and rows they leave
    out are not written."""
    return (max_seqlen_q is not None and max_seqlen_k is not None
            and _device_offsets(cu_seqlens_q, cu_seqlens_k) is not None
            and cu_seqlens_q.device.id == cu_seqlens_k.device.id)


def packed_signature(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(key, host offsets) of a packed call's offsets, for a check made once per key: their kinds, and the
    devices and addresses of CuPy ones (the kernels read them in place), their contents read to the host (one
    synchronisation for CuPy ones; not where they stay on the device, host offsets None) and the max_seqlen
    scalars. (None, None) where the offsets are not both int32 vectors: the check then says what they are."""
    offsets = (cu_seqlens_q, cu_seqlens_k)
    if any(array_kind(cu) is None or cu.ndim != 1 or np.dtype(cu.dtype) != np.int32 for cu in offsets):
        return None, None
    where = tuple((cu.device.id, cu.data.ptr) if array_kind(cu) == "cupy" else None for cu in offsets)
    longest = (_typed(max_seqlen_q), _typed(max_seqlen_k))
    if offsets_stay_on_device(*offsets, max_seqlen_q, max_seqlen_k):
        return (*where, *longest), None
    host = _host_offsets(*offsets)
    return (*where, *(h.tobytes() for h in host), *longest), host


def _check_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout, attn_mask, kind,
                  mixed_ok, host=None):
    """Shapes of a packed call: q (total_q, nheads, headdim), k and v (total_k, nheads_kv, headdim); `host`:
    the offsets already read (packed_signature). Returns (cu_q, cu_k, batch, seqlen_q, seqlen_k) with the
    longest lengths; offsets that stay on the device (offsets_stay_on_device) are not read (cu_q, cu_k None)
    and the longest lengths are max_seqlen_*, at most the totals."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        _fail(ValueError, fn, missing, "must be given with the other cu_seqlens", None)
    if layout != "bshd":
        _fail(ValueError, fn, "layout", "must be 'bshd' with cu_seqlens (packed (total, nheads, headdim) arrays)",
              repr(layout))
    if attn_mask is not None:
        _fail(ValueError, fn, "attn_mask", "must be None with cu_seqlens (a packed batch has no dense mask)",
              "an array")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            _fail(ValueError, fn, name, "must have 3 dimensions (total, nheads, headdim) with cu_seqlens",
                  f"{x.ndim} dimensions with shape {tuple(x.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_offsets_array(fn, name, cu, kind, q, mixed_ok)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        _fail(ValueError, fn, "cu_seqlens_k.shape", f"must equal cu_seqlens_q.shape={tuple(cu_seqlens_q.shape)}",
              tuple(cu_seqlens_k.shape))
    if v.shape[0] != k.shape[0]:
        _fail(ValueError, fn, "v.shape[0] (total_k)", f"must equal k.shape[0]={k.shape[0]}", v.shape[0])
    batch = cu_seqlens_q.shape[0] - 1
    given = {}
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is not None:
            given[name] = _check_int(fn, name, value, "an int")
            if given[name] < 0:
                _fail(ValueError, fn, name, "must be at least 0", given[name])
    if host is None and not mixed_ok and offsets_stay_on_device(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                max_seqlen_k):
        return None, None, batch, min(given["max_seqlen_q"], q.shape[0]), min(given["max_seqlen_k"], k.shape[0])
    cu_q, cu_k = host or _host_offsets(cu_seqlens_q, cu_seqlens_k)
    _check_offsets(fn, "cu_seqlens_q", cu_q)
    _check_offsets(fn, "cu_seqlens_k", cu_k)
    for name, cu, x, axis_name in (("cu_seqlens_q", cu_q, q, "q"), ("cu_seqlens_k", cu_k, k, "k")):
        if cu[-1] != x.shape[0]:
            _fail(ValueError, fn, f"{name}[-1]", f"must equal {axis_name}.shape[0] (total)={x.shape[0]}",
                  int(cu[-1]))
    longest = []
    for name, cu in (("max_seqlen_q", cu_q), ("max_seqlen_k", cu_k)):
        actual = int(np.diff(cu).max())
        if name in given and given[name] < actual:
            _fail(ValueError, fn, name, f"must be at least the longest sequence, {actual}", given[name])
        longest.append(actual)
    return cu_q, cu_k, batch, longest[0], longest[1]


def check_call(fn, q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               attn_mask=None, dropout_p=0.0, dropout_seed=None, learnable_sink=None, layout="bshd",
               cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, mixed_ok=False,
               seed_required=True, host_offsets=None):
    """Validate q, k, v and every variant keyword; return the call's :class:`Spec`.

    ``mixed_ok`` (for the reference) allows NumPy and CuPy arrays together. ``seed_required=False``
    (for ``attention_vjp``, which draws one) allows dropout without a seed. ``host_offsets``: the packed
    offsets as packed_signature read them.
    """
    if not isinstance(layout, str) or layout not in LAYOUTS:
        _fail(ValueError, fn, "layout", f"must be one of {', '.join(map(repr, LAYOUTS))}", repr(layout))
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if mixed_ok:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if array_kind(x) is None:
                _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _type_name(x))
        kind = array_kind(q)
    else:
        kind = _check_arrays(fn, [("q", q), ("k", k), ("v", v)])
    cu_q = cu_k = None
    if varlen:
        cu_q, cu_k, batch, seqlen_q, seqlen_k = _check_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                              max_seqlen_k, layout, attn_mask, kind, mixed_ok,
                                                              host_offsets)
        # a packed batch is checked below as one (1, total, heads, headdim) batch, then takes its lengths
        q, k, v = q[None], k[None], v[None]
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rank(fn, name, x, layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_dtype(fn, name, x)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            _fail(TypeError, fn, f"{name}.dtype", f"must equal q.dtype={_dtype_name(q.dtype)}", _dtype_name(x.dtype))

    ax = _AXES[layout]
    b_, s_, h_, d_ = ax["batch"], ax["seqlen"], ax["heads"], ax["headdim"]
    if varlen:  # messages name the packed arrays' axes; lengths may be 0
        b_, s_, h_, d_ = None, 0, 1, 2
        q_, k_, v_ = q[0], k[0], v[0]
    else:
        batch, seqlen_q = q.shape[b_], q.shape[s_]
        q_, k_, v_ = q, k, v
    nheads, headdim = q_.shape[h_], q_.shape[d_]
    for what, size, axis in (("batch", batch, b_), ("seqlen_q", seqlen_q, s_), ("nheads", nheads, h_)):
        if size == 0 and not (varlen and what == "seqlen_q"):
            _fail(ValueError, fn, f"q.shape[{axis}] ({what})", "must be at least 1", 0)
    if headdim == 0 or headdim > MAX_HEADDIM:
        _fail(ValueError, fn, f"q.shape[{d_}] (headdim)", f"must be between 1 and {MAX_HEADDIM}", headdim)
    for name, x in (("k", k_), ("v", v_)):
        if not varlen and x.shape[b_] != batch:
            _fail(ValueError, fn, f"{name}.shape[{b_}] (batch)", f"must equal q.shape[{b_}]={batch}", x.shape[b_])
        if x.shape[d_] != headdim:
            _fail(ValueError, fn, f"{name}.shape[{d_}] (headdim)", f"must equal q.shape[{d_}]={headdim}", x.shape[d_])
    nheads_kv = k_.shape[h_]
    if not varlen:
        seqlen_k = k.shape[s_]
        if v.shape[s_] != seqlen_k:
            _fail(ValueError, fn, f"v.shape[{s_}] (seqlen_k)", f"must equal k.shape[{s_}]={seqlen_k}", v.shape[s_])
        if seqlen_k == 0:
            _fail(ValueError, fn, f"k.shape[{s_}] (seqlen_k)", "must be at least 1", 0)
    if v_.shape[h_] != nheads_kv:
        _fail(ValueError, fn, f"v.shape[{h_}] (nheads_kv)", f"must equal k.shape[{h_}]={nheads_kv}", v_.shape[h_])
    if nheads_kv == 0:
        _fail(ValueError, fn, f"k.shape[{h_}] (nheads_kv)", "must be at least 1", 0)
    if nheads % nheads_kv != 0:
        _fail(ValueError, fn, f"k.shape[{h_}] (nheads_kv)", f"must divide q.shape[{h_}] (nheads)={nheads}", nheads_kv)

    causal = check_flag(fn, "causal", causal)
    scale = _check_scale(fn, scale, headdim, q.dtype)
    window = _check_window(fn, window_size, causal)
    softcap = _check_softcap(fn, softcap)
    slopes = None if alibi_slopes is None else _check_alibi(fn, alibi_slopes, batch, nheads, kind, q, mixed_ok)
    mask, mask_shape = None, None
    if attn_mask is not None:
        mask = _check_mask(fn, attn_mask, (batch, nheads, seqlen_q, seqlen_k), kind, q, mixed_ok)
        mask_shape = tuple(attn_mask.shape)
    dropout_p, dropout_seed = _check_dropout(fn, dropout_p, dropout_seed, seed_required)
    sink = None if learnable_sink is None else _check_sink(fn, learnable_sink, nheads, kind, q, mixed_ok)
    return Spec(kind=kind, dtype=np.dtype(q.dtype), batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads,
                nheads_kv=nheads_kv, headdim=headdim, scale=scale, causal=causal, window=window, softcap=softcap,
                alibi_slopes=slopes, attn_mask=mask, mask_shape=mask_shape, dropout_p=dropout_p,
                dropout_seed=dropout_seed, learnable_sink=sink, layout=layout, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                device_offsets=_device_offsets(cu_seqlens_q, cu_seqlens_k),
                total_q=q_.shape[0] if varlen else 0, total_k=k_.shape[0] if varlen else 0)


def _device_offsets(cu_seqlens_q, cu_seqlens_k):
    """The caller's offsets when both are contiguous CuPy arrays, else None."""
    pair = (cu_seqlens_q, cu_seqlens_k)
    if all(array_kind(cu) == "cupy" and cu.strides == (4,) for cu in pair):
        return pair
    return None


def _caller_shape(spec):
    """q's shape in the caller's layout (packed: (total_q, nheads, headdim))."""
    b, s, h, d = spec.batch, spec.seqlen_q, spec.nheads, spec.headdim
    if spec.varlen:
        return (spec.total_q, h, d)
    return (b, h, s, d) if spec.layout == "bhsd" else (b, s, h, d)


def lse_shape(spec):
    """(batch, nheads, seqlen_q); packed: (nheads, total_q)."""
    if spec.varlen:
        return (spec.nheads, spec.total_q)
    return (spec.batch, spec.nheads, spec.seqlen_q)


def _check_like_q(fn, name, x, spec, q_dtype, strict):
    if array_kind(x) is None:
        _fail(TypeError, fn, name, "must be a numpy.ndarray or cupy.ndarray", _type_name(x))
    want = _caller_shape(spec)
    if tuple(x.shape) != want:
        _fail(ValueError, fn, f"{name}.shape", f"must equal q.shape={want}", tuple(x.shape))
    if strict and x.dtype != q_dtype:
        _fail(TypeError, fn, f"{name}.dtype", f"must equal q.dtype={_dtype_name(q_dtype)}", _dtype_name(x.dtype))


def check_backward_arrays(fn, dout, out, lse, spec, *, strict=True, return_dbias=False, q=None):
    """Validate what a backward pass takes besides q, k, v and the keywords.

    ``strict=False`` (the float64 reference) checks ``out`` and ``lse`` for shape only and allows
    NumPy and CuPy arrays to be mixed. ``q`` (strict mode) is the kind and device every array must
    share.
    """
    if strict:
        for name, x in (("dout", dout), ("out", out), ("lse", lse)):
            _check_same_kind(fn, name, x, spec.kind, q, False)
    _check_like_q(fn, "dout", dout, spec, spec.dtype, True)
    _check_like_q(fn, "out", out, spec, spec.dtype, strict)
    if array_kind(lse) is None:
        _fail(TypeError, fn, "lse", "must be a numpy.ndarray or cupy.ndarray", _type_name(lse))
    want = lse_shape(spec)
    if tuple(lse.shape) != want:
        _fail(ValueError, fn, "lse.shape", f"must be {'(nheads, total_q)' if spec.varlen else '(batch, nheads, seqlen_q)'}"
              f"={want}", tuple(lse.shape))
    if strict and lse.dtype != lse_dtype(spec.dtype):
        _fail(TypeError, fn, "lse.dtype", f"must be {lse_dtype(spec.dtype).name} for {_dtype_name(spec.dtype)} inputs",
              _dtype_name(lse.dtype))
    return check_return_dbias(fn, return_dbias, spec)


def check_return_dsink(fn, return_dsink, spec):
    return_dsink = check_flag(fn, "return_dsink", return_dsink)
    if return_dsink and spec.learnable_sink is None:
        _fail(ValueError, fn, "return_dsink", "needs learnable_sink (the sink whose gradient it returns)",
              "learnable_sink=None")
    return return_dsink


def check_return_dbias(fn, return_dbias, spec):
    return_dbias = check_flag(fn, "return_dbias", return_dbias)
    if return_dbias and spec.mask_kind != "bias":
        _fail(ValueError, fn, "return_dbias", "needs a float attn_mask (the bias whose gradient it returns)",
              f"attn_mask={'None' if spec.attn_mask is None else 'a bool mask'}")
    return return_dbias


# ---- checks already made: a loop of calls alike (training steps, decoding) is checked once

#: Verdicts by what they depend on (signature); bounded, cleared when full.
_VERDICTS = {}
_VERDICTS_MAX = 128


def signature(arrays, scalars):
    """What a check's verdict depends on when it reads no array's values: each array's kind, device, shape,
    strides and dtype (None for an absent one) and each scalar with its type (a tuple's or list's items with
    theirs, so that 1 never stands for True nor -1.0 for -1). None, so that the check runs, when an array is
    not a CuPy array; a key holding a scalar that cannot be hashed is not kept (memoized runs the check)."""
    described = []
    for x in arrays:
        if x is None:
            described.append(None)
        elif array_kind(x) != "cupy":
            return None
        else:
            described.append((x.device.id, x.shape, x.strides, x.dtype))
    return (*described, *map(_typed, scalars))


_PLAIN = frozenset((bool, int, float, str, type(None)))


def _typed(x):
    t = type(x)
    if t in _PLAIN:
        return t, x
    return (t, tuple(map(_typed, x))) if isinstance(x, (tuple, list)) else (t, x)


def memoized(key, check):
    """check()'s verdict, computed once per signature (every time for a None key). A check that raises
    leaves nothing behind."""
    if key is None:
        return check()
    try:
        verdict = _VERDICTS.get(key)
    except TypeError:  # a scalar that cannot be hashed
        return check()
    if verdict is None:
        verdict = check()
        if len(_VERDICTS) >= _VERDICTS_MAX:
            _VERDICTS.clear()
        _VERDICTS[key] = verdict
    return verdict

