"""Host time per call of attention, attention_backward and attention_with_kvcache, with a profile of each.

    python tools/host_cost.py                         # on a machine with a GPU, from the repository root
    python tools/host_cost.py --against HEAD~1 --only kvcache    # against a revision (or a tree's directory)

The problems are small enough that the GPU never limits: the time per call is what the host spends
(checks, parameter structs, allocations, launches), which the events around a timed call include.
With --against, the working tree and the revision (loaded as tools/ab.py loads it) take turns, a batch of
calls each per round, and each case reports the median time per call of each and of the rounds' ratios
(new / old, with its quartiles): the host's speed drifts too much between runs to compare them.
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

import cupy as cp
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab  # noqa: E402  (tools/ab.py: a revision's package beside the working tree's)

sys.path.insert(0, ab.REPO)
import cupyflash  # noqa: E402


def draw(shape):
    return cp.random.standard_normal(shape, dtype=cp.float32).astype(ml_dtypes.bfloat16)


def cases(cf):
    """Each case's call of package `cf` (cupyflash or a revision's), by name; the arrays are drawn anew."""
    q, k, v, dout = (draw((1, 128, 2, 64)) for _ in range(4))
    out, lse = cf.attention(q, k, v, causal=True, return_lse=True)
    cache, query = draw((1, 1024, 2, 128)), draw((1, 1, 8, 128))
    pages, table = draw((8, 256, 2, 128)), np.array([[5, 2, 7, 0]], np.int32)  # 1024 rows in 4 pages of 256
    new = draw((1, 1, 2, 128))  # a token's key and value
    chunk = draw((1, 300, 8, 128))  # 1200 query rows per kv head: past the decode kernels, the dense pass
    cache64, query64 = cp.random.standard_normal((1, 1024, 2, 64)), cp.random.standard_normal((1, 1, 8, 64))
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, (1024, 64))
    cos, sin = (cp.asarray(f(angles).astype(ml_dtypes.bfloat16)) for f in (np.cos, np.sin))
    slopes, sink, query_sink = (cp.asarray(np.linspace(-1, 1, n, dtype=np.float32)) for n in (2, 2, 8))
    new_lengths = iter(range(10**9))
    return {
        "attention": lambda: cf.attention(q, k, v, causal=True),
        "attention, ALiBi slopes": lambda: cf.attention(q, k, v, causal=True, alibi_slopes=slopes),
        "attention, learnable sink": lambda: cf.attention(q, k, v, causal=True, learnable_sink=sink),
        "attention_backward, learnable sink and dsink": lambda: cf.attention_backward(
            dout, q, k, v, out, lse, causal=True, learnable_sink=sink, return_dsink=True),
        "attention_backward": lambda: cf.attention_backward(dout, q, k, v, out, lse, causal=True),
        "attention_with_kvcache": lambda: cf.attention_with_kvcache(query, cache, cache, cache_seqlens=1000),
        "attention_with_kvcache, learnable sink": lambda: cf.attention_with_kvcache(
            query, cache, cache, cache_seqlens=1000, learnable_sink=query_sink),
        "attention_with_kvcache, paged (NumPy block_table)": lambda: cf.attention_with_kvcache(
            query, pages, pages, cache_seqlens=1000, block_table=table),
        "attention_with_kvcache, the dense pass (300 queries)": lambda: cf.attention_with_kvcache(
            chunk, cache, cache, cache_seqlens=1000, causal=True),
        "attention_with_kvcache, the dense pass, paged (NumPy block_table)": lambda: cf.attention_with_kvcache(
            chunk, pages, pages, cache_seqlens=1000, block_table=table, causal=True),
        # a prefill loop's chunk per call: each call's lengths are new, so its dense pass is planned anew
        "attention_with_kvcache, the dense pass, new lengths each call": lambda: cf.attention_with_kvcache(
            chunk, cache, cache, cache_seqlens=500 + next(new_lengths) % 400, causal=True),
        "attention_with_kvcache, the dense pass (float64)": lambda: cf.attention_with_kvcache(
            query64, cache64, cache64, cache_seqlens=1000),
        "attention_with_kvcache, a token appended": lambda: cf.attention_with_kvcache(
            query, cache, cache, new, new, cache_seqlens=1000, causal=True),
        "attention_with_kvcache, a token appended, rotary embedding": lambda: cf.attention_with_kvcache(
            query, cache, cache, new, new, cache_seqlens=1000, causal=True, rotary_cos=cos, rotary_sin=sin),
    }


def per_call(call, calls):
    """Seconds per call of `calls` calls queued back to back, to the GPU's end."""
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="a git revision, or a directory holding a tree's cupyflash "
                        "and cuda_src (tools/ab.py)")
    parser.add_argument("--only", default="", help="the cases whose names contain this")
    parser.add_argument("--calls", type=int, default=1000, help="calls per case (per round with --against)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds with --against")
    parser.add_argument("--rows", type=int, default=14, help="rows of each profile")
    args = parser.parse_args()
    if args.against is None:
        for name, call in cases(cupyflash).items():
            if args.only not in name:
                continue
            for _ in range(20):  # compile and warm
                call()
            print(f"== {name}: {per_call(call, args.calls) * 1e6:.1f} us of host time per call")
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls):
                call()
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.rows)
            print(text.getvalue())
        return
    old = ab.load_revision(args.against, tempfile.mkdtemp(prefix="host_cost_"))
    new_cases, old_cases = cases(cupyflash), cases(old)
    print(f"host time per call in us; old: {args.against}, new: the working tree; {args.rounds} rounds of "
          f"{args.calls} calls")
    print("| case | old | new | new / old | quartiles |\n|---|---|---|---|---|")
    for name in new_cases:
        if args.only not in name:
            continue
        pair = (old_cases[name], new_cases[name])
        for call in pair:
            for _ in range(20):
                call()
        times = []
        for r in range(args.rounds):  # the tree that goes first alternates
            order = (0, 1) if r % 2 == 0 else (1, 0)
            timed = {i: per_call(pair[i], args.calls) for i in order}
            times.append((timed[0], timed[1]))
        ratios = sorted(n / o for o, n in times)
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {statistics.median(o for o, _ in times) * 1e6:.1f} | "
              f"{statistics.median(n for _, n in times) * 1e6:.1f} | {statistics.median(ratios):.3f} | "
              f"{quartiles[0]:.3f}-{quartiles[2]:.3f} |")


if __name__ == "__main__":
    main()
