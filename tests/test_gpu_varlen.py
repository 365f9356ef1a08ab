"""Packed batches on the CUDA kernels (marker `gpu`): one launch per pass for every sequence, each
sequence checked alone against the float64 reference by flash-attn's rule, on every dtype, head
dimension class and kernel family (tools/gpu_validate.sh runs this file again with
CUPYFLASH_KERNELS=sm80), with every output poisoned before the kernels run; and no value of one
sequence reaching another, where the Hopper kernels' tiles read past a sequence's end. CuPy offsets go
with max_seqlen_* (flash-attn's convention: left on the device, unread) in the first test, without them (read
and checked on the host) in the second."""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cupyflash
from cupyflash import _philox, _plan
from helpers import (BWD_FLOOR_ULPS, DTYPES, FWD_FLOOR_ULPS, assert_close_flash_rule, eps, error_scales, flash_floor,
                     naive_attention, naive_attention_backward)
from test_gpu import poisoned_outputs, to_device  # noqa: F401  (fixture)
from test_varlen import packed as packed_batch

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")
from cupyflash import _cuda_backend  # noqa: E402

# (seqlen_q, seqlen_k) per sequence: no keys, no queries, one row, tile edges crossed and met, Sq != Sk.
LENGTHS = ((70, 90), (0, 5), (1, 0), (130, 129), (257, 300), (64, 64), (1, 1), (200, 3))
NHEADS, NHEADS_KV = 4, 2


def packed(dtype, headdim, seed, lengths=LENGTHS):
    lens_q, lens_k = zip(*lengths)
    return packed_batch(lens_q, lens_k, dtype, seed, NHEADS, NHEADS_KV, headdim)


def variant(name, batch, rng, dtype):
    return {
        "plain": dict(),
        "causal": dict(causal=True),
        "window": dict(window_size=(40, 7)),
        "alibi": dict(alibi_slopes=rng.uniform(0.01, 0.3, (batch, NHEADS)).astype(np.float32)),
        "softcap_alibi": dict(softcap=6.0, alibi_slopes=rng.uniform(0.01, 0.3, (batch, NHEADS)).astype(np.float32),
                              causal=True),
        "dropout": dict(causal=True, dropout_p=0.2, dropout_seed=int(rng.integers(0, 2**63))),
        "sink": dict(window_size=(30, 2), learnable_sink=rng.choice([3.0, 0.0, -2.0, -np.inf], NHEADS).astype(
            np.float64 if dtype == np.float64 else np.float32)),
    }[name]


def run_packed(cu_q, cu_k, q, k, v, dout, slack=None, **kw):
    """out, lse and the gradients on the host; `slack`: max_seqlen_* given, that much above the longest
    sequences (the offsets stay on the device)."""
    dev = {name: to_device(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    cu = dict(cu_seqlens_q=cp.asarray(cu_q), cu_seqlens_k=cp.asarray(cu_k))
    if slack is not None:
        cu.update(max_seqlen_q=int(np.diff(cu_q).max()) + slack, max_seqlen_k=int(np.diff(cu_k).max()) + slack)
    args = [to_device(x) for x in (q, k, v)]
    out, lse = cupyflash.attention(*args, return_lse=True, **cu, **dev)
    grads = cupyflash.attention_backward(to_device(dout), *args, out, lse, **cu, **dev)
    return [x.get() for x in (out, lse, *grads)]


def check_sequence(b, rows_q, rows_k, arrays, got, kw):
    """Sequence b's rows of the packed results against it run alone (its ALiBi row and dropout bits)."""
    q, k, v, dout = (x[None, rows] for x, rows in zip(arrays, (rows_q, rows_k, rows_k, rows_q)))
    kw = dict(kw)
    causal = kw.pop("causal", False)
    if kw.get("alibi_slopes") is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"][b]
    ref_kw = dict(kw)
    if kw.get("dropout_p", 0) > 0:
        kw["batch_offset"] = b
        ref_kw["dropout_mask"] = _philox.keep_mask((1, NHEADS, q.shape[1], k.shape[1]), kw["dropout_p"],
                                                   ref_kw.pop("dropout_seed"), batch_offset=b)
    scale = 1.0 / np.sqrt(q.shape[-1])
    ref_out, ref_lse = cupyflash.reference.attention(q, k, v, causal=causal, return_lse=True, **ref_kw)
    ref = (ref_out, ref_lse, *cupyflash.reference.attention_backward(dout, q, k, v, ref_out, ref_lse, causal=causal,
                                                                     **ref_kw))
    naive = (*naive_attention(q, k, v, causal, scale, **kw), *naive_attention_backward(dout, q, k, v, causal, scale,
                                                                                        **kw))
    scales = error_scales(q, k, v, dout, causal, scale, **kw)
    out, lse, dq, dk, dv = got
    mine = (out[None, rows_q], lse[None, :, rows_q], dq[None, rows_q], dk[None, rows_k], dv[None, rows_k])
    for name, x, r, n in zip(("out", "lse", "dq", "dk", "dv"), mine, ref, naive):
        forward = name in ("out", "lse")
        floor = flash_floor(name, x.dtype if name != "lse" else q.dtype, scales,
                            FWD_FLOOR_ULPS if forward else BWD_FLOOR_ULPS)
        assert_close_flash_rule(x, r, n, 2 if forward else 3, floor, name=f"{name} of sequence {b} with {sorted(kw)}")


def check_each_sequence(cu_q, cu_k, arrays, got, kw):
    """Every sequence of a packed call's results (`got`, run_packed's) as if run alone."""
    out, lse, dq, dk, dv = got
    sink = kw.get("learnable_sink")
    no_key_lse = np.full((NHEADS, 1), -np.inf) if sink is None else sink[:, None].astype(lse.dtype)
    for b in range(len(cu_q) - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows_q.start == rows_q.stop:
            assert (dk[rows_k] == 0).all() and (dv[rows_k] == 0).all()  # keys no query sees
        elif rows_k.start == rows_k.stop:  # no key: out 0, lse -inf (the sink's logit with one)
            assert (out[rows_q] == 0).all() and (dq[rows_q] == 0).all()
            np.testing.assert_allclose(lse[:, rows_q], np.broadcast_to(no_key_lse, lse[:, rows_q].shape),
                                       rtol=4 * eps(lse.dtype))  # sink log2(e) ln(2): a rounding or two
        else:
            check_sequence(b, rows_q, rows_k, arrays, got, kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("headdim", (64, 72, 128, 256))
@pytest.mark.parametrize("name", ("plain", "causal", "window", "alibi", "softcap_alibi", "dropout", "sink"))
def test_each_sequence_as_if_alone(dtype, headdim, name):
    rng = np.random.default_rng(headdim)
    cu_q, cu_k, *arrays = packed(dtype, headdim, headdim)
    kw = variant(name, len(LENGTHS), rng, dtype)
    check_each_sequence(cu_q, cu_k, arrays, run_packed(cu_q, cu_k, *arrays, slack=headdim % 5, **kw), kw)


LENGTH = st.one_of(st.just(0), st.just(1), st.integers(1, 600))


@pytest.mark.long_running
@settings(max_examples=25)
@given(lengths=st.lists(st.tuples(LENGTH, LENGTH), min_size=1, max_size=6), dtype=st.sampled_from(DTYPES),
       headdim=st.sampled_from([64, 37, 128, 256]),
       names=st.sets(st.sampled_from(("causal", "window", "alibi", "softcap_alibi", "dropout", "sink")), max_size=3),
       offsets_read=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(lengths=[(1, 0)], dtype=np.dtype(np.float16), headdim=64, names={"sink"}, offsets_read=False, seed=0)
def test_random_packed_batches(lengths, dtype, headdim, names, offsets_read, seed):
    """Drawn sequence lengths (empty ones among them), head dims and variant combinations; the offsets
    read on the host or left on the device."""
    rng = np.random.default_rng(seed)
    cu_q, cu_k, *arrays = packed(dtype, headdim, seed, lengths)
    kw = {}
    for name in sorted(names):  # later keys win where two variants set the same keyword
        kw.update(variant(name, len(lengths), rng, dtype))
    got = run_packed(cu_q, cu_k, *arrays, slack=None if offsets_read else int(rng.integers(0, 3)), **kw)
    check_each_sequence(cu_q, cu_k, arrays, got, kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_the_sink_gradient_of_a_packed_batch(dtype):
    """dsink sums over every sequence's rows (a sequence with no key adds nothing: its out is 0): the
    reference's within the rounding of dsink's terms, whose magnitude error_scales gives per sequence."""
    rng = np.random.default_rng(5)
    cu_q, cu_k, q, k, v, dout = packed(dtype, 64, 5)
    sink = np.array([2.0, -1.0, -np.inf, 0.5], np.float64 if dtype == np.float64 else np.float32)
    cu = dict(cu_seqlens_q=cp.asarray(cu_q), cu_seqlens_k=cp.asarray(cu_k))
    args = [to_device(x) for x in (q, k, v)]
    out, lse = cupyflash.attention(*args, return_lse=True, causal=True, learnable_sink=cp.asarray(sink), **cu)
    *_, dsink = cupyflash.attention_backward(to_device(dout), *args, out, lse, causal=True,
                                             learnable_sink=cp.asarray(sink), return_dsink=True, **cu)
    assert dsink.dtype == sink.dtype and dsink.shape == (NHEADS,)
    ref_out, ref_lse = cupyflash.reference.attention(q, k, v, causal=True, learnable_sink=sink, return_lse=True,
                                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    *_, ref = cupyflash.reference.attention_backward(dout, q, k, v, ref_out, ref_lse, causal=True, learnable_sink=sink,
                                                     return_dsink=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    magnitude = sum(error_scales(q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]], v[None, cu_k[b]:cu_k[b + 1]],
                                 dout[None, cu_q[b]:cu_q[b + 1]], True, 0.125, learnable_sink=sink)["dsink"]
                    for b in range(len(cu_q) - 1) if cu_q[b + 1] > cu_q[b] and cu_k[b + 1] > cu_k[b])
    tol = (4 * eps(dtype) + 64 * eps(dsink.dtype)) * magnitude
    np.testing.assert_allclose(dsink.get(), ref, rtol=0, atol=tol)
    assert dsink.get()[2] == 0  # a head without a sink


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=lambda d: d.name)
@pytest.mark.parametrize("name", ("plain", "causal", "window"))
def test_each_sequence_as_if_alone_in_wide_key_tiles(dtype, name, monkeypatch):
    """The Hopper forward's 192-key tiles (taken here from the first key on, _plan.SM90_WIDE_KEY_TILE_FROM):
    one tile past several short sequences' ends."""
    monkeypatch.setattr(_plan, "SM90_WIDE_KEY_TILE_FROM", 0)
    test_each_sequence_as_if_alone(dtype, 64, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("headdim", (64, 256))
@pytest.mark.parametrize("name", ("plain", "causal", "window"))
def test_nothing_crosses_between_sequences(dtype, headdim, name, monkeypatch):
    """A sequence full of NaN and inf leaves its neighbours' results as they were, up to the rounding of
    the guarded products that keep it out of the tiles crossing into it (and of the Hopper backward's dq
    atomics). A float32 forward holding NaN or inf takes the mma.sync kernel (FwdParams::gate), whose last
    bits differ from those of the split-operand Hopper kernel: the clean run takes it too."""
    if dtype == np.float32:
        monkeypatch.setenv(_cuda_backend.FAMILY_VARIABLE, "sm80")
    cu_q, cu_k, *clean = packed(dtype, headdim, 7)
    poisoned = [x.copy() for x in clean]
    for x, cu in zip(poisoned, (cu_q, cu_k, cu_k, cu_q)):
        x[cu[3]:cu[4]] = np.nan  # sequence 3: the tiles of sequence 0 reach into it
        x[cu[3]:cu[4]:7] = np.inf
    kw = variant(name, len(LENGTHS), np.random.default_rng(0), dtype)
    want, got = run_packed(cu_q, cu_k, *clean, **kw), run_packed(cu_q, cu_k, *poisoned, **kw)
    others_q = np.r_[0:cu_q[3], cu_q[4]:cu_q[-1]]
    others_k = np.r_[0:cu_k[3], cu_k[4]:cu_k[-1]]
    for what, g, w, rows, axis in zip(("out", "lse", "dq", "dk", "dv"), got, want,
                                      (others_q, others_q, others_q, others_k, others_k), (0, 1, 0, 0, 0)):
        g, w = (np.take(x, rows, axis).astype(np.float64) for x in (g, w))
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), what
        finite = np.isfinite(w)
        ulps = 2 * np.finfo(dtype if dtype.itemsize > 2 else np.float32).eps if what == "lse" else 2 * eps(dtype)
        np.testing.assert_allclose(g[finite], w[finite], rtol=0, atol=ulps * np.abs(w[finite]).max(), err_msg=what)
    assert np.isnan(got[0][cu_q[3]:cu_q[4]].astype(np.float64)).any()


def test_offsets_on_the_host_or_strided_give_the_same_bits(monkeypatch):
    """NumPy cu_seqlens with CuPy q, k, v (no device read) and strided CuPy ones (copied) give the bits of
    contiguous CuPy ones (read in place), and so do contiguous CuPy ones with max_seqlen_*, never read."""
    cu_q, cu_k, q, k, v, dout = packed(np.dtype(np.float16), 64, 3)
    args = [to_device(x) for x in (q, k, v)]
    longest = dict(max_seqlen_q=int(np.diff(cu_q).max()), max_seqlen_k=int(np.diff(cu_k).max()))
    read = cupyflash._validate._host_offsets
    results = []
    for cu, more in (((cu_q, cu_k), {}), ((cp.asarray(cu_q), cp.asarray(cu_k)), {}),
                     ((cp.asarray(np.repeat(cu_q, 2))[::2], cp.asarray(np.repeat(cu_k, 2))[::2]), longest),
                     ((cp.asarray(cu_q), cp.asarray(cu_k)), longest)):
        unread = isinstance(cu[0], cp.ndarray) and cu[0].flags.c_contiguous and more
        monkeypatch.setattr(cupyflash._validate, "_host_offsets", _never_called if unread else read)
        kw = dict(cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], causal=True, **more)
        out, lse = cupyflash.attention(*args, return_lse=True, **kw)
        grads = cupyflash.attention_backward(to_device(dout), *args, out, lse, deterministic=True, **kw)
        results.append([x.get() for x in (out, lse, *grads)])
    for want, *others in zip(*results):
        for got in others:
            assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))


def _never_called(*args):
    raise AssertionError("offsets read back from the device")


@pytest.mark.parametrize("dtype", (np.dtype(np.float16), np.dtype(np.float32)), ids=lambda d: d.name)
def test_a_packed_call_is_checked_and_planned_once_per_offsets(dtype):
    """Packed calls alike, their offsets CuPy or NumPy, reuse one check and one plan, and give the same bits
    each time (each launch builds its own work list for the Hopper forward, whose counter starts at 0);
    other offsets, or the same contents in other CuPy arrays, or offsets changed in place, are checked anew,
    and a sequence moved between them is computed where it now lies. CuPy offsets with max_seqlen_* are
    checked and planned once per arrays: the kernels read them at each call, changed in place or not. The tables
    start empty, so that none fills (and is cleared) within the test, whatever ran before in this process."""
    for table in (cupyflash._validate._VERDICTS, _cuda_backend._FORWARD_CALLS, _cuda_backend._BACKWARD_CALLS):
        table.clear()
    cu_q, cu_k, q, k, v, dout = packed(dtype, 64, 5)
    args = [to_device(x) for x in (q, k, v)]

    def run(cu_seqlens_q, cu_seqlens_k, **longest):
        out, lse = cupyflash.attention(*args, return_lse=True, causal=True, cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k, **longest)
        grads = cupyflash.attention_backward(to_device(dout), *args, out, lse, causal=True, deterministic=True,
                                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **longest)
        return [x.get() for x in (out, lse, *grads)]

    def same_bits(got, want):
        return all(np.array_equal(g.view(f"u{g.itemsize}"), w.view(f"u{w.itemsize}")) for g, w in zip(got, want))

    device_q, device_k = cp.asarray(cu_q), cp.asarray(cu_k)
    first = run(device_q, device_k)
    verdicts, plans = len(cupyflash._validate._VERDICTS), len(_cuda_backend._FORWARD_CALLS)
    for _ in range(3):
        assert same_bits(run(device_q, device_k), first)
    assert (len(cupyflash._validate._VERDICTS), len(_cuda_backend._FORWARD_CALLS)) == (verdicts, plans)
    with cp.cuda.Stream(non_blocking=True):  # another stream
        assert same_bits(run(device_q, device_k), first)
    assert same_bits(run(cu_q, cu_k), first)  # NumPy offsets: a check and a plan of their own
    assert same_bits(run(cp.asarray(cu_q), cp.asarray(cu_k)), first)
    # sequences 0 and 1 merged in place: the check reads the new contents
    merged_q, merged_k = np.delete(cu_q, 1), np.delete(cu_k, 1)
    device_q[:], device_k[:] = cp.asarray(np.append(merged_q, merged_q[-1])), cp.asarray(np.append(merged_k, merged_k[-1]))
    got = run(device_q, device_k)
    want = run(np.append(merged_q, merged_q[-1]), np.append(merged_k, merged_k[-1]))
    assert same_bits(got, want) and not same_bits(got, first)

    longest = dict(max_seqlen_q=int(np.diff(cu_q).max()), max_seqlen_k=int(np.diff(cu_k).max()))
    device_q[:], device_k[:] = cp.asarray(cu_q), cp.asarray(cu_k)
    assert same_bits(run(device_q, device_k, **longest), first)
    verdicts, plans = len(cupyflash._validate._VERDICTS), len(_cuda_backend._FORWARD_CALLS)
    device_q[:], device_k[:] = cp.asarray(np.append(merged_q, merged_q[-1])), cp.asarray(np.append(merged_k, merged_k[-1]))
    assert same_bits(run(device_q, device_k, **longest), want)
    assert (len(cupyflash._validate._VERDICTS), len(_cuda_backend._FORWARD_CALLS)) == (verdicts, plans)


def test_many_sequences_on_the_device():
    """More sequences than the work list's kernel has threads (work_list.cu takes them in rounds), of random
    lengths from 0, their offsets left on the device: every sequence's rows against the float64 reference."""
    rng = np.random.default_rng(11)
    lens_q, lens_k = rng.integers(0, 40, 2500), rng.integers(0, 40, 2500)
    cu_q, cu_k, q, k, v, _ = packed_batch(lens_q, lens_k, np.dtype(np.float16), 11, 2, 1, 64)
    out, lse = cupyflash.attention(*(to_device(x) for x in (q, k, v)), return_lse=True, cu_seqlens_q=cp.asarray(cu_q),
                                   cu_seqlens_k=cp.asarray(cu_k), max_seqlen_q=40, max_seqlen_k=40)
    ref_out, ref_lse = cupyflash.reference.attention(q, k, v, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    np.testing.assert_allclose(out.get().astype(np.float64), ref_out, rtol=0, atol=4 * eps(np.dtype(np.float16)))
    np.testing.assert_allclose(lse.get(), ref_lse, rtol=1e-5, atol=2e-6)
