"""Packed variable-length batches: whole through the CUDA kernels (one launch per pass, each block
finding its sequence's rows from the offsets: ``Variant::packed``), one sequence at a time through
the NumPy backend's dense passes.

q is (total_q, nheads, headdim) and k, v are (total_k, nheads_kv, headdim), sequence b owning
rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; lse is (nheads, total_q). Every variant applies per
sequence: causal and windows align each sequence bottom-right, ALiBi takes the sequence's row of
slopes, and dropout draws the bits of batch index b (``Spec.batch_offset``), so a sequence run
alone with that offset gives the same result. A sequence with no query rows is skipped; one with
no keys gives out 0 and lse -inf (a learnable sink's logit with one). The offsets are read on the
host, but for CuPy ones with both ``max_seqlen_*`` given, which stay on the device
(``_validate.offsets_stay_on_device``).
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from ._validate import compute_dtype

__all__ = ["forward", "backward"]


def _xp(spec):
    if spec.kind == "cupy":
        import cupy

        return cupy
    return np


def _sequences(spec):
    """(b, query rows, key rows, the sequence's own dense Spec) of every sequence with query rows. Offsets
    left on the device unread give none: the kernels read those, and the passes here then run only for a batch
    whose longest sequence has no query or no key (its outputs are zeros)."""
    cu_q, cu_k, used, table = spec.cu_seqlens_q, spec.cu_seqlens_k, spec.seqused_k, spec.block_table
    if cu_q is None:
        return
    for b in range(spec.batch):
        end_k = int(cu_k[b + 1]) if used is None else int(cu_k[b]) + int(used[b])
        rows_q, rows_k = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), end_k)
        seqlen_q, seqlen_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if seqlen_q == 0:
            continue
        if table is not None:  # the keys' positions through the pages (FwdParamsSm90::block_table)
            positions = np.arange(rows_k.start, rows_k.stop)
            rows_k = table[b, positions // spec.page_size] * spec.page_size + positions % spec.page_size
        slopes = None if spec.alibi_slopes is None else spec.alibi_slopes[b:b + 1]
        yield b, rows_q, rows_k, dataclasses.replace(spec, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                                     alibi_slopes=slopes, batch_offset=spec.batch_offset + b,
                                                     cu_seqlens_q=None, cu_seqlens_k=None, device_offsets=None,
                                                     seqused_k=None, block_table=None, page_size=0)


def _device(spec, x):
    """The device of CuPy inputs, made current so that the outputs are allocated there."""
    return x.device if spec.kind == "cupy" else contextlib.nullcontext()


def _empty_band(spec):
    """Whether no sequence has queries or none has keys (the kernels then have no tile to run)."""
    return spec.seqlen_q == 0 or spec.seqlen_k == 0


def forward(backend, q, k, v, spec):
    xp = _xp(spec)
    if spec.kind == "cupy" and not _empty_band(spec):
        out, lse = backend.forward(q[None], k[None], v[None], spec)
        return out[0], lse
    with _device(spec, q):
        out = xp.zeros(q.shape, q.dtype)
        lse = xp.full((spec.nheads, q.shape[0]), -np.inf, compute_dtype(q.dtype))
        if spec.seqlen_k == 0 and spec.learnable_sink is not None:  # no sequence has keys (offsets read or not)
            lse[:] = spec.learnable_sink[:, None]
        for _, rows_q, rows_k, one in _sequences(spec):
            if one.seqlen_k == 0:  # no key: out 0, lse -inf (or the sink's logit)
                if spec.learnable_sink is not None:
                    lse[:, rows_q] = spec.learnable_sink[:, None]
                continue
            out_b, lse_b = backend.forward(q[None, rows_q], k[None, rows_k], v[None, rows_k], one)
            out[rows_q] = out_b[0]
            lse[:, rows_q] = lse_b[0]
    return out, lse


def backward(backend, dout, q, k, v, out, lse, spec, deterministic):
    xp = _xp(spec)
    if spec.kind == "cupy" and not _empty_band(spec):
        grads = backend.backward(dout[None], q[None], k[None], v[None], out[None], lse, spec, deterministic, False)
        return tuple(g[0] for g in grads[:3])
    with _device(spec, q):
        dq, dk, dv = (xp.zeros(x.shape, x.dtype) for x in (q, k, v))
        for _, rows_q, rows_k, one in _sequences(spec):
            if one.seqlen_k == 0:
                continue
            grads = backend.backward(dout[None, rows_q], q[None, rows_q], k[None, rows_k], v[None, rows_k],
                                     out[None, rows_q], xp.ascontiguousarray(lse[None, :, rows_q]), one,
                                     deterministic, False)
            dq[rows_q], dk[rows_k], dv[rows_k] = (g[0] for g in grads[:3])
    return dq, dk, dv
