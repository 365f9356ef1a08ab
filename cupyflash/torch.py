"""cupyflash on PyTorch tensors, with autograd.

    from cupyflash.torch import attention
    out = attention(q, k, v, causal=True)   # q, k, v: torch tensors
    out.sum().backward()                    # q.grad, k.grad, v.grad (and a float attn_mask's grad)

CUDA tensors run the CUDA kernels on CuPy views of the same memory (DLPack, no copy), on torch's
current stream of the tensors' device. CPU tensors run the tiled NumPy backend on NumPy views of
the same memory. Outputs of CUDA calls live in CuPy's memory pool, shared with torch through
DLPack. ``import cupyflash`` does not import torch; this module does.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np

try:
    import torch
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    raise ImportError("cupyflash.torch needs PyTorch: pip install torch") from exc

from . import _api, _validate
from ._streams import external_stream

__all__ = ["attention"]

_FN = "cupyflash.torch.attention"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cupy():
    try:
        import cupy
    except ModuleNotFoundError as exc:
        raise ImportError(
            "cupyflash.torch: CUDA tensors need cupy; from the cupyflash checkout run "
            f"pip install \".[cuda12]\" (or \".[cuda13]\") ({exc})") from exc
    return cupy


@contextlib.contextmanager
def _backend_stream(device: torch.device) -> Iterator[None]:
    """Make torch's current stream of ``device`` CuPy's current stream for the block.

    The kernels are then ordered with torch's work, and the DLPack exchanges inside the block
    (producer and consumer on one stream) need no synchronisation.
    """
    if device.type != "cuda":
        yield
        return
    cupy = _cupy()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), external_stream(cupy, stream.cuda_stream, device.index):
        yield


def _to_array(t: Optional[torch.Tensor]) -> Any:
    """A CuPy (CUDA) or NumPy (CPU) view of ``t``'s memory."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cuda":
        return _cupy().from_dlpack(t)
    if t.dtype == torch.bfloat16:
        # NumPy has no bfloat16 of its own: move the bits as int16 and view them as ml_dtypes'.
        return t.view(torch.int16).numpy().view(_validate.BFLOAT16)
    return t.numpy()


def _to_tensor(x: Any) -> Optional[torch.Tensor]:
    """A torch tensor on the memory of a backend's output."""
    if x is None:
        return None
    if _validate.array_kind(x) == "cupy":
        return torch.from_dlpack(x)
    if x.dtype == _validate.BFLOAT16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _check_tensors(q: Any, named: Tuple[Tuple[str, Any], ...]) -> None:
    """Tensors of a dtype cupyflash takes, all on q's device (the backend checks the rest)."""
    for name, t in (("q", q),) + named:
        if t is None and name in ("attn_mask", "alibi_slopes", "learnable_sink"):
            continue
        if not isinstance(t, torch.Tensor):
            _validate._fail(TypeError, _FN, name, "must be a torch.Tensor", _validate._type_name(t))
        if t.dtype not in _FLOATS and not (name == "attn_mask" and t.dtype == torch.bool):
            expected = "float16, bfloat16, float32 or float64" + (" or bool" if name == "attn_mask" else "")
            _validate._fail(TypeError, _FN, f"{name}.dtype", f"must be {expected}", t.dtype)
        if name == "q" and q.device.type not in ("cuda", "cpu"):
            _validate._fail(ValueError, _FN, "q.device", "must be a CUDA device or the CPU", q.device)
        if t.device != q.device:
            _validate._fail(ValueError, _FN, f"{name}.device", f"must equal q.device={q.device}", t.device)


class _Attention(torch.autograd.Function):
    """out, lse = attention(q, k, v, attn_mask, alibi_slopes, learnable_sink, **options); lse is not
    differentiable."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                alibi_slopes: Optional[torch.Tensor], learnable_sink: Optional[torch.Tensor], options: Dict[str, Any],
                deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        with _backend_stream(q.device):
            out, lse = _api.attention(_to_array(q), _to_array(k), _to_array(v), attn_mask=_to_array(attn_mask),
                                      alibi_slopes=_to_array(alibi_slopes), learnable_sink=_to_array(learnable_sink),
                                      return_lse=True, **options)
            out, lse = _to_tensor(out), _to_tensor(lse)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, learnable_sink)
        ctx.options, ctx.deterministic = options, deterministic
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an unused out gives dout None: nothing to compute
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Optional[torch.Tensor], dlse: Optional[torch.Tensor]) -> Tuple[Any, ...]:
        del dlse  # lse is non-differentiable
        if dout is None:
            return (None,) * 8
        q, k, v, out, lse, attn_mask, alibi_slopes, learnable_sink = ctx.saved_tensors
        want_dbias = attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3]
        want_dsink = learnable_sink is not None and ctx.needs_input_grad[5]
        with _backend_stream(q.device):
            grads = _api.attention_backward(
                _to_array(dout), _to_array(q), _to_array(k), _to_array(v), _to_array(out), _to_array(lse),
                attn_mask=_to_array(attn_mask), alibi_slopes=_to_array(alibi_slopes),
                learnable_sink=_to_array(learnable_sink), deterministic=ctx.deterministic, return_dbias=want_dbias,
                return_dsink=want_dsink, **ctx.options)
            grads = [_to_tensor(g) for g in grads]
        dq, dk, dv = (g if need else None for g, need in zip(grads[:3], ctx.needs_input_grad[:3]))
        return dq, dk, dv, grads[3] if want_dbias else None, None, grads[-1] if want_dsink else None, None, None


# Dynamo cannot trace CuPy or NumPy calls: one clean graph break here, rather than several inside.
@torch.compiler.disable
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
              learnable_sink: Optional[torch.Tensor] = None, return_lse: bool = False, layout: str = "bshd",
              deterministic: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`cupyflash.attention` on torch tensors, differentiable by autograd.

    q: (batch, seqlen_q, nheads, headdim), k and v: (batch, seqlen_k, nheads_kv, headdim); with
    ``layout="bhsd"`` (batch, nheads, seqlen, headdim), torch SDPA's layout. float16, bfloat16,
    float32 or float64, all on one device: a CUDA device (CUDA kernels, on torch's current
    stream) or the CPU (NumPy backend). The keywords mean what they mean for
    :func:`cupyflash.attention` (docs/variants.md); ``attn_mask`` follows SDPA: bool (True =
    takes part) or float (added to the score), broadcastable to (batch, nheads, seqlen_q,
    seqlen_k). Unlike SDPA's ``is_causal``, ``causal=True`` is bottom-right aligned when
    ``seqlen_q != seqlen_k``.

    Gradients flow to q, k, v, to a float ``attn_mask`` (summed over its broadcast
    dimensions) and to ``learnable_sink`` (nheads,) (of any float dtype: it is cast to the accumulation
    dtype, float32 or float64 for float64 inputs, through autograd), not to ``alibi_slopes``; the backward is
    not itself differentiable.
    ``deterministic`` is passed to :func:`cupyflash.attention_backward`. With ``dropout_p > 0``
    and no ``dropout_seed``, a seed is drawn from torch's default CPU generator (so
    ``torch.manual_seed`` makes runs repeatable), and the backward replays the same dropout.

    Returns ``out`` (q's shape, layout and dtype), or ``(out, lse)`` with ``return_lse=True``;
    lse is (batch, nheads, seqlen_q) float32 (float64 for float64 inputs) and carries no gradient.
    """
    _check_tensors(q, (("k", k), ("v", v), ("attn_mask", attn_mask), ("alibi_slopes", alibi_slopes),
                       ("learnable_sink", learnable_sink)))
    deterministic = _validate.check_flag(_FN, "deterministic", deterministic)
    if (dropout_seed is None and isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool)
            and dropout_p > 0):
        hi, lo = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
        dropout_seed = (hi << 32) | lo
    options = dict(causal=causal, scale=scale, window_size=window_size, softcap=softcap, dropout_p=dropout_p,
                   dropout_seed=dropout_seed, layout=layout)
    if learnable_sink is not None:  # the kernels read the accumulation dtype; the cast stays in the graph
        learnable_sink = learnable_sink.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    out, lse = _Attention.apply(q, k, v, attn_mask, alibi_slopes, learnable_sink, options, deterministic)
    return (out, lse) if return_lse else out
