"""cupyflash on JAX arrays: differentiable, and usable under ``jax.jit`` and ``jax.vmap``.

    from cupyflash.jax import attention
    out = jax.jit(attention, static_argnames="causal")(q, k, v, causal=True)
    dq = jax.grad(lambda q: attention(q, k, v).sum())(q)

Each pass is a ``jax.experimental.buffer_callback``: XLA calls it with its input and output
buffers and, on a GPU, its compute stream, in eager mode and inside compiled code alike. GPU
buffers run the CUDA kernels on CuPy views of them, on XLA's stream; CPU buffers run the NumPy
backend on NumPy views. cupyflash allocates its own results (CuPy's memory pool on a GPU) and
copies them once into XLA's output buffers. ``import cupyflash`` does not import jax; this
module does.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.experimental.buffer_callback import buffer_callback
except ModuleNotFoundError as exc:
    if exc.name is None or not exc.name.startswith("jax"):
        raise
    raise ImportError("cupyflash.jax needs JAX with jax.experimental.buffer_callback: pip install -U jax "
                      f"({exc})") from exc

from . import _api, _validate
from ._streams import external_stream

__all__ = ["attention"]

_FN = "cupyflash.jax.attention"
_KDL_CUDA = 2  # DLPack's device type of CUDA memory
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
Options = Tuple[Tuple[str, Any], ...]  # the keywords of a call, hashable


@contextlib.contextmanager
def _backend_arrays(ctx: Any, device_buffer: Any) -> Iterator[Callable[[Any], Any]]:
    """Yield a function that views an XLA buffer as a CuPy (GPU) or NumPy (CPU) array.

    On a GPU, XLA's compute stream is CuPy's current stream for the block, so the kernels run in
    XLA's order and the DLPack exchanges need no synchronisation.
    """
    device_type, device_id = device_buffer.__dlpack_device__()
    if device_type != _KDL_CUDA:
        yield np.asarray
        return
    import cupy

    with cupy.cuda.Device(device_id), external_stream(cupy, ctx.stream, device_id):
        yield cupy.from_dlpack


def _copy_into(dst: Any, src: Any) -> None:
    """``dst[...] = src`` as raw bits: one copy that works for every dtype, bfloat16 included."""
    dst.view(_UINT[dst.itemsize])[...] = src.view(_UINT[src.itemsize])


def _keywords(options: Options, seed: Any, asarray: Callable[[Any], Any]) -> dict:
    """The call's keywords, with a traced seed read from its buffer (8 bytes to the host, once
    XLA's earlier work on the stream is done)."""
    keywords = dict(options)
    if seed is not None:
        value = asarray(seed)
        if _validate.array_kind(value) == "cupy":
            value = value.get()
        keywords["dropout_seed"] = int(value) % 2**64
    return keywords


# The callback is a parameter of the primitive: one callable per set of options, or each eager
# call with equal options would compile again.
@functools.lru_cache(maxsize=None)
def _forward_callback(options: Options) -> Callable[..., None]:
    def callback(ctx, outs, q, k, v, attn_mask, alibi_slopes, learnable_sink, seed):
        with _backend_arrays(ctx, q) as asarray:
            q, k, v, attn_mask, alibi_slopes, learnable_sink = (
                None if x is None else asarray(x) for x in (q, k, v, attn_mask, alibi_slopes, learnable_sink))
            results = _api.attention(q, k, v, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                                     learnable_sink=learnable_sink, return_lse=True,
                                     **_keywords(options, seed, asarray))
            for dst, src in zip(outs, results):
                _copy_into(asarray(dst), src)
    return callback


@functools.lru_cache(maxsize=None)
def _backward_callback(options: Options, deterministic: bool, want_dbias: bool,
                       want_dsink: bool) -> Callable[..., None]:
    def callback(ctx, outs, dout, q, k, v, out, lse, attn_mask, alibi_slopes, learnable_sink, seed):
        with _backend_arrays(ctx, q) as asarray:
            *arrays, attn_mask, alibi_slopes, learnable_sink = (
                None if x is None else asarray(x)
                for x in (dout, q, k, v, out, lse, attn_mask, alibi_slopes, learnable_sink))
            grads = _api.attention_backward(*arrays, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                                            learnable_sink=learnable_sink, deterministic=deterministic,
                                            return_dbias=want_dbias, return_dsink=want_dsink,
                                            **_keywords(options, seed, asarray))
            for dst, src in zip(outs, grads):
                _copy_into(asarray(dst), src)
    return callback


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _run_forward(options, lse_shape, q, k, v, attn_mask, alibi_slopes, learnable_sink, seed):
    shapes = (_struct(q), jax.ShapeDtypeStruct(lse_shape, _validate.lse_dtype(q.dtype)))
    return buffer_callback(_forward_callback(options), shapes, vmap_method="sequential")(
        q, k, v, attn_mask, alibi_slopes, learnable_sink, seed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(options, lse_shape, deterministic, q, k, v, attn_mask, alibi_slopes, learnable_sink, seed):
    return _run_forward(options, lse_shape, q, k, v, attn_mask, alibi_slopes, learnable_sink, seed)


def _attention_fwd(options, lse_shape, deterministic, q, k, v, attn_mask, alibi_slopes, learnable_sink, seed):
    # With symbolic_zeros=True each primal comes as CustomVJPPrimal(value, perturbed), which says
    # whether the mask and the sink are differentiated: dbias takes memory of the mask's size, so only then.
    want_dbias = (attn_mask is not None and attn_mask.perturbed
                  and jnp.issubdtype(attn_mask.value.dtype, jnp.floating))
    want_dsink = learnable_sink is not None and learnable_sink.perturbed
    q, k, v, attn_mask, alibi_slopes, learnable_sink, seed = (
        None if x is None else x.value for x in (q, k, v, attn_mask, alibi_slopes, learnable_sink, seed))
    out, lse = _run_forward(options, lse_shape, q, k, v, attn_mask, alibi_slopes, learnable_sink, seed)
    # The mask's and the sink's slots (static parts of the residuals' structure) carry want_dbias and
    # want_dsink to the backward.
    masks = (attn_mask, None) if want_dbias else (None, attn_mask)
    sinks = (learnable_sink, None) if want_dsink else (None, learnable_sink)
    return (out, lse), (q, k, v, out, lse, masks, alibi_slopes, sinks, seed)


def _attention_bwd(options, lse_shape, deterministic, residuals, cotangents):
    del lse_shape
    q, k, v, out, lse, (dbias_mask, plain_mask), alibi_slopes, (dsink_sink, plain_sink), seed = residuals
    dout = cotangents[0]  # lse leaves through stop_gradient: its cotangent is zero
    if isinstance(dout, jax.custom_derivatives.SymbolicZero):
        return (None,) * 7
    want_dbias, want_dsink = dbias_mask is not None, dsink_sink is not None
    attn_mask = dbias_mask if want_dbias else plain_mask
    learnable_sink = dsink_sink if want_dsink else plain_sink
    wanted = (q, k, v) + ((attn_mask,) if want_dbias else ()) + ((learnable_sink,) if want_dsink else ())
    grads = buffer_callback(_backward_callback(options, deterministic, want_dbias, want_dsink),
                            tuple(_struct(x) for x in wanted), vmap_method="sequential")(
        dout, q, k, v, out, lse, attn_mask, alibi_slopes, learnable_sink, seed)
    return (grads[0], grads[1], grads[2], grads[3] if want_dbias else None, None,
            grads[-1] if want_dsink else None, None)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def _stand_in(x: Any) -> Any:
    """A NumPy array of x's shape and dtype that takes no memory, to validate at trace time."""
    return None if x is None else np.broadcast_to(np.zeros((), x.dtype), x.shape)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, scale: Optional[float] = None,
              window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Optional[jax.Array] = None, attn_mask: Optional[jax.Array] = None,
              dropout_p: float = 0.0, dropout_seed: Union[int, jax.Array, None] = None,
              learnable_sink: Optional[jax.Array] = None, return_lse: bool = False, layout: str = "bshd",
              deterministic: bool = False) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """:func:`cupyflash.attention` on JAX arrays, differentiable by ``jax.grad``.

    Shapes, dtypes and keywords as :func:`cupyflash.attention` (docs/variants.md), all arrays on
    one device: a GPU (CUDA kernels, on XLA's stream) or the CPU (NumPy backend). Keywords other
    than arrays must be Python values (static under ``jax.jit``), except ``dropout_seed``: a
    Python int in [0, 2**64), or an integer JAX scalar, which may be traced so that a jitted step
    takes a new seed without compiling again (its value is read on the host, modulo 2**64). JAX
    has no implicit random state: ``dropout_p > 0`` needs ``dropout_seed``.

    Gradients flow to q, k, v, to a float ``attn_mask`` and to ``learnable_sink`` (of any float dtype: it is
    cast to the accumulation dtype, float32 or float64 for float64 inputs, inside the traced function), not to
    ``alibi_slopes`` or ``dropout_seed``; ``deterministic`` is passed to the backward. Under ``jax.vmap`` the passes
    run once per mapped element. Returns ``out``, or ``(out, lse)`` with ``return_lse=True``;
    lse carries no gradient.
    """
    traced_seed = dropout_seed is not None and not isinstance(dropout_seed, (int, np.integer))
    if traced_seed and (not jnp.issubdtype(getattr(dropout_seed, "dtype", np.float64), jnp.integer)
                        or jnp.ndim(dropout_seed) != 0):
        _validate._fail(TypeError, _FN, "dropout_seed", "must be an int or an integer JAX scalar",
                        repr(dropout_seed))
    q, k, v, attn_mask, alibi_slopes, learnable_sink = (None if x is None else jnp.asarray(x)
                                                         for x in (q, k, v, attn_mask, alibi_slopes, learnable_sink))
    if learnable_sink is not None and jnp.issubdtype(learnable_sink.dtype, jnp.floating):
        learnable_sink = learnable_sink.astype(_validate.compute_dtype(q.dtype))  # differentiable, in the trace
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "alibi_slopes": alibi_slopes,
              "learnable_sink": learnable_sink}
    # Every check runs here, at trace time, where an error reads as a Python error, not as a
    # failure inside compiled code.
    stand_ins = {name: _stand_in(x) for name, x in arrays.items()}
    spec = _validate.check_call(_FN, stand_ins.pop("q"), stand_ins.pop("k"), stand_ins.pop("v"), **stand_ins,
                                causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                dropout_p=dropout_p, dropout_seed=0 if traced_seed else dropout_seed, layout=layout)
    return_lse = _validate.check_flag(_FN, "return_lse", return_lse)
    deterministic = _validate.check_flag(_FN, "deterministic", deterministic)
    # The validated values, hashable, key the cached callbacks (spec.window already holds causal's right = 0).
    options = (("causal", spec.causal), ("scale", spec.scale), ("window_size", spec.window),
               ("softcap", spec.softcap), ("dropout_p", spec.dropout_p),
               ("dropout_seed", None if traced_seed else spec.dropout_seed), ("layout", spec.layout))
    seed = jnp.asarray(dropout_seed) if traced_seed else None
    out, lse = _attention(options, (spec.batch, spec.nheads, spec.seqlen_q), deterministic,
                          q, k, v, attn_mask, alibi_slopes, learnable_sink, seed)
    return (out, jax.lax.stop_gradient(lse)) if return_lse else out
