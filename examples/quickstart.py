"""cupyflash in a dozen lines: forward and backward, checked against the float64 reference.

    python examples/quickstart.py           # CuPy arrays on the GPU (float16)
    python examples/quickstart.py --numpy   # NumPy arrays on the CPU (float32); also the fallback without a GPU
"""
import argparse

import numpy as np

import cupyflash
from cupyflash import reference


def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numpy", action="store_true", help="use NumPy arrays (CPU backend)")
    args = parser.parse_args(argv)
    if args.numpy or not gpu_available():
        if not args.numpy:
            print("no GPU visible to cupy, NumPy arrays instead (python -m cupyflash says what is missing)")
        xp, dtype, seqlen = np, np.float32, 256
    else:
        import cupy as xp

        dtype, seqlen = np.float16, 2048

    batch, nheads, nheads_kv, headdim = 2, 8, 2, 64  # grouped-query attention: 4 query heads per kv head
    rng = np.random.default_rng(0)
    q, dout = (xp.asarray(rng.standard_normal((batch, seqlen, nheads, headdim)), dtype=dtype) for _ in "12")
    k, v = (xp.asarray(rng.standard_normal((batch, seqlen, nheads_kv, headdim)), dtype=dtype) for _ in "12")

    out, vjp = cupyflash.attention_vjp(q, k, v, causal=True)  # forward
    dq, dk, dv = vjp(dout)                                    # backward

    ref_out, ref_lse = reference.attention(q, k, v, causal=True, return_lse=True)
    ref_grads = reference.attention_backward(dout, q, k, v, ref_out, ref_lse, causal=True)
    print(f"{xp.__name__} {np.dtype(dtype).name}  q {q.shape}  k/v {k.shape}  causal")
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out, *ref_grads)):
        ours = ours.get() if hasattr(ours, "get") else ours
        err = np.abs(ours.astype(np.float64) - ref).max()
        print(f"  {name}: max |error| vs float64 reference = {err:.2e}  (max |ref| = {np.abs(ref).max():.2f})")


if __name__ == "__main__":
    main()
