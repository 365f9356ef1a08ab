"""Host time per call of attention, attention_backward and attention_with_kvcache, with a profile of each.

    python tools/host_cost.py            # on a machine with a GPU, from the repository root

The problems are small enough that the GPU never limits: the time per call is what the host spends
(checks, parameter structs, allocations, launches), which the events around a timed call include.
"""
import cProfile
import io
import pstats
import time

import cupy as cp
import ml_dtypes
import numpy as np

import cupyflash


def draw(shape):
    return cp.random.standard_normal(shape, dtype=cp.float32).astype(ml_dtypes.bfloat16)


def main(calls_per_case=1000, rows=14):
    q, k, v, dout = (draw((1, 128, 2, 64)) for _ in range(4))
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    cache, query = draw((1, 1024, 2, 128)), draw((1, 1, 8, 128))
    pages, table = draw((8, 256, 2, 128)), np.array([[5, 2, 7, 0]], np.int32)  # 1024 rows in 4 pages of 256
    new = draw((1, 1, 2, 128))  # a token's key and value
    chunk = draw((1, 300, 8, 128))  # 1200 query rows per kv head: past the decode kernels, the dense pass
    cache64, query64 = cp.random.standard_normal((1, 1024, 2, 64)), cp.random.standard_normal((1, 1, 8, 64))
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, (1024, 64))
    cos, sin = (cp.asarray(f(angles).astype(ml_dtypes.bfloat16)) for f in (np.cos, np.sin))
    slopes, sink, query_sink = (cp.asarray(np.linspace(-1, 1, n, dtype=np.float32)) for n in (2, 2, 8))
    new_lengths = iter(range(10**9))
    cases = {
        "attention": lambda: cupyflash.attention(q, k, v, causal=True),
        "attention, ALiBi slopes": lambda: cupyflash.attention(q, k, v, causal=True, alibi_slopes=slopes),
        "attention, learnable sink": lambda: cupyflash.attention(q, k, v, causal=True, learnable_sink=sink),
        "attention_backward, learnable sink and dsink": lambda: cupyflash.attention_backward(
            dout, q, k, v, out, lse, causal=True, learnable_sink=sink, return_dsink=True),
        "attention_backward": lambda: cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True),
        "attention_with_kvcache": lambda: cupyflash.attention_with_kvcache(query, cache, cache, cache_seqlens=1000),
        "attention_with_kvcache, learnable sink": lambda: cupyflash.attention_with_kvcache(
            query, cache, cache, cache_seqlens=1000, learnable_sink=query_sink),
        "attention_with_kvcache, paged (NumPy block_table)": lambda: cupyflash.attention_with_kvcache(
            query, pages, pages, cache_seqlens=1000, block_table=table),
        "attention_with_kvcache, the dense pass (300 queries)": lambda: cupyflash.attention_with_kvcache(
            chunk, cache, cache, cache_seqlens=1000, causal=True),
        "attention_with_kvcache, the dense pass, paged (NumPy block_table)": lambda: cupyflash.attention_with_kvcache(
            chunk, pages, pages, cache_seqlens=1000, block_table=table, causal=True),
        # a prefill loop's chunk per call: each call's lengths are new, so its dense pass is planned anew
        "attention_with_kvcache, the dense pass, new lengths each call": lambda: cupyflash.attention_with_kvcache(
            chunk, cache, cache, cache_seqlens=500 + next(new_lengths) % 400, causal=True),
        "attention_with_kvcache, the dense pass (float64)": lambda: cupyflash.attention_with_kvcache(
            query64, cache64, cache64, cache_seqlens=1000),
        "attention_with_kvcache, a token appended": lambda: cupyflash.attention_with_kvcache(
            query, cache, cache, new, new, cache_seqlens=1000, causal=True),
        "attention_with_kvcache, a token appended, rotary embedding": lambda: cupyflash.attention_with_kvcache(
            query, cache, cache, new, new, cache_seqlens=1000, causal=True, rotary_cos=cos, rotary_sin=sin),
    }
    for name, call in cases.items():
        for _ in range(20):  # compile and warm
            call()
        cp.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(calls_per_case):
            call()
        cp.cuda.Device().synchronize()
        print(f"== {name}: {(time.perf_counter() - start) / calls_per_case * 1e6:.1f} us of host time per call")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls_per_case):
            call()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(rows)
        print(text.getvalue())


if __name__ == "__main__":
    main()
