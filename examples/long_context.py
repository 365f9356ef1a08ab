"""Forward + backward at a sequence length standard attention cannot even allocate.

    python examples/long_context.py                    # seqlen 262144 (256k), 8 heads, headdim 128, causal, bf16
    python examples/long_context.py --seqlen 65536 --no-causal

cupyflash never materialises the seqlen x seqlen score matrix: memory grows
linearly with seqlen (inputs, outputs, gradients and the logsumexp), while
standard attention needs seqlen^2 * nheads * 4 bytes for the float32 scores
and as much again for the probabilities.  Runs on a CUDA GPU only.
"""
import argparse
import math
import sys

import ml_dtypes
import numpy as np

import cupyflash

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def human(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=262144)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    args = p.parse_args(argv)
    try:
        import cupy
        import cupyx.profiler

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"long_context.py needs a CUDA GPU ({type(exc).__name__}); nothing to do. "
              "python -m cupyflash says what is missing.")
        return 0

    b, s, h, d, causal = args.batch, args.seqlen, args.nheads, args.headdim, args.causal
    dtype = DTYPES[args.dtype]

    def randn(shape, seed):
        cupy.random.seed(seed)
        return cupy.random.standard_normal(shape, dtype=cupy.float32).astype(dtype)

    # Compile the kernels for this dtype/headdim/causal on a small problem first.
    warm = [randn((1, 256, h, d), i) for i in range(4)]
    out, vjp = cupyflash.attention_vjp(*warm[:3], causal=causal)
    vjp(warm[3])
    del warm, out, vjp

    pool = cupy.get_default_memory_pool()
    q, k, v, dout = (randn((b, s, h, d), seed) for seed in range(4))
    inputs = pool.used_bytes()
    pool.free_all_blocks()  # from here on total_bytes() only grows: it ends at the peak

    def fwd():
        return cupyflash.attention(q, k, v, causal=causal, return_lse=True)

    fwd_ms = float(np.median(cupyx.profiler.benchmark(fwd, n_repeat=1, n_warmup=0).gpu_times[0])) * 1e3
    out, lse = fwd()
    bwd_ms = float(np.median(cupyx.profiler.benchmark(
        lambda: cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal),
        n_repeat=1, n_warmup=0).gpu_times[0])) * 1e3
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    cupy.cuda.Device().synchronize()
    peak = pool.total_bytes()

    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    naive = s * s * b * h * 4
    print(f"batch {b}, seqlen {s}, {h} heads, headdim {d}, {args.dtype}, causal={causal}")
    print(f"  forward : {fwd_ms / 1e3:8.2f} s  {flops / fwd_ms / 1e9:7.1f} TFLOP/s")
    print(f"  backward: {bwd_ms / 1e3:8.2f} s  {2.5 * flops / bwd_ms / 1e9:7.1f} TFLOP/s")
    print(f"  memory-pool peak: {human(peak)} (inputs q, k, v, dout: {human(inputs)})")
    print(f"  standard attention would need {human(naive)} for the float32 scores "
          f"and {human(naive)} more for the probabilities ({human(2 * naive)})")

    # Spot check against the float64 reference: head 0, the first and the last 4 queries.
    # Bottom-right causal alignment makes q[:, -4:] against all keys exactly the last rows.
    rows = [(slice(0, 4), slice(0, 4) if causal else slice(None)), (slice(s - 4, s), slice(None))]
    worst = 0.0
    for qs, ks in rows:
        ref = cupyflash.reference.attention(q[:, qs, :1], k[:, ks, :1], v[:, ks, :1], causal=causal)
        worst = max(worst, float(np.abs(out[:, qs, :1].get().astype(np.float64) - ref).max()))
    print(f"  max |out - reference| on spot-checked rows: {worst:.2e}")
    return 0 if math.isfinite(worst) and worst < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
