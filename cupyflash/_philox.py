"""Dropout keep flags from Philox-4x32-7: the same bits on every backend, for any tile shape.

``keep[b, h, i, j]`` is a pure function of ``(seed, b, h, i, j)`` (docs/variants.md, "Dropout
bits"). This module is the NumPy definition; ``cuda_src/philox.cuh`` is its CUDA twin, and
:func:`dropout_mask` with ``xp=cupy`` runs that twin, so the two are compared bit for bit.
"""
from __future__ import annotations

import math
import numbers

from typing import Any, Tuple

import numpy as np

from ._validate import _check_int, _fail, _real

__all__ = ["philox4x32", "split_seed", "threshold", "keep", "dropout_mask"]

# Random123 / curand constants: round multipliers and the Weyl key increments.
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
#: Rounds of the dropout bits: 7, as flash-attn's dropout draws them (Random123's authors found no
#: statistical failure from 7 rounds of Philox-4x32 and recommend 10 as a margin for general use).
ROUNDS = 7

_LO32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32(k0, k1, c0, c1, c2, c3, rounds=ROUNDS):
    """The 4 output words (uint32 arrays) of Philox-4x32 with `rounds` rounds for key (k0, k1) and
    counter (c0, c1, c2, c3); the arguments are unsigned 32-bit values that broadcast together."""
    # 32-bit words held in uint64 so that M * c is the exact 64-bit product (mulhi/mullo).
    k0, k1, c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(x, dtype=np.uint64) for x in (k0, k1, c0, c1, c2, c3)))
    m0, m1 = np.uint64(M0), np.uint64(M1)
    for r in range(rounds):
        if r:
            k0 = (k0 + np.uint64(W0)) & _LO32
            k1 = (k1 + np.uint64(W1)) & _LO32
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _LO32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _LO32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def split_seed(seed):
    """Philox key (k0, k1) = (low, high) 32-bit halves of an unsigned 64-bit seed, as np.uint32."""
    seed = int(seed)
    return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)


def threshold(dropout_p):
    """8-bit drop threshold: a value u is kept iff u >= threshold (p quantised to 1/256)."""
    return min(math.floor(float(dropout_p) * 256.0 + 0.5), 255)


def _counter0(j):
    """First counter word of column j: 4 Philox calls per 64-column group, one per column pair
    position (j % 8) // 2, each serving the 16 columns 8w + 2q + {0, 1} of the group."""
    return (j // 64) * 4 + (j % 8) // 2


def _select(words, j):
    """Byte u[((j % 64) // 8) * 2 + j % 2] of the 16 held in the 4 words (little-endian within a word)."""
    byte = ((j % 64) // 8) * 2 + j % 2
    w = byte // 4
    r = np.where(w == 0, words[0], np.where(w == 1, words[1], np.where(w == 2, words[2], words[3])))
    return (r >> (8 * (byte % 4)).astype(np.uint32)) & np.uint32(0xFF)


def keep(seed, dropout_p, b, h, i, j):
    """Bool keep flags for integer index arrays b, h, i, j (query head h) that broadcast together."""
    b, h, i, j = (np.asarray(x, dtype=np.int64) for x in (b, h, i, j))
    k0, k1 = split_seed(seed)
    words = philox4x32(k0, k1, _counter0(j), i, h, b)
    return _select(words, j) >= threshold(dropout_p)


def _check_mask_args(fn, shape, dropout_p, seed, xp):
    if not isinstance(shape, (tuple, list)) or len(shape) != 4 or not all(
            isinstance(n, (numbers.Integral, np.integer)) and not isinstance(n, (bool, np.bool_)) and n >= 0
            for n in shape):
        _fail(ValueError, fn, "shape", "must be 4 non-negative ints (batch, nheads, seqlen_q, seqlen_k)", repr(shape))
    p = _real(fn, "dropout_p", dropout_p, "a real number in [0, 1)")
    if not 0.0 <= p < 1.0:
        _fail(ValueError, fn, "dropout_p", "must be in [0, 1)", repr(dropout_p))
    seed = _check_int(fn, "seed", seed, "an int in [0, 2**64)")
    if not 0 <= seed < 2**64:
        _fail(ValueError, fn, "seed", "must be an int in [0, 2**64)", seed)
    if getattr(xp, "__name__", None) not in ("numpy", "cupy"):
        _fail(TypeError, fn, "xp", "must be the numpy or cupy module", repr(xp))
    return tuple(int(n) for n in shape), p, seed


def dropout_mask(shape: Tuple[int, int, int, int], dropout_p: float, seed: int, *, xp: Any = np) -> Any:
    """Bool keep-mask of ``shape = (batch, nheads, seqlen_q, seqlen_k)``: True where a
    probability survives dropout with ``dropout_p`` and ``seed``, as every backend draws it.

    ``xp=cupy`` computes it on the current GPU (same bits).
    """
    shape, dropout_p, seed = _check_mask_args("dropout_mask", shape, dropout_p, seed, xp)
    if xp.__name__ == "cupy":
        return _dropout_mask_cupy(shape, dropout_p, seed)
    return keep_mask(shape, dropout_p, seed)


def keep_mask(shape, dropout_p, seed, batch_offset=0):
    """NumPy keep-mask of (batch, nheads, seqlen_q, seqlen_k) whose batch entry b draws the bits of
    batch index ``batch_offset + b`` (a sequence of a packed batch, run alone)."""
    batch, nheads, seqlen_q, seqlen_k = shape
    if 0 in shape:
        return np.zeros(shape, dtype=bool)
    # One Philox call per (b, h, i, counter) rather than per element: each serves 16 columns.
    b = batch_offset + np.arange(batch).reshape(-1, 1, 1, 1)
    h = np.arange(nheads).reshape(1, -1, 1, 1)
    i = np.arange(seqlen_q).reshape(1, 1, -1, 1)
    c0 = np.arange(-(-seqlen_k // 64) * 4).reshape(1, 1, 1, -1)
    k0, k1 = split_seed(seed)
    words = philox4x32(k0, k1, c0, i, h, b)  # each (batch, nheads, seqlen_q, counters)
    j = np.arange(seqlen_k)
    return _select(tuple(w[..., _counter0(j)] for w in words), j) >= threshold(dropout_p)


def _dropout_mask_cupy(shape, dropout_p, seed):
    import cupy

    from . import _cuda_backend, _plan

    out = cupy.empty(shape, dtype=cupy.bool_)
    batch, nheads, seqlen_q, seqlen_k = shape
    n = batch * nheads * seqlen_q * (-(-seqlen_k // 64) * 4)  # one thread per Philox call
    if n == 0:
        return out
    launch = _plan.dropout_mask()
    kernel = _cuda_backend.compiled_kernel(launch.source, launch.name, launch.options)
    k0, k1 = split_seed(seed)
    blocks = min(-(-n // launch.threads), 65535 * 16)  # the kernel loops over the rest
    kernel((blocks,), (launch.threads,), (out, np.int32(batch), np.int32(nheads), np.int32(seqlen_q),
                                    np.int32(seqlen_k), k0, k1, np.uint32(threshold(dropout_p))))
    return out
