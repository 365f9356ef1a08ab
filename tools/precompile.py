"""Compile kernel instantiations in parallel into CuPy's on-disk cache, so that a later test or
benchmark run (one process, or several that would each compile the same kernels) starts warm.

    python tools/precompile.py            # every instantiation of the CI covering set
    python tools/precompile.py --all-features --dtypes float16 bfloat16 --headdims 64 128

Needs a GPU (CuPy compiles for the current device's architecture).
"""
import argparse
import concurrent.futures
import itertools
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupyflash import _plan  # noqa: E402


def _compile(launch):
    from cupyflash import _cuda_backend

    _cuda_backend._module(launch.source, launch.name, launch.options).get_function(launch.name)
    return launch.name


def launches(dtypes, headdims, variants, limit, hopper=False):
    """Every kernel these cases can launch; `hopper` adds the Hopper family."""
    seen = {}
    for dtype, d, var, aligned in itertools.product(dtypes, headdims, variants, (True, False)):
        todo = [_plan.forward(dtype, d, var, aligned, limit),
                *(launch for dq_atomics in (False, True)
                  for launch in _plan.backward(dtype, d, var, aligned, limit, dq_atomics=dq_atomics))]
        if hopper and dtype in _plan.TENSOR_CORE_DTYPES:
            todo += [_plan.forward_sm90(dtype, d, var), _plan.forward_sm90(dtype, d, var, _plan.SM90_WIDE_KEY_TILE_FROM),
                     _plan.forward_sm90(dtype, d, var, softcap=50.0),  # bounded scores (sm90_bounded_scores)
                     _plan.forward_sm90(dtype, d, var, _plan.SM90_BOUNDED_STAGES_FROM, softcap=50.0),
                     *_plan.backward_sm90(dtype, d, var)]
        if hopper and dtype == "float32" and d <= _plan.SM90_SPLIT_HEADDIM:
            todo += [_plan.split_float32(), _plan.forward_sm90(dtype, d, var), *_plan.backward_sm90(dtype, d, var),
                     _plan.row_sums_sm90(d, var)]
        for launch in todo:
            seen[(launch.source, launch.name)] = launch
    return list(seen.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=None)
    parser.add_argument("--headdims", nargs="+", type=int, default=None)
    parser.add_argument("--features", nargs="+", type=int, default=[0], help="Variant feature bit sets")
    parser.add_argument("--mask-dtypes", nargs="+", default=["bool"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    import cupy

    cc = cupy.cuda.Device().compute_capability
    limit = _plan.smem_limit((int(cc[:-1]), int(cc[-1])))
    if args.dtypes is None and args.headdims is None:
        todo = _plan.covering_launches()
    else:
        variants = [_plan.variant(f, m) for f in args.features for m in args.mask_dtypes]
        todo = launches(args.dtypes or list(_plan.C_TYPES), args.headdims or [64], variants, limit, cc.startswith("9"))
    start = time.perf_counter()
    # spawn, not fork: this process has initialised CUDA, which a forked child cannot use
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in pool.map(_compile, todo):
            pass
    print(f"precompiled {len(todo)} instantiations in {time.perf_counter() - start:.1f} s with {args.jobs} jobs")


if __name__ == "__main__":
    main()
