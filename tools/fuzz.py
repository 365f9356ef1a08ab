"""Drawn problems on the CUDA kernels against the float64 reference for a fixed time, wider than the GPU
suite's drawn tests: any head dimension 1-256, lengths at and around tile edges, GQA groups, scales, logit
spreads, layouts and variant combinations, dense, packed and decoding; each worker process on one kernel
family (the default dispatch, the mma.sync family, the CUDA-core kernels for float32 and float64). Every
case is checked by the suite's own functions (tests/test_gpu_variants.py, test_gpu_varlen.py,
test_kvcache.py: flash-attn's rule, outputs poisoned before the kernels run); some dense cases hold NaN in
their data, and there the NaNs must reach exactly the outputs they reach in the reference.

    python tools/fuzz.py --seconds 300 --workers 14 [--seed 0] [--json failures.json]

Prints the cases run and every failure with what reproduces it; exits 1 if any case failed.
"""
import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback

import ml_dtypes
import numpy as np

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Each worker's kernel family (CUPYFLASH_KERNELS), by worker index.
FAMILIES = ("", "sm80", "", "simt")
#: The suite's variant names (test_gpu_variants.VARIANTS) drawn together, and the packed batches' ones.
DENSE_VARIANTS = ("window", "sliding", "softcap", "alibi", "alibi_batch", "padding", "bool_mask", "bias", "bias_2d",
                  "dropout", "sink")
PACKED_VARIANTS = ("causal", "window", "alibi", "softcap_alibi", "dropout", "sink")
#: Work per dense case, batch * nheads * seqlen_q * seqlen_k * headdim, kept for the float64 reference.
MAX_WORK = 6e7
TILE_EDGES = (1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 383, 384, 385, 511, 513)


def pick(rng, items):
    return items[int(rng.integers(len(items)))]


def length(rng):
    """Half the time a tile edge, else anything up to 700."""
    return pick(rng, TILE_EDGES) if rng.random() < 0.5 else int(rng.integers(1, 700))


def dtypes(family):
    wide = [np.dtype(np.float32), np.dtype(np.float64)]
    return wide if family == "simt" else [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)] + wide


def names(rng, variants, most):
    """Up to `most` distinct names of `variants`, in the suite's order (later keys win)."""
    return sorted(str(x) for x in rng.choice(variants, int(rng.integers(0, most + 1)), replace=False))


def dense_case(rng, family):
    """(Problem arguments, layout, variant names): test_gpu_variants.check's inputs; and how many entries
    of q, k, v and dout to make NaN (with_nans), checked for where the NaNs reach alone."""
    dtype = pick(rng, dtypes(family))
    headdim = int(rng.integers(1, 257)) if rng.random() < 0.7 else pick(rng, (32, 64, 96, 128, 160, 192, 256))
    nheads, nheads_kv = pick(rng, ((1, 1), (2, 1), (4, 2), (6, 3), (8, 1), (3, 3), (4, 4)))
    batch, seqlen_q, seqlen_k = int(rng.integers(1, 4)), length(rng), length(rng)
    while batch * nheads * seqlen_q * seqlen_k * headdim > MAX_WORK:
        seqlen_q, seqlen_k = max(1, seqlen_q // 2), max(1, seqlen_k // 2)
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.02, 1.5))
    logit_std = None if rng.random() < 0.6 else pick(rng, (0.3, 3.0, 30.0))
    problem = (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, bool(rng.random() < 0.4), scale,
               logit_std, int(rng.integers(2**32)))
    drawn = ["all"] if rng.random() < 0.05 else names(rng, DENSE_VARIANTS, 3)
    nans = int(rng.integers(1, 6)) if rng.random() < 0.3 else 0
    return problem, pick(rng, ("contiguous", "bhsd", "padded", "offset")), drawn, nans


def packed_case(rng, family):
    """(lengths, dtype, headdim, variant names, seed, offsets left on the device)."""
    lengths = [tuple(pick(rng, (0, 1, length(rng))) for _ in "qk") for _ in range(int(rng.integers(1, 7)))]
    return (lengths, pick(rng, dtypes(family)), int(rng.integers(1, 257)), names(rng, PACKED_VARIANTS, 2),
            int(rng.integers(2**32)), bool(rng.random() < 0.5))


def decode_case(rng, family, variants):
    """(cache lengths, appended rows, seqlen_q, heads, headdim, page size, splits, variant index (of `variants`,
    test_kvcache.VARIANTS' count), dtype, seed)."""
    wide = family == "simt"
    # query positions: a token or a few, or up to 40 (with the groups, rows in several slabs of a decode block)
    return ([pick(rng, (0, length(rng))) for _ in range(int(rng.integers(1, 5)))], int(rng.integers(0, 4)),
            int(rng.integers(1, 5) if rng.random() < 0.7 else rng.integers(5, 41)),
            pick(rng, ((8, 1), (4, 2), (2, 2), (16, 4), (6, 3))), int(rng.integers(1, 257)),
            pick(rng, (None, 1, 16, 40, 64, 256)), pick(rng, (0, 1, 3, 50)), int(rng.integers(variants)),
            np.dtype(np.float32) if wide else pick(rng, dtypes(family)[:3]), int(rng.integers(2**32)))


def with_nans(problem_type, count):
    """problem_type whose data holds `count` NaNs at drawn entries of q, k, v and dout. (Not inf: an
    infinite q or k can make a score -inf, which the kernels and the reference treat apart, see
    docs/variants.md; and 0 * inf, where a probability underflows in the kernels but not in float64.)"""
    class WithNans(problem_type):
        def arrays(self, xp=np):
            arrays = [np.array(x) for x in super().arrays()]
            rng = np.random.default_rng(self.seed + 1)
            for _ in range(count):
                x = arrays[int(rng.integers(4))]
                x.flat[int(rng.integers(x.size))] = np.nan
            return tuple(xp.asarray(x) for x in arrays)
    return WithNans


def same_nonfinite(got, want, name):
    """Where the reference is not finite the kernels give the same value (NaN for NaN); elsewhere a finite
    one: no NaN reaches an output that the reference keeps clear of it."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(want)
    differ = ~finite & ~((got == want) | (np.isnan(got) & np.isnan(want)))
    leaked = finite & ~np.isfinite(got)
    assert not differ.any() and not leaked.any(), (
        f"{name}: {int(differ.sum())} non-finite entries of the reference differ, {int(leaked.sum())} finite "
        f"ones are not, e.g. at {np.argwhere(differ | leaked)[:3].tolist()}")


def run_dense(tv, problem, layout, variants, nans):
    p = (with_nans(tv.Problem, nans) if nans else tv.Problem)(*problem)
    kw = {}
    for name in variants:  # later keys win where two variants set the same keyword, as in the suite
        kw.update(tv.variant(name, p))
    if not nans:
        tv.check(p, layout, **kw)
        return
    _, got, want = tv.run_with_reference(p, layout, **kw)
    for name in got:
        same_nonfinite(got[name], want[name], name)


def run_packed(tvl, lengths, dtype, headdim, variants, seed, unread):
    rng = np.random.default_rng(seed)
    cu_q, cu_k, *arrays = tvl.packed_batch(*zip(*lengths), dtype, seed, tvl.NHEADS, tvl.NHEADS_KV, headdim)
    kw = {}
    for name in variants:
        kw.update(tvl.variant(name, len(lengths), rng, dtype))
    tvl.check_each_sequence(cu_q, cu_k, arrays, tvl.run_packed(cu_q, cu_k, *arrays, slack=1 if unread else None, **kw),
                            kw)


def run_decode(tk, cache_seqlens, seqlen_new, seqlen_q, heads, headdim, page_size, num_splits, variant, dtype, seed):
    kw = tk.fitted(tk.VARIANTS[variant], dtype, heads[0])
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = np.random.default_rng(seed).uniform(0.01, 0.5, heads[0]).astype(np.float32)
    q, k_cache, v_cache, k, v, lengths = tk.problem(seed, cache_seqlens, seqlen_new, seqlen_q=seqlen_q, nheads=heads[0],
                                                    nheads_kv=heads[1], headdim=headdim, dtype=dtype)
    block_table = None
    if page_size is not None:
        k_cache, v_cache, block_table = tk.paged(k_cache, v_cache, page_size, seed)
    tk.check_decode(dtype, kw, q, k_cache, v_cache, k, v, lengths, block_table, num_splits)


def worker(index, seconds, seed):
    """Cases drawn from seed `seed + index` until `seconds` have passed: (cases run, failures)."""
    family = FAMILIES[index % len(FAMILIES)]
    os.environ["CUPYFLASH_KERNELS"] = family
    sys.path[:0] = [CHECKOUT, os.path.join(CHECKOUT, "tests")]
    import test_gpu
    import test_gpu_variants as tv
    import test_gpu_varlen as tvl
    import test_kvcache as tk
    from cupyflash import _cuda_backend

    _cuda_backend._empty = test_gpu.poisoned_empty  # as the suite's poisoned_outputs fixture
    rng = np.random.default_rng(seed + index)
    tv.RNG = np.random.default_rng(2**32 + seed + index)  # the suite's variant draws
    deadline, cases, failures = time.monotonic() + seconds, 0, []
    while time.monotonic() < deadline:
        kind = ("dense", "dense", "dense", "packed", "decode")[int(rng.integers(5))]
        if kind == "dense":
            args = dense_case(rng, family)
            run = lambda: run_dense(tv, *args)  # noqa: E731
        elif kind == "packed":
            args = packed_case(rng, family)
            run = lambda: run_packed(tvl, *args)  # noqa: E731
        else:
            args = decode_case(rng, family, len(tk.VARIANTS))
            run = lambda: run_decode(tk, *args)  # noqa: E731
        cases += 1
        try:
            run()
        except Exception as error:  # noqa: BLE001 (every failure is reported, the run goes on)
            failures.append(dict(kind=kind, family=family or "default", worker=index, case=repr(args),
                                 error=f"{type(error).__name__}: {error}"[:2000], where=traceback.format_exc()[-2000:]))
    return cases, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long each worker draws cases")
    parser.add_argument("--workers", type=int, default=8, help="processes, each on one family (FAMILIES)")
    parser.add_argument("--seed", type=int, default=0, help="worker i draws from seed SEED + i: another seed, other cases")
    parser.add_argument("--json", help="write the failures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the workers' references share the cores
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.starmap(worker, [(i, args.seconds, args.seed) for i in range(args.workers)])
    failures = [f for _, fs in results for f in fs]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(failures, f, indent=1)
    for f in failures:
        print(f"FAILED {f['kind']} case on the {f['family']} kernels (worker {f['worker']}): {f['case']}\n"
              f"    {f['error']}")
    by_family = {}
    for index, (cases, _) in enumerate(results):
        family = FAMILIES[index % len(FAMILIES)] or "default"
        by_family[family] = by_family.get(family, 0) + cases
    print(f"fuzz: {sum(by_family.values())} cases ({', '.join(f'{k} {v}' for k, v in by_family.items())}), "
          f"{len(failures)} failed, {args.workers} workers x {args.seconds:g} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
