"""The tiled NumPy backend never builds the seqlen x seqlen matrix."""

from __future__ import annotations

import tracemalloc

import numpy as np

import cupyflash


def test_forward_backward_memory_is_linear_in_seqlen():
    seqlen, headdim = 8192, 64
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, seqlen, 1, headdim)).astype(np.float32) for _ in range(4))
    one_matrix = seqlen * seqlen * 4  # 256 MiB: a single float32 score matrix
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out, lse = cupyflash.attention(q, k, v, causal=False, return_lse=True)
        dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < one_matrix / 4, f"peak {peak / 2**20:.1f} MiB, one score matrix is {one_matrix / 2**20:.0f} MiB"
    assert np.isfinite(out).all() and np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
