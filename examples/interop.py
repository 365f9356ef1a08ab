"""Zero-copy interop: cupyflash with PyTorch and JAX.

    python examples/interop.py

* PyTorch: CuPy <-> torch round trips through DLPack share memory; what ``cupyflash.torch``
  does, by hand (DLPack views, torch's stream made CuPy's); then ``cupyflash.torch.attention``,
  an autograd op, checked against torch's own ``scaled_dot_product_attention`` in float32 and
  bfloat16, outputs and gradients, and run on a side stream.
* JAX: CuPy <-> JAX round trips through DLPack, and ``cupyflash.jax.attention`` inside
  ``jax.jit`` and ``jax.grad``, checked against the float64 reference.

Without a GPU, both adapters run on CPU tensors and arrays (cupyflash's NumPy backend), on
smaller problems. Each part is skipped with a message when its framework is missing.
"""
import sys

import numpy as np

import cupyflash


def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def report(what, errors, tol):
    good = max(errors.values()) < tol
    print(f"{what}: max error / max |ref|  " + "  ".join(f"{k} {e:.1e}" for k, e in errors.items())
          + f"  {'ok' if good else 'MISMATCH'} (tolerance {tol:.0e})")
    return good


# --------------------------------------------------------------------------- PyTorch

def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def cupy_stream_of(torch_stream):
    """torch's stream as a CuPy stream (CuPy >= 14 takes the CUDA stream protocol)."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream)


def torch_by_hand():
    """DLPack round trips, and cupyflash on torch tensors without the adapter."""
    import cupy
    import torch

    x = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    t = torch.from_dlpack(x)
    back = cupy.from_dlpack(t)
    assert t.data_ptr() == x.data.ptr == back.data.ptr, "DLPack round trip copied"
    t[0, 0] = 42.0
    torch.cuda.synchronize()
    assert float(x[0, 0]) == 42.0
    print("torch: cupy -> torch -> cupy round trip shares memory (no copy)")

    # What cupyflash.torch does: CuPy views of the tensors, and torch's current stream made CuPy's
    # current stream, so the kernels are ordered with torch's work and DLPack needs no sync.
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    with cupy_stream_of(torch.cuda.current_stream()):
        out = torch.from_dlpack(cupyflash.attention(*(cupy.from_dlpack(x) for x in (q, k, v)), causal=True))
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                           is_causal=True).transpose(1, 2)
    return report("torch: by hand on torch's stream vs SDPA, float16", {"out": rel_err(out, ref)}, 3e-3)


def torch_part(device):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("torch: built without CUDA (or no device visible to it); skipped")
        return True
    from cupyflash.torch import attention

    ok = torch_by_hand() if device == "cuda" else True
    torch.manual_seed(0)
    b, s, h, d = (2, 512, 4, 64) if device == "cuda" else (1, 128, 2, 32)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        for causal in (False, True):
            q, k, v, dout = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(4))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            ours = attention(q, k, v, causal=causal)
            our_grads = torch.autograd.grad(ours, (q, k, v), dout)
            # SDPA wants (batch, heads, seq, dim): transposed views (cupyflash takes layout="bhsd" too).
            theirs = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
            their_grads = torch.autograd.grad(theirs, (q, k, v), dout)
            errors = {name: rel_err(a, ref) for name, a, ref in
                      zip(("out", "dq", "dk", "dv"), (ours, *our_grads), (theirs, *their_grads))}
            ok &= report(f"torch ({device}): cupyflash.torch vs SDPA, {str(dtype)[6:]:8s} causal={causal!s:5}",
                         errors, tol)
    if device == "cuda":
        # On a side stream, the op runs on that stream: no synchronisation needed in between.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # q, k, v were made on the default stream
        with torch.cuda.stream(side):
            q2 = q.detach() * 1  # made on the side stream
            out2 = attention(q2, k.detach(), v.detach(), causal=True)
        side.synchronize()
        ok &= report("torch: the same call on a side stream", {"out": rel_err(out2, ours.detach())}, 1e-6)
    return ok


# --------------------------------------------------------------------------- JAX

def jax_part(device):
    import jax
    import jax.numpy as jnp

    if device == "cuda":
        if not any(dev.platform == "gpu" for dev in jax.devices()):
            print("jax: no GPU device in jax (CPU-only jaxlib?); skipped")
            return True
        import cupy

        x = cupy.random.standard_normal((2, 256, 4, 64), dtype=cupy.float32)
        j = jax.dlpack.from_dlpack(x)  # cupy -> jax
        same = j.unsafe_buffer_pointer() == x.data.ptr
        y = cupy.from_dlpack(j)  # jax -> cupy
        print(f"jax: cupy -> jax -> cupy round trip, zero-copy: {same and y.data.ptr == x.data.ptr}")
    from cupyflash.jax import attention

    shape = (2, 256, 4, 64) if device == "cuda" else (1, 128, 2, 32)
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, dout = (jax.random.normal(kk, shape, dtype=jnp.float32) for kk in key)

    @jax.jit
    def forward_backward(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=True), q, k, v)
        return out, vjp(dout)

    out, (dq, dk, dv) = forward_backward(q, k, v)
    host = [np.asarray(a) for a in (q, k, v, dout)]
    ref, lse = cupyflash.reference.attention(*host[:3], causal=True, return_lse=True)
    ref_grads = cupyflash.reference.attention_backward(host[3], *host[:3], ref, lse, causal=True)
    errors = {name: float(np.abs(np.asarray(a, dtype=np.float64) - r).max() / np.abs(r).max())
              for name, a, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *ref_grads))}
    return report(f"jax ({device}): cupyflash.jax under jit and vjp vs float64 reference", errors, 1e-3)


def main():
    device = "cuda" if gpu_available() else "cpu"
    if device == "cpu":
        print("interop.py: no CUDA GPU; the adapters run on the CPU (NumPy backend), DLPack demos skipped.")
    ok = True
    for name, part in (("torch", torch_part), ("jax", jax_part)):
        try:
            __import__(name)
        except ImportError:
            print(f"{name}: not installed; skipped")
            continue
        ok &= part(device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
