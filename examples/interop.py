"""Zero-copy interop: cupyflash with PyTorch and JAX through DLPack.

    python examples/interop.py

* PyTorch: CuPy <-> torch round trips without copies, then a
  ``torch.autograd.Function`` that runs cupyflash on torch tensors (on torch's
  current stream) and is checked against torch's own
  ``scaled_dot_product_attention`` in float32 and bfloat16, outputs and gradients.
* JAX: CuPy <-> JAX round trips, and cupyflash applied to JAX arrays.

Each part is skipped with a message when its framework (or a GPU) is missing.
"""
import sys

import cupyflash


def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# --------------------------------------------------------------------------- PyTorch

def torch_part():
    import cupy
    import torch

    if not torch.cuda.is_available():
        print("torch: built without CUDA (or no device visible to it); skipped")
        return True

    def to_cupy(t):
        return cupy.from_dlpack(t.detach())

    class FlashAttention(torch.autograd.Function):
        """cupyflash as a torch op on (batch, seqlen, nheads, headdim) tensors."""

        @staticmethod
        def forward(ctx, q, k, v, causal=False, scale=None):
            # Run on torch's current stream so the kernels are ordered with torch's work.
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                out, lse = cupyflash.attention(to_cupy(q), to_cupy(k), to_cupy(v),
                                               causal=causal, scale=scale, return_lse=True)
            out, lse = torch.from_dlpack(out), torch.from_dlpack(lse)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.causal, ctx.scale = causal, scale
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                grads = cupyflash.attention_backward(
                    to_cupy(dout), to_cupy(q), to_cupy(k), to_cupy(v), to_cupy(out), to_cupy(lse),
                    causal=ctx.causal, scale=ctx.scale)
            return (*(torch.from_dlpack(g) for g in grads), None, None)

    # Round trips share memory: same device pointer both ways.
    x = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    t = torch.from_dlpack(x)
    back = cupy.from_dlpack(t)
    assert t.data_ptr() == x.data.ptr == back.data.ptr, "DLPack round trip copied"
    t[0, 0] = 42.0
    torch.cuda.synchronize()
    assert float(x[0, 0]) == 42.0
    print("torch: cupy -> torch -> cupy round trip shares memory (no copy)")

    torch.manual_seed(0)
    ok = True
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        for causal in (False, True):
            b, s, h, d = 2, 512, 4, 64
            q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(4))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            ours = FlashAttention.apply(q, k, v, causal)
            our_grads = torch.autograd.grad(ours, (q, k, v), dout)
            # torch's SDPA wants (batch, heads, seq, dim): transposed views.
            theirs = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
            their_grads = torch.autograd.grad(theirs, (q, k, v), dout)
            errors = []
            for a, ref in zip((ours, *our_grads), (theirs, *their_grads)):
                errors.append(((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
            good = max(errors) < tol
            ok &= good
            print(f"torch: autograd.Function vs SDPA, {str(dtype)[6:]:8s} causal={causal!s:5}: "
                  f"max error / max |ref|  out {errors[0]:.1e}  dq {errors[1]:.1e}  dk {errors[2]:.1e}  "
                  f"dv {errors[3]:.1e}  {'ok' if good else 'MISMATCH'} (tolerance {tol:.0e})")
    return ok


# --------------------------------------------------------------------------- JAX

def jax_part():
    import cupy
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not any(dev.platform == "gpu" for dev in jax.devices()):
        print("jax: no GPU device in jax (CPU-only jaxlib?); skipped")
        return True
    x = cupy.random.standard_normal((2, 256, 4, 64), dtype=cupy.float32)
    j = jax.dlpack.from_dlpack(x)  # cupy -> jax
    same = j.unsafe_buffer_pointer() == x.data.ptr
    y = cupy.from_dlpack(j)  # jax -> cupy
    print(f"jax: cupy -> jax -> cupy round trip, zero-copy: {same and y.data.ptr == x.data.ptr}")

    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 256, 4, 64), dtype=jnp.float32) for kk in key)
    out = jax.dlpack.from_dlpack(cupyflash.attention(*(cupy.from_dlpack(a) for a in (q, k, v)), causal=True))
    ref = cupyflash.reference.attention(np.asarray(q), np.asarray(k), np.asarray(v), causal=True)
    err = float(np.abs(np.asarray(out, dtype=np.float64) - ref).max())
    print(f"jax: cupyflash on jax arrays, max |error| vs reference {err:.1e}")
    return err < 1e-3


def main():
    if not gpu_available():
        print("interop.py: no CUDA GPU; the DLPack examples need one. Skipped.")
        return 0
    ok = True
    for name, part in (("torch", torch_part), ("jax", jax_part)):
        try:
            __import__(name)
        except ImportError:
            print(f"{name}: not installed; skipped")
            continue
        ok &= part()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
