"""The CUDA kernels against the float64 reference, on a GPU (marker `gpu`; skipped without one).

Accuracy follows flash-attn's rule: max|out - ref| <= 2 x max|naive - ref| + a rounding floor
(3x for dq, dk, dv), naive being plain attention in the input dtype; at unit-scale inputs also
||err|| / ||ref|| <= 1e-5 for float32 and 1e-12 for float64. Every output buffer is poisoned
with NaN before the kernels run, so an element they never write fails.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyflash
from helpers import (BFLOAT16, BWD_FLOOR_ULPS, DTYPES, FWD_FLOOR_ULPS, Problem, assert_close_flash_rule, check_relative,
                     error_scales, flash_floor, naive_attention, naive_attention_backward)

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")
from cupyflash import _cuda_backend, _plan  # noqa: E402

SEQLENS = (1, 2, 5, 17, 113, 128, 129, 1023, 1024, 2049)
HEADDIMS = (8, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256)
HEADS = ((4, 4), (4, 2), (4, 1))  # MHA, GQA, MQA as (nheads, nheads_kv)
# One (seqlen_q, seqlen_k, causal) per head dimension: every listed seqlen on both axes,
# seqlen_q > seqlen_k under causal (rows that see no key), and 1 x 1.
SHAPES = ((1, 1, False), (2, 17, True), (5, 2, True), (17, 113, False), (113, 17, True), (128, 128, True),
          (129, 1023, False), (1023, 129, True), (1024, 1024, False), (2049, 1024, True), (128, 2049, False),
          (1024, 5, True), (2049, 2049, True))
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _uint(x):
    return x.view(_UINT[x.dtype.itemsize])


def to_device(x):
    """Host array to the current device, bit for bit (bfloat16 included)."""
    return cp.asarray(_uint(np.ascontiguousarray(x))).view(x.dtype)


def contiguous(x):
    return cp.ascontiguousarray(_uint(x)).view(x.dtype)


def bitwise_equal(a, b):
    return a.shape == b.shape and bool(cp.all(_uint(a) == _uint(b)))


def assert_near(got, want, fraction):
    """max|got - want| within `fraction` of want's largest entry (float sums added in another order)."""
    largest = float(cp.abs(want.astype(cp.float32)).max())
    assert float(cp.abs(got.astype(cp.float32) - want.astype(cp.float32)).max()) <= largest * fraction


def as_float32(x):
    if x.dtype.itemsize == 2 and x.dtype != np.float16:  # bfloat16: the high half of a float32
        return (_uint(x).astype(cp.uint32) << 16).view(cp.float32)
    return x.astype(cp.float32)


def poisoned_empty(shape, dtype):
    """cupy.empty with every bit set: NaN, for the buffers the kernels write."""
    x = cp.empty(shape, dtype)
    _uint(x).fill(np.iinfo(_UINT[x.dtype.itemsize]).max)
    return x


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN (all bits set)."""
    monkeypatch.setattr(_cuda_backend, "_empty", poisoned_empty)


def run(problem):
    """(inputs on the host, outputs on the host) of forward + backward on the GPU."""
    host = problem.arrays()
    q, k, v, dout = (to_device(x) for x in host)
    out, lse = cupyflash.attention(q, k, v, causal=problem.causal, scale=problem.scale, return_lse=True)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=problem.causal, scale=problem.scale)
    cp.cuda.get_current_stream().synchronize()
    return host, {name: x.get() for name, x in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items()}


def check(problem, tf32=False):
    """The flash rule on every output; `tf32`: float32 computed in TF32 (CUPY_TF32=1), whose naive
    counterpart rounds every product's operands to TF32 (no relative bound: TF32 keeps 10 bits)."""
    (q, k, v, dout), got = run(problem)
    causal, scale = problem.causal, problem.scale_value
    ref_out, ref_lse = cupyflash.reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    ref = dict(out=ref_out, lse=ref_lse)
    ref.update(zip(("dq", "dk", "dv"), cupyflash.reference.attention_backward(
        dout, q, k, v, ref_out, ref_lse, causal=causal, scale=scale)))
    naive = dict(zip(("out", "lse"), naive_attention(q, k, v, causal, scale, tf32=tf32)))
    naive.update(zip(("dq", "dk", "dv"), naive_attention_backward(dout, q, k, v, causal, scale, tf32=tf32)))
    scales = error_scales(q, k, v, dout, causal, scale)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert not np.isnan(got[name].astype(np.float64)).any(), f"{name} has NaN: {problem}"
        forward = name in ("out", "lse")
        floor = flash_floor(name, problem.dtype, scales, FWD_FLOOR_ULPS if forward else BWD_FLOOR_ULPS)
        if tf32:  # in TF32's units in the last place, 2^13 of float32's
            floor *= 2.0 ** 13
        assert_close_flash_rule(got[name], ref[name], naive[name], 2 if forward else 3, floor,
                                name=f"{name} of {problem}")
        if not tf32:
            check_relative(name, got[name], ref[name], problem)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", range(len(HEADDIMS)), ids=lambda i: f"d{HEADDIMS[i]}-{SHAPES[i][0]}x{SHAPES[i][1]}")
def test_sweep_against_reference(dtype, case):
    seqlen_q, seqlen_k, causal = SHAPES[case]
    nheads, nheads_kv = HEADS[case % 3]
    logit_std = None if case % 2 == 0 else 25.0  # 25: inputs scaled x5, far past exp's range
    check(Problem(batch=2 if seqlen_q * seqlen_k < 1 << 20 else 1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                  nheads=nheads, nheads_kv=nheads_kv, headdim=HEADDIMS[case], dtype=dtype, causal=causal,
                  scale=None, logit_std=logit_std, seed=case))


@st.composite
def gpu_problems(draw):
    seqlen_q, seqlen_k = draw(st.sampled_from(SEQLENS)), draw(st.sampled_from(SEQLENS))
    nheads, nheads_kv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 3 if seqlen_q * seqlen_k <= 1 << 18 else 1))
    return Problem(batch, seqlen_q, seqlen_k, nheads, nheads_kv, draw(st.sampled_from(HEADDIMS)),
                   draw(st.sampled_from(DTYPES)), draw(st.booleans()),
                   draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
                   draw(st.one_of(st.none(), st.sampled_from([25.0, 1e4]))), draw(st.integers(0, 2**32 - 1)))


@pytest.mark.long_running
@settings(max_examples=60)
@given(problem=gpu_problems())
def test_random_against_reference(problem):
    check(problem)


@pytest.mark.parametrize("dtype, seqlen_q, seqlen_k", [(np.dtype(np.float32), 40, 7)]
                         + [(dtype, 300, 100) for dtype in DTYPES], ids=lambda x: getattr(x, "name", x))
def test_fully_masked_rows(dtype, seqlen_q, seqlen_k):
    """Causal with seqlen_q > seqlen_k: the first rows see no key. At 300 x 100 whole query tiles of the
    Hopper backward see none: no key block writes their dq accumulator (poisoned), and their dq is 0."""
    problem = Problem(2, seqlen_q, seqlen_k, 4, 2, 64, dtype, True, None, None, 1)
    _, got = run(problem)
    dead = slice(0, seqlen_q - seqlen_k)
    assert (got["out"][:, dead] == 0).all() and np.isneginf(got["lse"][:, :, dead]).all()
    assert all(np.isfinite(got[n]).all() for n in ("out", "dq", "dk", "dv"))
    assert (got["dq"][:, dead] == 0).all()


def _inputs(dtype=np.float16, batch=2, seqlen_q=300, seqlen_k=200, nheads=4, nheads_kv=2, headdim=64, seed=0):
    return [to_device(x) for x in Problem(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, True,
                                          None, None, seed).arrays()]


def _forward_backward(q, k, v, dout, causal=True, deterministic=False):
    out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
    return (out, lse, *cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                    deterministic=deterministic))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_deterministic(dtype):
    q, k, v, dout = _inputs(dtype, seqlen_q=700, seqlen_k=900)
    first = _forward_backward(q, k, v, dout, deterministic=True)
    for _ in range(20):
        again = _forward_backward(q, k, v, dout, deterministic=True)
        assert all(bitwise_equal(a, b) for a, b in zip(first, again))


def test_vjp_matches_forward_and_backward():
    q, k, v, dout = _inputs(np.float32)
    out, vjp = cupyflash.attention_vjp(q, k, v, causal=True)
    expected = _forward_backward(q, k, v, dout)
    assert bitwise_equal(out, expected[0])
    assert all(bitwise_equal(a, b) for a, b in zip(vjp(dout), expected[2:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("headdim", [64, 59])
def test_strided_inputs_match_contiguous(dtype, headdim, monkeypatch):
    batch, seqlen, nheads = 2, 333, 4
    rng = np.random.default_rng(headdim)
    packed = to_device(rng.standard_normal((batch, seqlen, 3, nheads, headdim)).astype(dtype))
    q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]  # slices of a packed qkv
    # (batch, nheads, seqlen, headdim) seen through a transpose; and an odd element offset,
    # which rules out 16-byte vector loads; and a non-unit last stride, which is copied.
    dout = to_device(rng.standard_normal((batch, nheads, seqlen, headdim)).astype(dtype)).swapaxes(1, 2)
    shifted = to_device(rng.standard_normal(batch * seqlen * nheads * headdim + 1).astype(dtype))
    q_shifted = shifted[1:].reshape(batch, seqlen, nheads, headdim)
    k_every_other = to_device(rng.standard_normal((batch, seqlen, nheads, 2 * headdim)).astype(dtype))[..., ::2]
    copies = [contiguous(x) for x in (q, k, v, dout)]
    expected = _forward_backward(*copies)
    assert all(bitwise_equal(a, b) for a, b in zip(_forward_backward(q, k, v, dout), expected))

    got = _forward_backward(q_shifted, k_every_other, v, dout)
    # TMA cannot read q_shifted, so a Hopper GPU runs the mma.sync family for 16-bit data: compare with that
    # family (float32 and float64 take the same family either way).
    if np.dtype(dtype).itemsize == 2:
        monkeypatch.setenv(_cuda_backend.FAMILY_VARIABLE, "sm80")
    want = _forward_backward(contiguous(q_shifted), contiguous(k_every_other),
                             copies[2], copies[3])
    assert all(bitwise_equal(a, b) for a, b in zip(got, want))


def _launched(monkeypatch, fn, *args, **kwargs):
    """The launches (_plan.Launch) of a call."""
    launches = []
    launch = _cuda_backend._launch
    monkeypatch.setattr(_cuda_backend, "_launch", lambda lc, *a: (launches.append(lc), launch(lc, *a)))
    fn(*args, **kwargs)
    monkeypatch.setattr(_cuda_backend, "_launch", launch)
    return launches


def _sources(monkeypatch, fn, *args, **kwargs):
    """The source files of the kernels a call launches."""
    return [launch.source for launch in _launched(monkeypatch, fn, *args, **kwargs)]


def _forward_sources(monkeypatch, *args, **kwargs):
    return _sources(monkeypatch, cupyflash.attention, *args, **kwargs)


def _backward_sources(monkeypatch, q, k, v, **kwargs):
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    return sorted(set(_sources(monkeypatch, cupyflash.attention_backward, out, q, k, v, out, lse, **kwargs)))


def test_family_on_hopper(monkeypatch):
    """16-bit forwards take the sm_90a family where TMA can read the inputs; CUPYFLASH_KERNELS=sm80 forces
    the mma.sync family; the float32 forward and backward split their inputs for the sm_90a kernels and
    launch the mma.sync ones too (for inputs holding NaN or inf)."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    rng = np.random.default_rng(5)
    q, k, v = (to_device(rng.standard_normal((1, 100, 2, 64)).astype(np.float16)) for _ in range(3))
    assert _forward_sources(monkeypatch, q, k, v) == ["forward_sm90.cu"]
    assert _forward_sources(monkeypatch, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)) == [
        "split.cu", "split.cu", "split.cu", "forward_sm90.cu", "forward_mma.cu"]
    odd = to_device(rng.standard_normal((1, 100, 2, 60)).astype(np.float16))  # 240-byte rows: not for TMA
    assert _forward_sources(monkeypatch, odd, odd, odd) == ["forward_mma.cu"]
    # The backward: the sm_90a family (wide heads too); `deterministic` takes mma.sync. float32 splits its
    # inputs for the sm_90a kernels and launches the mma.sync ones too, as its forward does.
    assert _backward_sources(monkeypatch, q, k, v) == ["backward_sm90.cu"]
    assert _backward_sources(monkeypatch, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)) == [
        "backward.cu", "backward_mma.cu", "backward_sm90.cu", "split.cu"]
    wide = to_device(rng.standard_normal((1, 100, 2, 192)).astype(np.float16))
    assert _backward_sources(monkeypatch, wide, wide, wide) == ["backward_sm90.cu"]
    assert _backward_sources(monkeypatch, q, k, v, deterministic=True) == ["backward.cu", "backward_mma.cu"]
    monkeypatch.setenv(_cuda_backend.FAMILY_VARIABLE, "sm80")
    assert _forward_sources(monkeypatch, q, k, v) == ["forward_mma.cu"]
    assert _backward_sources(monkeypatch, q, k, v) == ["backward.cu", "backward_mma.cu"]


@pytest.mark.parametrize("bound", [dict(causal=True), dict(window_size=(90, 7))], ids=["causal", "window"])
@pytest.mark.parametrize("seqlen_q", [300, 512])  # an odd count of query tiles (a middle one alone), an even one
def test_hopper_forward_pairs_query_tiles(bound, seqlen_q, monkeypatch):
    """A causal or windowed Hopper forward on fewer blocks than work tiles takes query tiles in pairs over two
    rounds of its grid, the last rounds part empty: every work tile is computed once, bitwise as on a grid
    of a block per work tile."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    q, k, v, _ = _inputs(batch=2, seqlen_q=seqlen_q, seqlen_k=400, nheads=5, nheads_kv=5)

    def forward(blocks):
        monkeypatch.setattr(_cuda_backend, "_FORWARD_CALLS", {})
        monkeypatch.setattr(_cuda_backend, "_multiprocessors", lambda device_id: blocks)
        assert _forward_sources(monkeypatch, q, k, v, **bound) == ["forward_sm90.cu"]
        return cupyflash.attention(q, k, v, return_lse=True, **bound)

    (one_out, one_lse), *rest = forward(10 ** 6), forward(4), forward(7)
    for out, lse in rest:
        assert not bool(cp.isnan(out).any())
        assert bitwise_equal(out, one_out) and bitwise_equal(lse, one_lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("headdim", [64, 40])
def test_hopper_forward_wide_key_tiles(headdim, causal, monkeypatch):
    """From _plan.SM90_WIDE_KEY_TILE_FROM keys seen per row on, the Hopper forward at head tile 64 takes tiles
    of 192 keys: against the reference, the last key tile ragged (causal rows see 2086-2385 keys)."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    problem = Problem(1, 300, _plan.SM90_WIDE_KEY_TILE_FROM + 337, 2, 1, headdim, np.float16, causal, None, None,
                      headdim)
    q, k, v, _ = (to_device(x) for x in problem.arrays())
    names = [launch.name for launch in _launched(monkeypatch, cupyflash.attention, q, k, v, causal=causal)]
    assert any(name.startswith("flash_fwd_sm90<half_t, 64, 192,") for name in names), names
    check(problem)


@pytest.mark.parametrize("bound", [dict(causal=True), dict(window_size=(90, 7))], ids=["causal", "window"])
def test_hopper_backward_walks_l2_sections(bound, monkeypatch):
    """A causal or windowed Hopper backward takes its (batch, kv head) pairs in sections that share L2: with
    sections of 3 of 10 pairs (the last one shorter) every key block is computed once, as in one section
    (bitwise but for dq, whose float32 sums may add in another order)."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    q, k, v, dout = _inputs(batch=2, seqlen_q=300, seqlen_k=400, nheads=10, nheads_kv=5)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **bound)

    def backward(section):
        monkeypatch.setattr(_cuda_backend, "_BACKWARD_CALLS", {})
        monkeypatch.setattr(_cuda_backend._plan, "l2_section", lambda *args: section)
        assert "backward_sm90.cu" in _sources(monkeypatch, cupyflash.attention_backward, dout, q, k, v, out, lse,
                                              **bound)
        return cupyflash.attention_backward(dout, q, k, v, out, lse, **bound)

    (dq, dk, dv), (one_dq, one_dk, one_dv) = backward(3), backward(10)
    assert not any(bool(cp.isnan(x).any()) for x in (dq, dk, dv))
    assert bitwise_equal(dk, one_dk) and bitwise_equal(dv, one_dv)
    assert_near(dq, one_dq, 2 ** -8)


BLOCKS_IN_TURN = {
    "float16 causal": dict(dtype=np.float16, headdim=64, kw=dict(causal=True)),
    "bfloat16 d128 window, NaN in a hidden key": dict(dtype="bfloat16", headdim=128, kw=dict(window_size=(70, 9)),
                                                       nan_key=150),
    "float16 d256 causal": dict(dtype=np.float16, headdim=256, kw=dict(causal=True)),
    "bfloat16 d64 dropout": dict(dtype="bfloat16", headdim=64, kw=dict(dropout_p=0.2, dropout_seed=5)),
    "float32 d96 causal": dict(dtype=np.float32, headdim=96, kw=dict(causal=True)),
    "float16 packed causal": dict(dtype=np.float16, headdim=64, kw=dict(causal=True), packed=(0, 300, 1, 517, 129)),
}


@pytest.mark.parametrize("case", BLOCKS_IN_TURN)
def test_hopper_backward_blocks_take_key_blocks_in_turn(case, monkeypatch):
    """The Hopper backward's persistent blocks take key blocks in turn: with one, three or seven blocks in
    the grid, each working through many key blocks (its ring of query tiles running on from one to the next),
    dk and dv are bitwise those of a grid of a block per multiprocessor, and dq within rounding (its float32
    sums add in another order); NaN reaches the same entries."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    c = BLOCKS_IN_TURN[case]
    dtype = BFLOAT16 if c["dtype"] == "bfloat16" else c["dtype"]
    kw = dict(c["kw"])
    rng = np.random.default_rng(1)
    if "packed" in c:
        lengths = np.array(c["packed"])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        host = [rng.standard_normal((int(offsets[-1]), h, c["headdim"])).astype(dtype) for h in (4, 2, 2, 4)]
        kw.update(cu_seqlens_q=cp.asarray(offsets), cu_seqlens_k=cp.asarray(offsets),
                  max_seqlen_q=int(lengths.max()), max_seqlen_k=int(lengths.max()))
    else:
        host = [rng.standard_normal((2, rows, heads, c["headdim"])).astype(dtype)
                for rows, heads in ((330, 6), (420, 3), (420, 3), (330, 6))]
    if "nan_key" in c:
        host[1][0, c["nan_key"], 1, 3] = np.nan
    q, k, v, dout = (to_device(x) for x in host)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **kw)

    def backward(blocks):
        monkeypatch.setattr(_cuda_backend, "_BACKWARD_CALLS", {})
        if blocks:
            monkeypatch.setattr(_cuda_backend, "_multiprocessors", lambda device_id: blocks)
        launches = _launched(monkeypatch, cupyflash.attention_backward, dout, q, k, v, out, lse, **kw)
        assert any(launch.source == "backward_sm90.cu" for launch in launches)
        return cupyflash.attention_backward(dout, q, k, v, out, lse, **kw)

    want_dq, want_dk, want_dv = backward(None)
    assert bool(cp.isfinite(want_dk).any()) and bool(cp.isfinite(want_dv).any())
    for blocks in (1, 3, 7):
        dq, dk, dv = backward(blocks)
        assert bitwise_equal(dk, want_dk) and bitwise_equal(dv, want_dv), blocks
        assert bool(cp.all(cp.isfinite(dq) == cp.isfinite(want_dq))), blocks
        finite = cp.isfinite(want_dq)
        assert_near(cp.where(finite, dq, 0), cp.where(finite, want_dq, 0), 2 ** -8)


def test_hopper_backward_reads_an_unaligned_out(monkeypatch):
    """The Hopper backward's first pass reads dout and out with 16-byte loads where their rows allow it, else
    element by element: an `out` two bytes off alignment gives the same dv, and dq and dk within the rounding
    of delta = rowsum(dout out), which the two loads sum in another order."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    q, k, v, dout = _inputs(seqlen_q=200, seqlen_k=300, headdim=64)
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    shifted = cp.empty(out.size + 1, out.dtype)[1:].reshape(out.shape)
    shifted[...] = out
    assert shifted.data.ptr % 16 != 0
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    launches = _launched(monkeypatch, cupyflash.attention_backward, dout, q, k, v, shifted, lse, causal=True)
    assert [launch.name for launch in launches if "prepare_sm90" in launch.name][0].endswith(", 1>")
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, shifted, lse, causal=True)
    want = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert bitwise_equal(dv, want[2])
    for got, expected in zip((dq, dk), want):
        assert_near(got, expected, 2 ** -8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_float32_and_float64_families(dtype, monkeypatch):
    """float32 and float64 run on tensor cores, float64 up to headdim 128; CUPYFLASH_KERNELS=simt forces the
    CUDA-core kernels; CUPY_TF32=1 computes float32 in TF32 (the kernels' tf32_t), float64 as before."""
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    monkeypatch.delenv(_cuda_backend.TF32_VARIABLE, raising=False)

    def kernels(headdim):
        q, k, v, dout = _inputs(dtype, seqlen_q=70, seqlen_k=90, headdim=headdim)
        launches = _launched(monkeypatch, _forward_backward, q, k, v, dout)
        return [launch.name for launch in launches if launch.name.startswith("flash_")]

    tensor_cores = ["flash_fwd_mma", "flash_bwd_delta", "flash_bwd_dq_mma", "flash_bwd_dkdv_mma"]
    cuda_cores = ["flash_fwd_simt", "flash_bwd_delta", "flash_bwd_dq_simt", "flash_bwd_dkdv_simt"]
    # float32 on Hopper: the forward and the backward on split operands first, the mma.sync ones gated behind
    if dtype == np.float32 and cp.cuda.Device().compute_capability.startswith("9"):
        split = ["flash_fwd_sm90", "flash_fwd_mma", "flash_bwd_prepare_sm90", "flash_bwd_sm90_row_sums",
                 "flash_bwd_sm90_split", "flash_bwd_dq_convert", *tensor_cores[1:]]
        assert [name.split("<")[0] for name in kernels(64)] == split
    else:
        assert [name.split("<")[0] for name in kernels(64)] == tensor_cores
    wide = [name.split("<")[0] for name in kernels(256)]
    assert wide == (cuda_cores if dtype == np.float64 else tensor_cores)
    monkeypatch.setenv(_cuda_backend.TF32_VARIABLE, "1")
    c_type = "tf32_t" if dtype == np.float32 else "double"
    assert all(name.startswith(("flash_bwd_delta", f"flash_fwd_mma<{c_type},", f"flash_bwd_dkdv_mma<{c_type},",
                                f"flash_bwd_dq_mma<{c_type},")) for name in kernels(64))
    monkeypatch.setenv(_cuda_backend.FAMILY_VARIABLE, "simt")
    assert [name.split("<")[0] for name in kernels(64)] == cuda_cores


def _split_parts(x):
    """split.cu's three bfloat16 parts of a float32 (batch, seqlen, heads, headdim) array, as float64, and
    its NaN/inf flag."""
    parts = cp.empty((3 * x.shape[0], *x.shape[1:3], -(-x.shape[3] // 8) * 8), cp.uint16)
    flag = cp.zeros(1, cp.int32)
    p = _cuda_backend._struct(_cuda_backend.SPLIT_PARAMS, (x.data.ptr, _cuda_backend._strides(x), *x.shape[:3],
                                                           x.shape[3], parts.shape[3], parts.data.ptr, flag.data.ptr))
    _cuda_backend._launch(_plan.split_float32(), (3, 1, 1), p, x.device.id)
    values = (parts.astype(cp.uint32) << 16).view(cp.float32).astype(cp.float64)
    return values.reshape(3, *x.shape[:3], parts.shape[3])[..., :x.shape[3]], int(flag[0])


def test_split_float32_parts_sum_to_each_value():
    """Three bfloat16 parts add up to each float32 exactly, across its exponents (the largest included), and
    the flag marks NaN and inf."""
    rng = np.random.default_rng(11)
    mantissas = rng.uniform(1, 2, (2, 37, 3, 40)) * rng.choice([-1, 1], (2, 37, 3, 40))
    x = (mantissas * 2.0 ** rng.integers(-100, 128, mantissas.shape)).astype(np.float32)
    x[0, 0, 0, :4] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, 0.0, -0.0]
    device = to_device(x)[:, :, :, 3:]  # strided rows, headdim 37: parts padded to 40 columns
    parts, flag = _split_parts(device)
    assert flag == 0
    assert bool(cp.all(parts.sum(axis=0) == device.astype(cp.float64)))
    assert bool(cp.all(cp.abs(parts[2]) <= cp.abs(parts[1]))) and bool(cp.all(cp.abs(parts[1]) <= cp.abs(parts[0])))
    for bad in (np.inf, np.nan):
        y = to_device(x)
        y[1, 5, 2, 7] = bad
        assert _split_parts(y)[1] == 1


@pytest.mark.parametrize("headdim", [32, 64, 100, 128])
def test_float32_on_split_operands(headdim, monkeypatch):
    """The Hopper forward and backward of float32 on split operands meet the float32 rule against the
    reference, as the mma.sync kernels do; an input holding inf or NaN (which the parts cannot carry) gives
    what the mma.sync kernels give, bitwise, through the gate."""
    if not cp.cuda.Device().compute_capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")
    monkeypatch.delenv(_cuda_backend.FAMILY_VARIABLE, raising=False)
    monkeypatch.delenv(_cuda_backend.TF32_VARIABLE, raising=False)
    for causal in (False, True):
        check(Problem(batch=2, seqlen_q=333, seqlen_k=517, nheads=4, nheads_kv=2, headdim=headdim, dtype=np.float32,
                      causal=causal, scale=None, logit_std=None, seed=headdim))
    q, k, v, dout = _inputs(np.float32, seqlen_q=130, seqlen_k=200, headdim=headdim)
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    bad_dout = dout.copy()
    bad_dout[0, 7, 3, 1] = np.inf
    bad_k, bad_v = k.copy(), v.copy()
    bad_v[1, 150, 0, 3] = np.inf  # a key that only some rows see
    bad_k[0, 3, 1, 0] = np.nan

    def gated():
        return (*cupyflash.attention_backward(bad_dout, q, k, v, out, lse, causal=True),
                *cupyflash.attention(q, bad_k, bad_v, causal=True, return_lse=True),
                *cupyflash.attention_backward(dout, q, bad_k, bad_v, out, lse, causal=True))

    got = gated()
    monkeypatch.setenv(_cuda_backend.FAMILY_VARIABLE, "sm80")
    want = gated()
    assert all(bitwise_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("case", range(0, len(HEADDIMS), 2), ids=lambda i: f"d{HEADDIMS[i]}-{SHAPES[i][0]}x{SHAPES[i][1]}")
def test_tf32_against_reference(case, monkeypatch):
    """CUPY_TF32=1: float32 in TF32, by the flash rule against naive attention in TF32."""
    monkeypatch.setenv(_cuda_backend.TF32_VARIABLE, "1")
    seqlen_q, seqlen_k, causal = SHAPES[case]
    nheads, nheads_kv = HEADS[case % 3]
    check(Problem(batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads, nheads_kv=nheads_kv,
                  headdim=HEADDIMS[case], dtype=np.float32, causal=causal, scale=None,
                  logit_std=None if case % 4 == 0 else 25.0, seed=case), tf32=True)


# dq's run-to-run spread (a few units in the last place of its largest entries: 2^-7 of bfloat16, 2^-23 of
# float32) and the default backward's distance from the deterministic one, as fractions of dq's largest entry
SPREAD = {2: (2 ** -6, 2 ** -5), 4: (2 ** -18, 2 ** -14)}


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: d.name)
def test_default_backward_differs_from_deterministic_by_rounding_only(dtype):
    """On Hopper the default backward (16-bit, and float32 on split operands) sums dq with float atomics: dk
    and dv repeat bitwise, dq varies in its last bits only; with `deterministic=True` everything repeats
    bitwise (test_deterministic). float32's rows' sums repeat bitwise too (flash_bwd_sm90_row_sums)."""
    q, k, v, dout = _inputs(dtype, seqlen_q=700, seqlen_k=900, headdim=128)
    first = _forward_backward(q, k, v, dout)
    exact = _forward_backward(q, k, v, dout, deterministic=True)
    scale = float(cp.abs(exact[2].astype(cp.float32)).max())
    spread, distance = SPREAD[dtype.itemsize]
    for _ in range(20):
        again = _forward_backward(q, k, v, dout)
        assert all(bitwise_equal(a, b) for a, b in zip(first[:2] + first[3:], again[:2] + again[3:]))
        assert float(cp.abs(again[2].astype(cp.float32) - first[2].astype(cp.float32)).max()) <= scale * spread
    for got, want in zip(first[2:], exact[2:]):
        assert_near(got, want, distance)


FLOAT64_BACKWARDS = [dict(causal=True), dict(causal=False), dict(window_size=(40, 3)), dict(softcap=4.0),
                     dict(dropout_p=0.25, dropout_seed=11), dict(causal=True, logits=20.0),
                     dict(causal=True, nan_key=True)]


@pytest.mark.parametrize("headdim", [24, 64, 80, 128])  # head tiles 32, 64, 96 (pairs of warps), 128
@pytest.mark.parametrize("case", FLOAT64_BACKWARDS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_float64_dq_added_by_the_key_pass(headdim, case):
    """float64's default backward adds dq in the dK/dV pass with float64 atomics; `deterministic=True` gives
    dQ its own pass. dk and dv are bitwise the same either way (the same products, the same rows' factors),
    dq differs in its last bits only. logits=20 scales q so that most rows renormalize (the dQ pass then
    sums those rows' probabilities alone); nan_key puts NaN in a key that all rows but the last cannot see."""
    case = dict(case)
    logits, nan_key = case.pop("logits", 1.0), case.pop("nan_key", False)
    q, k, v, dout = _inputs(np.float64, seqlen_q=300, seqlen_k=200, headdim=headdim)
    q = q * logits
    if nan_key:
        k[:, -1, :, 0] = cp.nan
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **case)
    renormalized = cp.isfinite(lse) & (cp.abs(lse) * np.log2(np.e) > _plan.RENORMALIZED_LSE2)
    assert bool(renormalized.any()) == (logits > 1)
    exact = cupyflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **case)
    finite = cp.isfinite(exact[0])
    largest = float(cp.abs(cp.where(finite, exact[0], 0)).max())
    for _ in range(3):
        dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, **case)
        assert bitwise_equal(dk, exact[1]) and bitwise_equal(dv, exact[2])
        assert bool(cp.all(cp.isfinite(dq) == finite))
        assert float(cp.abs(cp.where(finite, dq - exact[0], 0)).max()) <= largest * 2 ** -44
    if nan_key:
        assert int((~finite).any(axis=(0, 2, 3)).sum()) == 1 and not bool(finite[:, -1].any())


def test_runs_on_the_current_stream():
    q, k, v, dout = _inputs(np.float16)
    expected = _forward_backward(q, k, v, dout)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        got = _forward_backward(q, k, v, dout)
    stream.synchronize()
    assert all(bitwise_equal(a, b) for a, b in zip(got, expected))


def _device_count():
    try:
        return cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError:
        return 0


@pytest.mark.skipif(_device_count() < 2, reason="needs a second GPU")
def test_second_device():
    host = Problem(1, 100, 100, 2, 2, 64, np.float32, False, None, None, 3).arrays()
    expected = _forward_backward(*(to_device(x) for x in host))
    with cp.cuda.Device(1):
        inputs = [to_device(x) for x in host]
    got = _forward_backward(*inputs)
    assert all(x.device.id == 1 for x in got)
    assert all(np.array_equal(a.get(), b.get()) for a, b in zip(got, expected))
    with pytest.raises(ValueError, match="device"):
        cupyflash.attention(inputs[0], to_device(host[1]), inputs[2])


def test_memory_is_linear_in_seqlen():
    """Forward + backward at seqlen 65,536 keeps the pool's peak under twice the bytes of
    q, k, v, out, dout and the three gradients; naive attention would need > 60 GB."""
    batch, seqlen, nheads, headdim = 1, 65536, 8, 128
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    held = pool.total_bytes()  # what earlier calls keep (the decode's split counters and partials), a few MB
    assert held < 64 * 2**20
    shape = (batch, seqlen, nheads, headdim)
    q, k, v, dout = (_random_bf16(shape) for _ in range(4))
    out, lse = cupyflash.attention(q, k, v, causal=False, return_lse=True)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse)
    cp.cuda.get_current_stream().synchronize()
    tensor_bytes = q.nbytes * 8
    assert all(bool(cp.isfinite(as_float32(g)).all()) for g in (out, *grads))
    assert pool.total_bytes() - held < 2 * tensor_bytes, (pool.total_bytes(), held, tensor_bytes)
    assert nheads * seqlen * seqlen * 4 * 2 > 60e9  # naive's scores and probabilities, float32


def _random_bf16(shape):
    """Random bfloat16 on the device: float32 normals rounded to nearest even in integer arithmetic."""
    import ml_dtypes

    bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(cp.uint16).view(ml_dtypes.bfloat16)


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_training_loop_plans_once_and_sees_each_calls_arrays(deterministic):
    """Calls alike but for their arrays reuse the first call's check and launch plan (forward and backward);
    each reads its own q, k, v and dout and gives what a freshly planned call gives."""
    from cupyflash import _validate

    for table in (_validate._VERDICTS, _cuda_backend._FORWARD_CALLS, _cuda_backend._BACKWARD_CALLS):
        table.clear()
    results = [_forward_backward(*_inputs(np.float16, seed=seed), deterministic=deterministic) for seed in range(3)]
    assert (len(_validate._VERDICTS), len(_cuda_backend._FORWARD_CALLS), len(_cuda_backend._BACKWARD_CALLS)) == (2, 1, 1)
    for seed, got in enumerate(results):
        for table in (_validate._VERDICTS, _cuda_backend._FORWARD_CALLS, _cuda_backend._BACKWARD_CALLS):
            table.clear()
        want = _forward_backward(*_inputs(np.float16, seed=seed), deterministic=deterministic)
        for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            x, y = x.get().astype(np.float32), y.get().astype(np.float32)
            if name == "dq" and not deterministic:  # the Hopper backward sums dq in an order that varies
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-3 * np.abs(y).max())
            else:
                assert np.array_equal(x, y), name


def test_bench_reads_the_clock_each_batch_left():
    from cupyflash import bench

    x = cp.ones(1 << 20, cp.float32)
    (ms, mhz), = bench.GpuBackend().times_per_call([lambda: x.sum()], repeats=3, warmup=1)
    max_mhz = cp.cuda.Device().attributes["ClockRate"] / 1e3  # kHz
    # up to 5% over the nominal maximum has been read behind torch's kernels (docs/performance.md, Clock)
    assert ms > 0 and 0.2 * max_mhz < mhz < 1.1 * max_mhz, (ms, mhz, max_mhz)
