"""``python -m cupyflash``: a self-check and memory demo.

On a GPU (if cupy sees one) it runs the CUDA backend, otherwise the tiled NumPy
backend, and says what is missing for the GPU. For each dtype, causal or not,
it runs forward and backward at a small shape and judges every tensor by
flash-attn's rule

    max|ours - ref| <= factor * max|naive - ref| + floor

ref: the float64 reference; naive: textbook full-matrix attention computed
here in NumPy in the input dtype (products accumulated in float32, float64 for
float64, each rounded to the dtype); factor 2 for out and lse, 3 for dq, dk,
dv; floor: 4 (forward) or 8 (gradients) x (eps + eps_c L) x max|ref|, where
eps_c is the epsilon of the compute dtype (float32; float64 for float64) and
L = scale max_ij sum_d |q_id k_jd| + log(seqlen_k) (any finite-precision
attention gets the logits wrong by about eps_c L, so a naive computation that
is luckier than that cannot set the bound alone); for lse, which is in the
compute dtype, 4 x eps_c (L + 1). It prints PASS or FAIL per row and overall,
and exits with status 1 on a failure.

Then it shows the peak memory of naive full-matrix attention vs tiled
attention at a long sequence (NumPy: 8192 via tracemalloc; GPU: 32768 via
cupy's memory pool).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np

import ml_dtypes

from . import __version__, attention, attention_backward, reference
from .bench import gpu_unavailable_reason

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
TENSORS = ("out", "lse", "dq", "dk", "dv")
FACTORS = (2, 2, 3, 3, 3)
FLOOR_ULPS = (4, 4, 8, 8, 8)


def nvrtc_problem(cupy):
    """Why cupy cannot compile kernels (NVRTC missing), or None."""
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:  # cuda.pathfinder raises its own DynamicLibNotFoundError
        return (f"cupy sees a GPU but cannot load NVRTC, which compiles the kernels ({type(exc).__name__}: {exc}); "
                'pip install ".[cuda12]" (or ".[cuda13]") from the repository root brings it')
    return None


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def naive_attention(q, k, v, dout, causal, scale):
    """(out, lse, dq, dk, dv) of full-matrix attention in the inputs' dtype: every product
    accumulated in float32 (float64 for float64) and rounded to the dtype, as autograd would.
    Needs seqlen_q <= seqlen_k under causal (no fully masked row)."""
    dtype, group = q.dtype, q.shape[2] // k.shape[2]
    wide = np.float64 if dtype == np.float64 else np.float32

    def rnd(x):
        return x.astype(dtype).astype(wide)

    def mm(a, b):
        return rnd(a @ b)

    def heads(x, repeat=1):  # (b, s, h, d) -> (b, h * repeat, s, d)
        return np.repeat(x, repeat, axis=2).transpose(0, 2, 1, 3).astype(wide)

    def kv_heads(x):  # sum each group of query heads: (b, h, s, d) -> (b, s, h_kv, d)
        b, h, s, d = x.shape
        return rnd(x.reshape(b, h // group, group, s, d).sum(axis=2)).transpose(0, 2, 1, 3)

    qs, kh, vh, do = rnd(heads(q) * wide(scale)), heads(k, group), heads(v, group), heads(dout)
    s = mm(qs, kh.swapaxes(-1, -2))
    if causal:
        seqlen_q, seqlen_k = s.shape[-2:]
        s = np.where(np.arange(seqlen_k) > np.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q, -np.inf, s)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    p = rnd(e / l)
    lse = rnd(m + np.log(l))[..., 0]
    dp = mm(do, vh.swapaxes(-1, -2))
    ds = rnd(p * (dp - (p * dp).sum(axis=-1, keepdims=True)))
    return (mm(p, vh).transpose(0, 2, 1, 3), lse, rnd(mm(ds, kh) * wide(scale)).transpose(0, 2, 1, 3),
            kv_heads(mm(ds.swapaxes(-1, -2), qs)), kv_heads(mm(p.swapaxes(-1, -2), do)))


def logit_scale(q, k, scale):
    """L = scale * max_ij sum_d |q_id k_jd| + log(seqlen_k), the scale of the logits' rounding error."""
    ak = np.abs(np.repeat(k, q.shape[2] // k.shape[2], axis=2).astype(np.float64))
    return scale * float(np.einsum("bqhd,bkhd->bhqk", np.abs(q.astype(np.float64)), ak).max()) + np.log(k.shape[1])


def check_errors(xp, shape=(2, 256, 256, 4, 2, 64)):
    """Prints the error and bound of every tensor per (dtype, causal) row; returns the failed rows."""
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = shape
    scale = 1.0 / np.sqrt(headdim)
    print(
        f"accuracy vs the float64 reference  (batch={batch}, seqlen_q={seqlen_q}, seqlen_k={seqlen_k}, "
        f"nheads={nheads}, nheads_kv={nheads_kv}, headdim={headdim})\n"
        "  rule: max|ours - ref| <= F x max|naive - ref| + floor, naive = full-matrix attention in the input\n"
        "  dtype; F = 2 for out, lse and 3 for dq, dk, dv; floor = 4 (out) or 8 (dq, dk, dv) x (eps + eps_c L)\n"
        "  x max|ref|, 4 x eps_c (L + 1) for lse (python -m cupyflash --help explains)"
    )
    print(f"  {'dtype':9} {'causal':6} {'':5} " + " ".join(f"{t:>9}" for t in TENSORS))
    rng = np.random.default_rng(0)
    failed = []
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        if xp is not np and np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
            try:  # cupy may not support ml_dtypes.bfloat16 arrays
                xp.asarray(np.zeros(1, dtype))
            except Exception as exc:
                print(f"  {name:9} SKIP: cupy cannot hold it ({type(exc).__name__}: {exc})")
                continue
        eps = float(ml_dtypes.finfo(dtype).eps)
        eps_c = float(np.finfo(np.float64 if np.dtype(dtype) == np.float64 else np.float32).eps)
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
            refs = (ref_out, ref_lse, *reference.attention_backward(host[3], *host[:3], ref_out, ref_lse,
                                                                    causal=causal))
            naive = naive_attention(*host[:3], host[3], causal, scale)
            logits = logit_scale(*host[:2], scale)
            errors, bounds = [], []
            for tensor, ours, ref, nv, factor, ulps in zip(TENSORS, (out, lse, *grads), refs, naive, FACTORS,
                                                          FLOOR_ULPS):
                ref = np.asarray(ref, np.float64)
                errors.append(float(np.abs(_host(ours).astype(np.float64) - ref).max()))
                naive_error = float(np.abs(nv.astype(np.float64) - ref).max())
                if tensor == "lse":
                    floor = ulps * eps_c * (logits + 1)
                else:
                    floor = ulps * (eps + eps_c * logits) * float(np.abs(ref).max())
                bounds.append(factor * naive_error + floor)
            ok = all(e <= b for e, b in zip(errors, bounds))
            if not ok:
                failed.append(f"{name} causal={causal}")
            print(f"  {name:9} {str(causal):6} error " + " ".join(f"{e:9.2e}" for e in errors)
                  + ("   PASS" if ok else "   FAIL"))
            print(f"  {'':9} {'':6} bound " + " ".join(f"{b:9.2e}" for b in bounds))
    return failed


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
    parser = argparse.ArgumentParser(prog="python -m cupyflash", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="use the NumPy backend even if a GPU is visible")
    parser.add_argument("--version", action="version", version=f"cupyflash {__version__}")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    missing = "--cpu" if args.cpu else gpu_unavailable_reason()
    if missing is None:
        import cupy

        problem = nvrtc_problem(cupy)
        if problem:
            print(f"FAIL: {problem}")
            return 1
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"cupyflash {__version__}, backend: cuda (cupy {cupy.__version__}, device {dev.id}: {gpu})")
        failed = check_errors(cupy)
        memory_gpu(cupy)
    else:
        print(f"cupyflash {__version__}, backend: numpy (tiled NumPy backend; {missing})")
        failed = check_errors(np)
        memory_numpy()
    elapsed = time.perf_counter() - t0
    if failed:
        print(f"FAIL: {len(failed)} row(s) outside the tolerance: {', '.join(failed)}  ({elapsed:.1f} s)")
        return 1
    print(f"PASS: every row within the tolerance  ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
