"""Bad arguments raise TypeError/ValueError naming the argument."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import cupyflash
from cupyflash import _api, _validate

B, SQ, SK, H, HKV, D = 2, 5, 7, 4, 2, 8


def arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, SQ, H, D)).astype(dtype)
    k = rng.standard_normal((B, SK, HKV, D)).astype(dtype)
    v = rng.standard_normal((B, SK, HKV, D)).astype(dtype)
    return q, k, v


def backward_args(dtype=np.float32):
    q, k, v = arrays(dtype)
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    dout = np.ones_like(out) * 0.5
    return dout, q, k, v, out, lse


class FakeCupyArray:
    """Looks like a cupy.ndarray to the dispatcher (no GPU needed)."""

    __module__ = "cupy._fake"

    def __init__(self, x, device_id=0, ptr=0):
        self._x = x
        self.shape, self.strides, self.ndim, self.dtype = x.shape, x.strides, x.ndim, x.dtype
        self.device = type("Device", (), {"id": device_id})()
        self.data = type("MemoryPointer", (), {"ptr": ptr})()


def test_valid_call_works():
    q, k, v = arrays()
    assert cupyflash.attention(q, k, v).shape == q.shape


@pytest.mark.parametrize("fn", ["attention", "attention_vjp"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_array(fn, which):
    args = list(arrays())
    args[which] = args[which].tolist()
    name = "qkv"[which]
    with pytest.raises(TypeError, match=rf"{fn}: {name} must be a numpy.ndarray or cupy.ndarray, got list"):
        getattr(cupyflash, fn)(*args)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_wrong_rank(which):
    args = list(arrays())
    args[which] = args[which][0]
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"attention: {name} must have 4 dimensions .* got 3 dimensions"):
        cupyflash.attention(*args)


def test_batch_mismatch():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape(f"k.shape[0] (batch) must equal q.shape[0]={B}, got 1")):
        cupyflash.attention(q, k[:1], v[:1])


def test_headdim_mismatch():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape(f"attention: k.shape[3] (headdim) must equal q.shape[3]={D}, got 4")):
        cupyflash.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match=re.escape("v.shape[3] (headdim)")):
        cupyflash.attention(q, k, v[..., :4])


def test_seqlen_mismatch_between_k_and_v():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape(f"v.shape[1] (seqlen_k) must equal k.shape[1]={SK}, got 3")):
        cupyflash.attention(q, k, v[:, :3])


def test_nheads_kv_mismatch_between_k_and_v():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape(f"v.shape[2] (nheads_kv) must equal k.shape[2]={HKV}, got 1")):
        cupyflash.attention(q, k, v[:, :, :1])


def test_nheads_not_multiple_of_nheads_kv():
    q, k, v = arrays()
    k3 = np.concatenate([k, k[:, :, :1]], axis=2)
    v3 = np.concatenate([v, v[:, :, :1]], axis=2)
    with pytest.raises(ValueError, match=re.escape(f"k.shape[2] (nheads_kv) must divide q.shape[2] (nheads)={H}, got 3")):
        cupyflash.attention(q, k3, v3)


@pytest.mark.parametrize("which", [1, 2])
def test_dtype_mismatch(which):
    args = list(arrays())
    args[which] = args[which].astype(np.float64)
    name = "qkv"[which]
    with pytest.raises(TypeError, match=rf"{name}.dtype must equal q.dtype=float32, got float64"):
        cupyflash.attention(*args)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.complex128, np.longdouble, np.uint8])
def test_unsupported_dtype(dtype):
    q, k, v = (x.astype(dtype) for x in arrays(np.float64))
    if np.dtype(dtype) == np.float64:  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match=r"attention: q.dtype must be float16, bfloat16, float32 or float64, got"):
        cupyflash.attention(q, k, v)


@pytest.mark.parametrize("headdim", [0, 257, 512])
def test_bad_headdim(headdim):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 3, 1, headdim)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"q.shape\[3\] \(headdim\) must be between 1 and 256, got {headdim}"):
        cupyflash.attention(q, q, q)


def test_seqlen_q_zero():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape("q.shape[1] (seqlen_q) must be at least 1, got 0")):
        cupyflash.attention(q[:, :0], k, v)


def test_seqlen_k_zero():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape("k.shape[1] (seqlen_k) must be at least 1, got 0")):
        cupyflash.attention(q, k[:, :0], v[:, :0])


def test_batch_zero():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape("q.shape[0] (batch) must be at least 1, got 0")):
        cupyflash.attention(q[:0], k[:0], v[:0])


def test_nheads_zero():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=re.escape("q.shape[2] (nheads) must be at least 1, got 0")):
        cupyflash.attention(q[:, :, :0], k, v)


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), 10**400])
def test_bad_scale_value(scale):
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"attention: scale must be a finite positive real number, got"):
        cupyflash.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [True, False, np.bool_(True), "0.5", b"1", [0.5], 1 + 0j, np.array([0.5])])
def test_bad_scale_type(scale):
    q, k, v = arrays()
    with pytest.raises(TypeError, match=r"attention: scale must be a finite positive real number or None, got"):
        cupyflash.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [1, 0.25, np.float32(0.5), np.float64(0.1), np.int64(2)])
def test_good_scale(scale):
    q, k, v = arrays()
    out = cupyflash.attention(q, k, v, scale=scale)
    np.testing.assert_array_equal(out, cupyflash.attention(q, k, v, scale=float(scale)))


def test_backward_dout_shape_and_dtype():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(ValueError, match=re.escape(f"attention_backward: dout.shape must equal q.shape={q.shape}")):
        cupyflash.attention_backward(dout[:, :2], q, k, v, out, lse)
    with pytest.raises(TypeError, match=r"attention_backward: dout.dtype must equal q.dtype=float32, got float64"):
        cupyflash.attention_backward(dout.astype(np.float64), q, k, v, out, lse)


def test_backward_out_shape_and_dtype():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(ValueError, match=re.escape("attention_backward: out.shape must equal q.shape")):
        cupyflash.attention_backward(dout, q, k, v, out[:, :2], lse)
    with pytest.raises(TypeError, match=r"attention_backward: out.dtype must equal q.dtype=float32, got float16"):
        cupyflash.attention_backward(dout, q, k, v, out.astype(np.float16), lse)


def test_backward_lse_shape():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(ValueError, match=re.escape(f"lse.shape must be (batch, nheads, seqlen_q)={(B, H, SQ)}, got {(B, SQ, H)}")):
        cupyflash.attention_backward(dout, q, k, v, out, lse.transpose(0, 2, 1))


def test_backward_lse_dtype():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(TypeError, match=r"lse.dtype must be float32 for float32 inputs, got float64"):
        cupyflash.attention_backward(dout, q, k, v, out, lse.astype(np.float64))
    dout, q, k, v, out, lse = backward_args(np.float64)
    with pytest.raises(TypeError, match=r"lse.dtype must be float64 for float64 inputs, got float32"):
        cupyflash.attention_backward(dout, q, k, v, out, lse.astype(np.float32))


def test_backward_non_array_arguments():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(TypeError, match=r"attention_backward: lse must be a numpy.ndarray or cupy.ndarray, got list"):
        cupyflash.attention_backward(dout, q, k, v, out, lse.tolist())
    with pytest.raises(TypeError, match=r"attention_backward: dout must be"):
        cupyflash.attention_backward(None, q, k, v, out, lse)


def test_vjp_checks_dout():
    q, k, v = arrays()
    _, vjp = cupyflash.attention_vjp(q, k, v)
    with pytest.raises(ValueError, match=r"attention_vjp.vjp: dout.shape must equal q.shape"):
        vjp(q[:, :1])


def test_error_writes_nothing():
    dout, q, k, v, out, lse = backward_args()
    before = [x.copy() for x in (dout, q, k, v, out, lse)]
    with pytest.raises(TypeError):
        cupyflash.attention_backward(dout, q, k, v, out, lse.astype(np.float64))
    for x, y in zip(before, (dout, q, k, v, out, lse)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("which", [1, 2])
def test_mixed_numpy_and_cupy(which):
    args = list(arrays())
    args[which] = FakeCupyArray(args[which])
    name = "qkv"[which]
    with pytest.raises(TypeError, match=rf"attention: {name} must be a numpy array like q .* got a cupy array"):
        cupyflash.attention(*args)


def test_mixed_in_backward_names_argument():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(TypeError, match=r"attention_backward: dout must be a numpy array like q"):
        cupyflash.attention_backward(FakeCupyArray(dout), q, k, v, out, lse)


def test_cupy_arrays_on_different_devices():
    q, k, v = (FakeCupyArray(x) for x in arrays())
    v.device = type("Device", (), {"id": 1})()
    with pytest.raises(ValueError, match=r"attention: v and q must be on the same device \(q is on device 0\), got v on device 1"):
        cupyflash.attention(q, k, v)


def test_missing_cupy_gives_install_hint(monkeypatch):
    """If the CUDA backend cannot import cupy, the error says what to install."""

    class NoCupy:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "cupyflash._cuda_backend":
                raise ModuleNotFoundError("No module named 'cupy'", name="cupy")
            return None

    monkeypatch.delitem(sys.modules, "cupyflash._cuda_backend", raising=False)
    monkeypatch.delattr(cupyflash, "_cuda_backend", raising=False)
    monkeypatch.setattr(_api, "_BACKENDS", {})  # as in a process that has not imported a backend yet
    monkeypatch.setattr(sys, "meta_path", [NoCupy()] + sys.meta_path)
    with pytest.raises(ImportError, match=re.escape("pip install \".[cuda12]\" (or \".[cuda13]\")")):
        _api._backend("cupy")


# ---- the variant keywords, layout and flags


def _bad(exc, pattern, fn="attention", **kw):
    q, k, v = arrays()
    with pytest.raises(exc, match=pattern):
        getattr(cupyflash, fn)(q, k, v, **kw)


@pytest.mark.parametrize("flag", ["causal", "return_lse"])
@pytest.mark.parametrize("value", ["no", 1, None, np.array([True, False])], ids=["str", "int", "None", "array"])
def test_flags_take_bools_only(flag, value):
    _bad(TypeError, rf"attention: {flag} must be a bool, got", **{flag: value})


def test_numpy_bool_flag_is_accepted():
    q, k, v = arrays()
    assert np.array_equal(cupyflash.attention(q, k, v, causal=np.bool_(True)), cupyflash.attention(q, k, v, causal=True))


def test_scale_of_any_real_scalar_type():
    import ml_dtypes

    q, k, v = arrays()
    ref = cupyflash.attention(q, k, v, scale=0.5)
    for scale in (np.float16(0.5), ml_dtypes.bfloat16(0.5), np.float32(0.5), 0.5):
        assert np.array_equal(cupyflash.attention(q, k, v, scale=scale), ref)


def test_scale_beyond_the_compute_dtype():
    _bad(ValueError, r"attention: scale must be finite in the compute dtype float32 .* got 1e\+39", scale=1e39)
    q, k, v = arrays(np.float64)
    assert np.isfinite(cupyflash.attention(q * 1e-40, k, v, scale=1e39)).all()


def test_byte_swapped_dtype_names_the_byte_order():
    q, k, v = arrays()
    with pytest.raises(TypeError, match=r"q.dtype must be in the machine's byte order, got >f4 \(byte-swapped float32\)"):
        cupyflash.attention(q.astype(">f4"), k, v)


def test_layout():
    _bad(ValueError, r"attention: layout must be one of 'bshd', 'bhsd', got 'bsdh'", layout="bsdh")
    q, k, v = arrays()
    t = [x.swapaxes(1, 2).copy() for x in (q, k, v)]
    out = cupyflash.attention(*t, layout="bhsd")
    assert out.shape == t[0].shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out.swapaxes(1, 2), cupyflash.attention(q, k, v))
    with pytest.raises(ValueError, match=re.escape("k.shape[1] (nheads_kv) must divide q.shape[1] (nheads)=4, got 3")):
        cupyflash.attention(t[0], t[1][:, :1].repeat(3, 1), t[2][:, :1].repeat(3, 1), layout="bhsd")


@pytest.mark.parametrize("window, exc, pattern", [
    ((-2, 0), ValueError, r"window_size\[0\] must be >= -1 \(-1 = unbounded\), got -2"),
    ((3, -5), ValueError, r"window_size\[1\] must be >= -1"),
    ((1.5, 0), TypeError, r"window_size\[0\] must be an int >= -1, got 1.5"),
    (3, TypeError, r"window_size must be a pair \(left, right\) of ints, got 3"),
    ((1, 2, 3), TypeError, r"window_size must be a pair"),
])
def test_bad_window(window, exc, pattern):
    _bad(exc, pattern, window_size=window)


@pytest.mark.parametrize("softcap", [-1.0, float("inf"), float("nan")])
def test_bad_softcap(softcap):
    _bad(ValueError, r"attention: softcap must be a finite real number >= 0 \(0 = off\), got", softcap=softcap)


def test_bad_alibi():
    _bad(TypeError, r"alibi_slopes.dtype must be float32, got float64", alibi_slopes=np.ones(H))
    _bad(ValueError, rf"alibi_slopes.shape must be \(nheads,\)=\({H},\) or \(batch, nheads\)=\({B}, {H}\), got \(3,\)",
         alibi_slopes=np.ones(3, np.float32))
    _bad(TypeError, r"alibi_slopes must be a numpy.ndarray or cupy.ndarray, got list", alibi_slopes=[1.0] * H)


def test_bad_learnable_sink():
    _bad(TypeError, r"learnable_sink.dtype must be float32 for float32 inputs \(the accumulation dtype\), got int64",
         learnable_sink=np.ones(H, np.int64))
    _bad(TypeError, r"learnable_sink.dtype must be float32 .*, got float64", learnable_sink=np.ones(H))
    _bad(TypeError, r"learnable_sink.dtype must be float32 .*, got >f4 \(byte-swapped float32\)",
         learnable_sink=np.ones(H, ">f4"))
    _bad(ValueError, rf"learnable_sink.shape must be \(nheads,\)=\({H},\), got \({B}, {H}\)",
         learnable_sink=np.ones((B, H), np.float32))
    _bad(TypeError, r"learnable_sink must be a numpy.ndarray or cupy.ndarray, got list", learnable_sink=[0.0] * H)


def test_return_dsink_needs_a_sink():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(ValueError, match=r"attention_backward: return_dsink needs learnable_sink .* got learnable_sink=None"):
        cupyflash.attention_backward(dout, q, k, v, out, lse, return_dsink=True)
    with pytest.raises(ValueError, match=r"attention_vjp: return_dsink needs learnable_sink"):
        cupyflash.attention_vjp(q, k, v, return_dsink=True)
    with pytest.raises(TypeError, match=r"return_dsink must be a bool"):
        cupyflash.attention_vjp(q, k, v, learnable_sink=np.zeros(H, np.float32), return_dsink="yes")


def test_bad_mask():
    _bad(TypeError, r"attn_mask.dtype must be bool or float16, bfloat16, float32 or float64, got int32",
         attn_mask=np.ones((SQ, SK), np.int32))
    _bad(ValueError, rf"attn_mask.shape must broadcast to \(batch, nheads, seqlen_q, seqlen_k\)=\({B}, {H}, {SQ}, {SK}\), "
                     rf"got \({SQ}, {SK + 1}\)", attn_mask=np.ones((SQ, SK + 1), bool))
    _bad(ValueError, r"attn_mask.shape must broadcast", attn_mask=np.ones((1, 1, 1, SQ, SK), bool))


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(dropout_p=1.0, dropout_seed=0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1, dropout_seed=0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=0.1), ValueError, r"dropout_seed must be given \(an int in \[0, 2\*\*64\)\) when dropout_p > 0"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError, r"dropout_seed must be an int in \[0, 2\*\*64\), got 1.5"),
    (dict(dropout_p=0.1, dropout_seed=True), TypeError, r"dropout_seed must be an int"),
    (dict(dropout_p=0.1, dropout_seed=2**64), ValueError, r"dropout_seed must be an int in \[0, 2\*\*64\)"),
])
def test_bad_dropout(kw, exc, pattern):
    _bad(exc, pattern, **kw)


def test_return_dbias_needs_a_float_mask():
    dout, q, k, v, out, lse = backward_args()
    with pytest.raises(ValueError, match=r"attention_backward: return_dbias needs a float attn_mask .* got attn_mask=None"):
        cupyflash.attention_backward(dout, q, k, v, out, lse, return_dbias=True)
    with pytest.raises(ValueError, match=r"return_dbias needs a float attn_mask .* got attn_mask=a bool mask"):
        cupyflash.attention_vjp(q, k, v, attn_mask=np.ones((SQ, SK), bool), return_dbias=True)


def test_a_rejected_call_writes_nothing():
    """Validation runs before any work: even out-of-place errors leave the inputs untouched."""
    q, k, v = arrays()
    before = [x.copy() for x in (q, k, v)]
    with pytest.raises(ValueError):
        cupyflash.attention(q, k, v, dropout_p=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(before, (q, k, v)))


def test_a_check_is_reused_only_for_a_call_alike():
    """attention and attention_backward check a call of CuPy arrays once per signature: the arrays' devices,
    shapes, strides and dtypes and each scalar with its type, so that 1 does not pass for True nor -1.0 for -1,
    and ALiBi's slopes and a learnable sink by their addresses too; NumPy arrays or an attn_mask are checked
    every time."""
    q, k, v = (FakeCupyArray(x) for x in arrays())
    plain = _api._packed(None, None, None, None)

    def key(*scalars, arrays=(q, k, v), slopes=None, mask=None, sink=None, packed=plain):
        return _api._signature(arrays, ("attention", *scalars), slopes, mask, sink, packed)[0]

    assert key(True, (-1, -1)) == key(True, (-1, -1))
    assert key(True, (-1, -1)) != key(1, (-1, -1))
    assert key(False, (-1, -1)) != key(False, (-1.0, -1))
    assert key(False, (-1, -1)) != key(False, [-1, -1])
    assert key(True, arrays=(q, k, FakeCupyArray(arrays()[2], device_id=1))) != key(True)
    assert key(True, arrays=arrays()) is None
    assert key(True, mask=q) is None
    sink, slopes = (FakeCupyArray(np.zeros(H, np.float32), ptr=ptr) for ptr in (256, 512))
    assert key(True, sink=sink) == key(True, sink=FakeCupyArray(np.zeros(H, np.float32), ptr=256))
    assert key(True, sink=sink) != key(True, sink=FakeCupyArray(np.zeros(H, np.float32), ptr=1024))
    assert key(True, sink=sink) != key(True, slopes=sink) != key(True)
    assert key(True, slopes=slopes, sink=sink) != key(True, slopes=sink, sink=slopes)
    assert key(True, sink=np.zeros(H, np.float32)) is None
    # a packed call's key holds its offsets' contents and its max_seqlen scalars with their types
    offsets = np.array([0, 3, 5], np.int32)

    def packed(cu=offsets, longest=None):
        return _api._packed(cu, cu, longest, longest)

    assert key(True, packed=packed()) == key(True, packed=packed(offsets.copy()))
    assert key(True, packed=packed()) != key(True, packed=packed(np.array([0, 2, 5], np.int32)))
    assert key(True, packed=packed(longest=3)) != key(True, packed=packed(longest=3.0))
    assert key(True, packed=packed(offsets.astype(np.int64))) is None  # checked every time: the check says why
    verdicts = []
    assert _validate.memoized(("k",), lambda: verdicts.append(1) or "spec") == "spec"
    assert _validate.memoized(("k",), lambda: verdicts.append(2) or "other") == "spec"
    assert verdicts == [1]
    with pytest.raises(ValueError):
        _validate.memoized(("bad",), lambda: _validate._fail(ValueError, "attention", "x", "must be", 1))
    assert ("bad",) not in _validate._VERDICTS
