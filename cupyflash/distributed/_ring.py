"""Ring attention: exact attention over a sequence sharded across ranks, forward and backward.

The global sequence has ``world * seqlen_local`` rows; each rank holds ``seqlen_local`` of them of
q, k and v. ``zigzag`` cuts it into ``2 * world`` chunks and gives rank r chunks r and
``2*world-1-r`` (an early and a late one, so causal work is the same on every rank);
``contiguous`` gives rank r the r-th slice.

Forward, ``world`` steps: at step s rank r holds the K/V block of rank ``(r - s) % world``, starts
passing it to rank r+1 (receiving the next from rank r-1), and attends its queries to the block,
one dense backend call per pair of a query chunk and a key chunk: hidden pairs are skipped, fully
visible ones run unmasked, a pair of a chunk with itself runs with the call's own causal/window,
and any other partly visible pair gets an explicit bool mask from the global positions. The
partial results merge into float32 (float64) accumulators by their log-sum-exps.

Backward: with this rank's shard of the global out and lse, the backend's backward of one (query
rows, key block) piece gives exactly that piece's share of dq, dk and dv. dq accumulates here;
each block's dk/dv accumulator follows the block around the ring, one rank behind it, and comes
home after ``world`` hops with every rank's share.

A learnable sink joins each row once, after the blocks' merge (a part whose output is zero); its
gradient is every rank's share of ``-sum exp(sink - lse) rowsum(dout * out)``, passed around the ring
and summed in rank order, so that every rank gets the same bits.

Before any data moves the ranks pass a small descriptor of their call around the ring, so a
mismatch (or an invalid argument on one rank) raises on every rank instead of leaving the others
waiting.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

from .. import _api, _validate
from .._validate import SUPPORTED_DTYPES, _fail, array_kind, compute_dtype

__all__ = ["LAYOUTS", "ring_attention", "ring_attention_backward", "ring_attention_vjp", "zigzag_shard",
           "zigzag_unshard"]

Array = Any  # numpy.ndarray or cupy.ndarray
Window = Tuple[int, int]

#: How the global sequence is laid out over the ranks.
LAYOUTS = ("zigzag", "contiguous")

_HIDDEN, _FULL, _DIAGONAL, _PARTIAL = range(4)


def _xp(kind):
    if kind == "cupy":
        import cupy

        return cupy
    return np


# ---- layout


def _segments(layout, rank, world, seqlen_local):
    """The global rows ``(start, stop)`` of each contiguous run of rank's shard, in local order."""
    if layout == "contiguous":
        return ((rank * seqlen_local, (rank + 1) * seqlen_local),)
    chunk = seqlen_local // 2
    late = 2 * world - 1 - rank
    return ((rank * chunk, (rank + 1) * chunk), (late * chunk, (late + 1) * chunk))


def _local_slices(segments):
    """Where each segment lies in the shard."""
    slices, start = [], 0
    for a, b in segments:
        slices.append(slice(start, start + b - a))
        start += b - a
    return slices


def _along(axis, start, stop):
    return (slice(None),) * axis + (slice(start, stop),)


def _check_axis(fn, x, axis):
    axis = _validate._check_int(fn, "axis", axis, "an int")
    if not -x.ndim <= axis < x.ndim:
        _fail(ValueError, fn, "axis", f"must be in [-{x.ndim}, {x.ndim}) for an array of {x.ndim} dimensions", axis)
    return axis % x.ndim


def zigzag_shard(x: Array, rank: int, world: int, axis: int = 1) -> Array:
    """Rank ``rank``'s zigzag shard of the global array ``x``: of ``2 * world`` equal chunks along
    ``axis``, chunk ``rank`` followed by chunk ``2*world-1-rank`` (a new array). ``axis=1`` fits q,
    k, v and out (batch, seqlen, heads, headdim); ``axis=2`` (or -1) fits lse (batch, nheads, seqlen)."""
    fn = "zigzag_shard"
    if array_kind(x) is None:
        _fail(TypeError, fn, "x", "must be a numpy.ndarray or cupy.ndarray", _validate._type_name(x))
    world = _validate._check_int(fn, "world", world, "an int >= 1")
    if world < 1:
        _fail(ValueError, fn, "world", "must be >= 1", world)
    rank = _validate._check_int(fn, "rank", rank, f"an int in [0, world={world})")
    if not 0 <= rank < world:
        _fail(ValueError, fn, "rank", f"must be in [0, world={world})", rank)
    axis = _check_axis(fn, x, axis)
    length = x.shape[axis]
    if length % (2 * world):
        _fail(ValueError, fn, f"x.shape[{axis}]", f"must be a multiple of 2 * world = {2 * world}", length)
    chunk = length // (2 * world)
    late = 2 * world - 1 - rank
    parts = [x[_along(axis, rank * chunk, (rank + 1) * chunk)], x[_along(axis, late * chunk, (late + 1) * chunk)]]
    return _xp(array_kind(x)).concatenate(parts, axis=axis)


def zigzag_unshard(shards, axis: int = 1) -> Array:
    """The global array from every rank's zigzag shard (``shards[r]`` is rank r's), the inverse of
    :func:`zigzag_shard`."""
    fn = "zigzag_unshard"
    if isinstance(shards, (str, bytes)) or not isinstance(shards, (list, tuple)) or not shards:
        _fail(TypeError, fn, "shards", "must be a non-empty list of arrays, one per rank", _validate._type_name(shards))
    kind = _validate._check_arrays(fn, [(f"shards[{r}]", x) for r, x in enumerate(shards)])
    axis = _check_axis(fn, shards[0], axis)
    for r, x in enumerate(shards[1:], 1):
        if tuple(x.shape) != tuple(shards[0].shape):
            _fail(ValueError, fn, f"shards[{r}].shape", f"must equal shards[0].shape={tuple(shards[0].shape)}",
                  tuple(x.shape))
    length = shards[0].shape[axis]
    if length % 2:
        _fail(ValueError, fn, f"shards[0].shape[{axis}]", "must be even (two chunks per rank)", length)
    chunk = length // 2
    early = [x[_along(axis, 0, chunk)] for x in shards]
    late = [x[_along(axis, chunk, length)] for x in reversed(shards)]
    return _xp(kind).concatenate(early + late, axis=axis)


# ---- the pieces of one step


def _visibility(q_rows, k_rows, window):
    """How global query rows [qa, qb) see global keys [ka, kb): query i sees key j when
    ``i - left <= j <= i + right`` (-1: unbounded)."""
    (qa, qb), (ka, kb) = q_rows, k_rows
    left, right = window
    if (right >= 0 and ka > qb - 1 + right) or (left >= 0 and kb - 1 < qa - left):
        return _HIDDEN
    if (right < 0 or kb - 1 <= qa + right) and (left < 0 or ka >= qb - 1 - left):
        return _FULL
    return _DIAGONAL if q_rows == k_rows else _PARTIAL


def _pair_spec(base, how, q_rows, k_rows, xp):
    """The dense Spec of one (query chunk, key chunk) pair that some query sees."""
    nq, nk = q_rows[1] - q_rows[0], k_rows[1] - k_rows[0]
    if how == _FULL:
        return dataclasses.replace(base, seqlen_q=nq, seqlen_k=nk, causal=False, window=(-1, -1))
    if how == _DIAGONAL:  # a chunk with itself: local positions are global ones shifted alike
        return dataclasses.replace(base, seqlen_q=nq, seqlen_k=nk)
    i = xp.arange(*q_rows)[:, None]
    j = xp.arange(*k_rows)[None, :]
    left, right = base.window
    seen = xp.ones((nq, nk), dtype=bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    mask = xp.broadcast_to(seen, (base.batch, base.nheads, nq, nk))
    return dataclasses.replace(base, seqlen_q=nq, seqlen_k=nk, causal=False, window=(-1, -1), attn_mask=mask,
                               mask_shape=(nq, nk))


def _calls(base, q_rows, k_rows, xp):
    """The backend calls of one step, ``(query slice, key slice, Spec)``, one per pair of this
    rank's query segments ``q_rows`` and the held block's key segments ``k_rows`` (global rows)
    that some query sees. Pairs are not merged into larger calls: the backward holds one call's
    gradients at a time, and a smaller call holds less."""
    for qs, q_seg in zip(_local_slices(q_rows), q_rows):
        for ks, k_seg in zip(_local_slices(k_rows), k_rows):
            how = _visibility(q_seg, k_seg, base.window)
            if how != _HIDDEN:
                yield qs, ks, _pair_spec(base, how, q_seg, k_seg, xp)


# ---- communication


class _Arrived:
    """A transfer that a communicator without ``start_sendrecv`` finished at once."""

    def __init__(self, arrays):
        self._arrays = arrays

    def wait(self):
        return self._arrays


class _CopiedBack:
    """An exchange through ``sendrecv``: the received arrays are copied into the sent ones."""

    def __init__(self, arrays, transfer):
        self._arrays, self._transfer = arrays, transfer

    def wait(self):
        for x, received in zip(self._arrays, self._transfer.wait()):
            x[...] = received
        return []


def _start(comm, arrays):
    """Start passing ``arrays`` to the next rank and receiving the previous rank's."""
    dst, src = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    start = getattr(comm, "start_sendrecv", None)
    if start is not None:
        return start(list(arrays), dst, src)
    return _Arrived(comm.sendrecv(list(arrays), dst, src))


def _start_exchange(comm, arrays):
    """Start passing ``arrays`` to the next rank and overwriting them with the previous rank's."""
    start = getattr(comm, "start_exchange", None)
    if start is not None:
        return start(list(arrays), (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size)
    return _CopiedBack(arrays, _start(comm, arrays))


# ---- accumulation in the compute dtype, in place
#
# On CuPy each is one elementwise kernel, so no widened temporary of a piece exists: the ring's
# memory per token bounds the longest sequence it runs. CuPy bfloat16 is read by its bits (the high
# half of a float32, exactly), which asks no bfloat16 arithmetic of CuPy.

_WIDEN = {"bits": ("uint16", "__uint_as_float((unsigned int)part << 16)"), "cast": ("T", "(C)part")}


@functools.lru_cache(maxsize=None)
def _cupy_kernel(what, how):
    import cupy

    part_type, part = _WIDEN[how]
    if what == "accumulate":
        return cupy.ElementwiseKernel(f"{part_type} part", "C acc", f"acc += {part}",
                                      f"cupyflash_ring_accumulate_{how}")
    return cupy.ElementwiseKernel(f"C weight, C part_weight, {part_type} part", "C out",
                                  f"out = out * weight + part_weight * {part}", f"cupyflash_ring_merge_{how}")


def _kernel_input(part, xp):
    if part.dtype == _validate.BFLOAT16:
        return "bits", part.view(xp.uint16)
    return "cast", part


def _accumulate(acc, part, xp):
    """``acc += part``: ``acc`` a view of an accumulator in the compute dtype, ``part`` of the
    inputs' dtype."""
    if xp is np:
        acc += part.astype(acc.dtype, copy=False)
        return
    how, part = _kernel_input(part, xp)
    _cupy_kernel("accumulate", how)(part, acc)


def _merge_into(out, lse, part_out, part_lse, xp):
    """``(out, lse)`` (views of the accumulators) becomes the attention over the union of its keys
    and the part's, as :func:`cupyflash.merge_attention` merges (a row no part saw: 0 and -inf)."""
    cdt = out.dtype
    m = xp.maximum(lse, part_lse)
    m_safe = xp.where(xp.isfinite(m), m, cdt.type(0))  # all -inf rows: no -inf - (-inf)
    weight, part_weight = xp.exp(lse - m_safe), xp.exp(part_lse.astype(cdt) - m_safe)
    total = weight + part_weight
    with np.errstate(divide="ignore", invalid="ignore"):
        lse[...] = xp.where(total == 0, m, m_safe + xp.log(total))
        # (batch, nheads, rows) weights -> the (batch, rows, nheads, headdim) outputs
        weight, part_weight = (xp.where(total == 0, cdt.type(0), w / total).transpose(0, 2, 1)[..., None]
                               for w in (weight, part_weight))
    if xp is np:
        out *= weight
        out += part_weight * part_out.astype(cdt, copy=False)
        return
    how, part_out = _kernel_input(part_out, xp)
    _cupy_kernel("merge", how)(weight, part_weight, part_out, out)


# ---- the schedule


def _forward(comm, q, k, v, base, layout):
    backend, xp = _api._backend(base.kind), _xp(base.kind)
    rank, world, n = comm.rank, comm.size, base.seqlen_q
    cdt = compute_dtype(base.dtype)
    q_rows = _segments(layout, rank, world, n)
    out = xp.zeros(q.shape, cdt)
    lse = xp.full((base.batch, base.nheads, n), -np.inf, cdt)
    block = [k, v]
    blocks = dataclasses.replace(base, learnable_sink=None)  # the sink joins once, after the merge
    for step in range(world):
        incoming = _start(comm, block) if step < world - 1 else None
        k_rows = _segments(layout, (rank - step) % world, world, n)
        for qs, ks, spec in _calls(blocks, q_rows, k_rows, xp):
            part_out, part_lse = backend.forward(q[:, qs], block[0][:, ks], block[1][:, ks], spec)
            _merge_into(out[:, qs], lse[..., qs], part_out, part_lse, xp)
        if incoming is not None:
            block = incoming.wait()
    if base.learnable_sink is not None:  # a part whose output is zero and whose lse is the sink
        _merge_into(out, lse, xp.broadcast_to(xp.zeros((), cdt), out.shape),
                    xp.broadcast_to(base.learnable_sink[None, :, None], lse.shape), xp)
    return out.astype(q.dtype), lse


def _backward(comm, dout, q, k, v, out, lse, base, layout, want_dsink=False):
    backend, xp = _api._backend(base.kind), _xp(base.kind)
    rank, world, n = comm.rank, comm.size, base.seqlen_q
    cdt = compute_dtype(base.dtype)
    q_rows = _segments(layout, rank, world, n)
    dq = xp.zeros(q.shape, cdt)
    # The accumulators of the held block's dk and dv: this rank's own block's at step 0; each later
    # one arrives in their place from the rank that held the block the step before.
    dk, dv = xp.zeros(k.shape, cdt), xp.zeros(v.shape, cdt)
    block, hop = [k, v], None
    for step in range(world):
        incoming = _start(comm, block) if step < world - 1 else None
        k_rows = _segments(layout, (rank - step) % world, world, n)
        for qs, ks, spec in _calls(base, q_rows, k_rows, xp):
            part_dq, part_dk, part_dv, _ = backend.backward(
                dout[:, qs], q[:, qs], block[0][:, ks], block[1][:, ks], out[:, qs],
                xp.ascontiguousarray(lse[..., qs]), spec, False, False)
            _accumulate(dq[:, qs], part_dq, xp)
            if hop is not None:  # the held block's accumulators arrive, under the first call's work
                hop.wait()
                hop = None
            _accumulate(dk[:, ks], part_dk, xp)
            _accumulate(dv[:, ks], part_dv, xp)
            del part_dq, part_dk, part_dv  # before the next call allocates its own
        if hop is not None:  # no query of this rank sees the block
            hop.wait()
        hop = _start_exchange(comm, (dk, dv))
        if incoming is not None:
            block = incoming.wait()
    hop.wait()  # after world hops: this rank's own block, with every rank's share
    del block  # and each accumulator goes as soon as its result is cast
    dq = dq.astype(q.dtype)
    dk = dk.astype(k.dtype)
    grads = dq, dk, dv.astype(v.dtype)
    if not want_dsink:
        return grads
    shares = _around(comm, backend.sink_gradient(dout, out, lse, base))
    dsink = shares[0].copy()
    for r in range(1, world):  # in rank order: the same bits on every rank
        dsink += shares[r]
    return (*grads, dsink)


# ---- validation: on this rank, then across the ring


def _check_comm(fn, comm):
    if comm is None or not callable(getattr(comm, "sendrecv", None)):
        _fail(TypeError, fn, "comm", "must be a communicator with rank, size and sendrecv (such as LocalRing(world)"
              ".comms[rank] or an NcclComm)", _validate._type_name(comm))
    size, rank = getattr(comm, "size", None), getattr(comm, "rank", None)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        _fail(ValueError, fn, "comm.size", "must be an int >= 1", repr(size))
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        _fail(ValueError, fn, "comm.rank", f"must be an int in [0, comm.size={size})", repr(rank))
    return int(rank), int(size)


def _check_local(fn, q, k, v, causal, scale, window_size, softcap, learnable_sink, layout, grads, flags):
    """This rank's Spec; raises what :func:`cupyflash.attention` would, and on the ring's own rules."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        _fail(ValueError, fn, "layout", f"must be one of {', '.join(map(repr, LAYOUTS))}", repr(layout))
    spec = _validate.check_call(fn, q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                learnable_sink=learnable_sink)
    if spec.seqlen_k != spec.seqlen_q:
        _fail(ValueError, fn, "k.shape[1] (seqlen_local)", f"must equal q.shape[1]={spec.seqlen_q}", spec.seqlen_k)
    if layout == "zigzag" and spec.seqlen_q % 2:
        _fail(ValueError, fn, "q.shape[1] (seqlen_local)",
              "must be even with layout='zigzag' (each rank holds two chunks of seqlen_local / 2)", spec.seqlen_q)
    if grads is not None:
        _validate.check_backward_arrays(fn, *grads, spec, q=q)
    for name, value in flags.items():
        _validate.check_flag(fn, name, value)
    if flags.get("return_dsink"):
        _validate.check_return_dsink(fn, True, spec)
    return spec


def _float_bits(x):
    return int(np.float64(x).view(np.int64))


def _bits_float(n):
    return float(np.int64(n).view(np.float64))


_PASSES = ("forward", "backward")
_KINDS = ("numpy", "cupy")
# What every rank must agree on: (name in messages, int64 slots, how the slots read).
_FIELDS = (
    ("comm.size", 1, lambda s: int(s[0])),
    ("the pass", 1, lambda s: _PASSES[s[0]]),
    ("the array kind", 1, lambda s: _KINDS[s[0]]),
    ("q.dtype", 1, lambda s: SUPPORTED_DTYPES[s[0]].name),
    ("q.shape", 4, lambda s: tuple(int(x) for x in s)),
    ("k.shape", 4, lambda s: tuple(int(x) for x in s)),
    ("causal", 1, lambda s: bool(s[0])),
    ("window_size", 2, lambda s: tuple(int(x) for x in s)),
    ("scale", 1, lambda s: _bits_float(s[0])),
    ("softcap", 1, lambda s: _bits_float(s[0])),
    ("a learnable_sink", 1, lambda s: bool(s[0])),
    ("layout", 1, lambda s: LAYOUTS[s[0]]),
)
_SLOTS = sum(width for _, width, _ in _FIELDS)


def _descriptor(rank, world, pass_name, spec, layout):
    """[valid, rank, the fields...] as int64."""
    values = [world, _PASSES.index(pass_name), _KINDS.index(spec.kind), SUPPORTED_DTYPES.index(spec.dtype),
              spec.batch, spec.seqlen_q, spec.nheads, spec.headdim, spec.batch, spec.seqlen_k, spec.nheads_kv,
              spec.headdim, spec.causal, *spec.window, _float_bits(spec.scale), _float_bits(spec.softcap),
              spec.learnable_sink is not None, LAYOUTS.index(layout)]
    return np.array([1, rank] + values, np.int64)


def _fields(descriptor):
    start = 2
    for name, width, read in _FIELDS:
        yield name, read(descriptor[start:start + width])
        start += width


def _host(x):
    return x.get() if array_kind(x) == "cupy" else np.asarray(x)


def _around(comm, mine):
    """Every rank's array, passed around the ring: {rank: its array}."""
    rank, world = comm.rank, comm.size
    everyone = {rank: mine}
    travelling = mine
    for step in range(1, world):
        (travelling,) = comm.sendrecv([travelling], (rank + 1) % world, (rank - 1) % world)
        everyone[(rank - step) % world] = travelling
    return everyone


def _agree(fn, comm, mine, local_error):
    """Pass every rank's descriptor around the ring, then raise on every rank if any rank rejected
    its arguments (that rank raises its own error) or any descriptor differs from rank 0's."""
    rank, world = comm.rank, comm.size
    everyone = {origin: _host(descriptor) for origin, descriptor in _around(comm, mine).items()}
    if local_error is not None:
        raise local_error
    for origin, descriptor in everyone.items():
        if descriptor.shape != mine.shape or int(descriptor[1]) != origin:
            raise RuntimeError(f"{fn}: comm does not pass arrays around a ring: rank {rank} expected rank "
                               f"{origin}'s descriptor, {world - 1} hops of sendrecv(..., dst=rank+1, src=rank-1)")
    rejected = [r for r in range(world) if not everyone[r][0]]
    if rejected:
        raise ValueError(f"{fn}: no rank computes unless every rank's arguments are valid; rank"
                         f"{'s' if len(rejected) > 1 else ''} {', '.join(map(str, rejected))} rejected "
                         "its arguments (the error raised there says why)")
    first = dict(_fields(everyone[0]))
    for r in range(1, world):
        for name, value in _fields(everyone[r]):
            if value != first[name]:
                _fail(ValueError, fn, f"{name} on rank {r}", f"must equal rank 0's {first[name]!r} (every rank "
                      "passes its shard of the same call)", repr(value))


def _checked(fn, pass_name, comm, q, k, v, causal, scale, window_size, softcap, learnable_sink, layout, grads=None,
             flags=None):
    """Validate on this rank, then agree with the others; returns this rank's Spec. Only a bad
    ``comm`` raises before the exchange (there is no ring to tell the others through)."""
    rank, world = _check_comm(fn, comm)
    try:
        spec = _check_local(fn, q, k, v, causal, scale, window_size, softcap, learnable_sink, layout, grads,
                            flags or {})
        mine, error = _descriptor(rank, world, pass_name, spec, layout), None
    except (TypeError, ValueError) as exc:
        spec, mine, error = None, np.zeros(2 + _SLOTS, np.int64), exc
        mine[1] = rank
    _agree(fn, comm, mine, error)
    return spec


def _on_device(spec, q):
    return q.device if spec.kind == "cupy" else contextlib.nullcontext()


# ---- public entry points


def ring_attention(q: Array, k: Array, v: Array, *, comm: Any, causal: bool = False, scale: Optional[float] = None,
                   window_size: Window = (-1, -1), softcap: float = 0.0, learnable_sink: Optional[Array] = None,
                   return_lse: bool = False, layout: str = "zigzag") -> Union[Array, Tuple[Array, Array]]:
    """This rank's shard of attention over the global sequence that every rank's shards make up.

    Called on every rank of ``comm`` at once, each with its shard: q (batch, seqlen_local, nheads,
    headdim), k and v (batch, seqlen_local, nheads_kv, headdim), laid out by ``layout`` ("zigzag":
    rank r holds chunks r and 2*world-1-r of 2*world; "contiguous": the r-th slice). ``causal``,
    ``window_size``, ``softcap``, ``scale`` and ``learnable_sink`` (the same on every rank) are those of
    :func:`cupyflash.attention`, applied to global positions (query i sees key j when
    ``i - left <= j <= i + right``). Returns this rank's out shard, and with ``return_lse`` its lse shard
    (batch, nheads, seqlen_local), float32 (float64 for float64 inputs). A row that sees no key gives out 0,
    lse -inf (the sink's logit with a sink).
    """
    fn = "ring_attention"
    spec = _checked(fn, "forward", comm, q, k, v, causal, scale, window_size, softcap, learnable_sink, layout,
                    flags={"return_lse": return_lse})
    with _on_device(spec, q):
        out, lse = _forward(comm, q, k, v, spec, layout)
    return (out, lse) if return_lse else out


def ring_attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *, comm: Any,
                            causal: bool = False, scale: Optional[float] = None, window_size: Window = (-1, -1),
                            softcap: float = 0.0, learnable_sink: Optional[Array] = None, return_dsink: bool = False,
                            layout: str = "zigzag") -> Tuple[Array, ...]:
    """This rank's shards ``(dq, dk, dv)`` of the gradients of ``sum(dout * out)``, where ``out``
    and ``lse`` are this rank's shards of :func:`ring_attention` (``return_lse=True``) for the same
    shards and keywords. Called on every rank at once; each gradient has its input's shape and dtype.
    ``return_dsink`` (with ``learnable_sink``) appends the sink's whole gradient, the same bits on every rank.
    """
    fn = "ring_attention_backward"
    spec = _checked(fn, "backward", comm, q, k, v, causal, scale, window_size, softcap, learnable_sink, layout,
                    grads=(dout, out, lse), flags={"return_dsink": return_dsink})
    with _on_device(spec, q):
        return _backward(comm, dout, q, k, v, out, lse, spec, layout, return_dsink)


def ring_attention_vjp(q: Array, k: Array, v: Array, *, comm: Any, causal: bool = False,
                       scale: Optional[float] = None, window_size: Window = (-1, -1), softcap: float = 0.0,
                       learnable_sink: Optional[Array] = None, return_dsink: bool = False,
                       layout: str = "zigzag") -> Tuple[Array, Callable[[Array], Tuple[Array, ...]]]:
    """Run :func:`ring_attention`; return ``(out, vjp)`` with ``vjp(dout) -> (dq, dk, dv[, dsink])``, this
    rank's shards (dsink whole). Every rank calls ``vjp`` at once, like the forward."""
    fn = "ring_attention_vjp"
    keywords = (causal, scale, window_size, softcap, learnable_sink, layout)
    spec = _checked(fn, "forward", comm, q, k, v, *keywords, flags={"return_dsink": return_dsink})
    with _on_device(spec, q):
        out, lse = _forward(comm, q, k, v, spec, layout)

    def vjp(dout):
        _checked(f"{fn}.vjp", "backward", comm, q, k, v, *keywords, grads=(dout, out, lse))
        with _on_device(spec, q):
            return _backward(comm, dout, q, k, v, out, lse, spec, layout, return_dsink)

    return out, vjp
