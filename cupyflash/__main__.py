"""``python -m cupyflash``: a short self-check and memory demo.

On a GPU (if cupy sees one) it runs the CUDA backend, otherwise the tiled
NumPy backend. It prints the backend, the max error against the float64
reference for each dtype (forward and backward) at a small shape, then the
peak memory of naive full-matrix attention vs tiled attention at a long
sequence (NumPy: 8192 via tracemalloc; GPU: 32768 via cupy's memory pool).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np

import ml_dtypes

from . import attention, attention_backward, reference

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def _gpu_cupy():
    """cupy if it imports and sees a device, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return None


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def check_errors(xp, shape=(2, 256, 256, 4, 2, 64)):
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = shape
    print(
        f"max |error| vs float64 reference  (batch={batch}, seqlen_q={seqlen_q}, seqlen_k={seqlen_k}, "
        f"nheads={nheads}, nheads_kv={nheads_kv}, headdim={headdim})"
    )
    print(f"  {'dtype':9} {'causal':6} {'out':>10} {'lse':>10} {'dq':>10} {'dk':>10} {'dv':>10}")
    rng = np.random.default_rng(0)
    worst = {}
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        if xp is not np and np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
            try:  # cupy may not support ml_dtypes.bfloat16 arrays
                xp.asarray(np.zeros(1, dtype))
            except Exception as exc:
                print(f"  {name:9} skipped: {type(exc).__name__}: {exc}")
                continue
        for causal in (False, True):
            host = [rng.standard_normal(s).astype(dtype) for s in (
                (batch, seqlen_q, nheads, headdim),
                (batch, seqlen_k, nheads_kv, headdim),
                (batch, seqlen_k, nheads_kv, headdim),
                (batch, seqlen_q, nheads, headdim),
            )]
            q, k, v, dout = (xp.asarray(x) for x in host)
            out, lse = attention(q, k, v, causal=causal, return_lse=True)
            grads = attention_backward(dout, q, k, v, out, lse, causal=causal)
            ref_out, ref_lse = reference.attention(*host[:3], causal=causal, return_lse=True)
            ref_grads = reference.attention_backward(host[3], *host[:3], ref_out, ref_lse, causal=causal)
            errs = []
            for ours, ref in zip((out, lse) + tuple(grads), (ref_out, ref_lse) + tuple(ref_grads)):
                ours = _host(ours).astype(np.float64)
                fin = np.isfinite(ref)
                errs.append(float(np.abs(ours[fin] - ref[fin]).max()) if fin.any() else 0.0)
            worst[name] = max(worst.get(name, 0.0), *errs)
            print(f"  {name:9} {str(causal):6} " + " ".join(f"{e:10.2e}" for e in errs))
    return worst


def _naive_numpy(q, k, v, scale):
    """Full-matrix float32 attention (one head): the memory baseline."""
    s = (q[0, :, 0] @ k[0, :, 0].T) * scale
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v[0, :, 0]


def memory_numpy(seqlen=8192, headdim=64):
    print(f"peak memory, float32, batch=1, nheads=1, headdim={headdim}, seqlen={seqlen} (tracemalloc)")
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, seqlen, 1, headdim)).astype(np.float32) for _ in range(4))
    scale = 1.0 / np.sqrt(headdim)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        naive = _naive_numpy(q, k, v, scale)
        t_naive = time.perf_counter() - t0
        naive_peak = tracemalloc.get_traced_memory()[1]
        del naive
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        out, lse = attention(q, k, v, return_lse=True)
        t_fwd = time.perf_counter() - t0
        fwd_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        attention_backward(dout, q, k, v, out, lse)
        t_bwd = time.perf_counter() - t0
        bwd_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"  naive forward (full {seqlen}x{seqlen} matrix): {_mib(naive_peak):>12}  ({t_naive:.1f} s)")
    print(f"  tiled forward:                              {_mib(fwd_peak):>12}  ({t_fwd:.1f} s)")
    print(f"  tiled backward:                             {_mib(bwd_peak):>12}  ({t_bwd:.1f} s)")
    return naive_peak, max(fwd_peak, bwd_peak)


def memory_gpu(cupy, seqlen=32768, headdim=64, dtype=np.float16):
    name = np.dtype(dtype).name
    print(f"peak memory, {name}, batch=1, nheads=1, headdim={headdim}, seqlen={seqlen} (cupy memory pool)")
    pool = cupy.get_default_memory_pool()
    q, k, v, dout = (cupy.random.standard_normal((1, seqlen, 1, headdim), dtype=cupy.float32).astype(dtype) for _ in range(4))
    scale = 1.0 / np.sqrt(headdim)

    def peak_of(fn):
        """Pool growth while fn runs: freed blocks stay cached, so total_bytes is the peak."""
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()  # now total_bytes == bytes held by live arrays
        base_total = pool.total_bytes()
        result = fn()
        cupy.cuda.Device().synchronize()
        return result, pool.total_bytes() - base_total

    def naive():
        s = (q[0, :, 0].astype(cupy.float32) @ k[0, :, 0].astype(cupy.float32).T) * scale
        s -= s.max(axis=-1, keepdims=True)
        cupy.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return (s @ v[0, :, 0].astype(cupy.float32)).astype(dtype)

    needed = seqlen * seqlen * 4
    try:
        res, naive_peak = peak_of(naive)
        del res
        print(f"  naive forward (full {seqlen}x{seqlen} float32 matrix): {_mib(naive_peak):>12}")
    except cupy.cuda.memory.OutOfMemoryError:
        naive_peak = None
        print(f"  naive forward: out of memory (needs at least {_mib(needed)} for the score matrix)")
    pool.free_all_blocks()
    (out, lse), fwd_peak = peak_of(lambda: attention(q, k, v, return_lse=True))
    print(f"  tiled forward:  {_mib(fwd_peak):>12}")
    _, bwd_peak = peak_of(lambda: attention_backward(dout, q, k, v, out, lse))
    print(f"  tiled backward: {_mib(bwd_peak):>12}")
    return naive_peak, max(fwd_peak, bwd_peak)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cupyflash", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="use the NumPy backend even if a GPU is visible")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cupy = None if args.cpu else _gpu_cupy()
    if cupy is not None:
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"backend: cuda (cupy {cupy.__version__}, device {dev.id}: {gpu})")
        xp = cupy
    else:
        print("backend: numpy (tiled NumPy backend; no GPU visible to cupy)")
        xp = np
    check_errors(xp)
    if cupy is not None:
        memory_gpu(cupy)
    else:
        memory_numpy()
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
