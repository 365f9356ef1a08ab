"""Ring attention (cupyflash.distributed) on LocalRing threads: the ranks' shards equal full
attention on the gathered sequence, forward and backward, in both layouts; causal zigzag work is
balanced; errors raise on every rank without a hang; the launcher and its rendezvous; and, on
GPUs, the CuPy path, NcclComm and two processes through the launcher."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupyflash
from cupyflash.distributed import (LocalRing, ring_attention, ring_attention_backward, ring_attention_vjp,
                                   zigzag_shard, zigzag_unshard)
from cupyflash.distributed import _ring


def shard(x, rank, world, layout, axis=1):
    if layout == "zigzag":
        return zigzag_shard(x, rank, world, axis)
    return np.split(x, world, axis)[rank]


def unshard(shards, layout, axis=1):
    return zigzag_unshard(shards, axis) if layout == "zigzag" else np.concatenate(shards, axis)


def global_inputs(seqlen, dtype, seed, batch=2, nheads=4, nheads_kv=2, headdim=8):
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((batch, seqlen, nheads, headdim)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((batch, seqlen, nheads_kv, headdim)).astype(dtype) for _ in range(2))
    return q, k, v, dout


def run_ring(world, layout, q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) of the ring on ``world`` threads, gathered."""
    def rank_main(comm):
        args = [shard(x, comm.rank, world, layout) for x in (q, k, v)]
        out, lse = ring_attention(*args, comm=comm, return_lse=True, layout=layout, **kw)
        grads = ring_attention_backward(shard(dout, comm.rank, world, layout), *args, out, lse, comm=comm,
                                        layout=layout, **kw)
        return out, lse, *grads

    results = LocalRing(world, timeout=30).run(rank_main)
    return tuple(unshard([r[i] for r in results], layout, axis=2 if i == 1 else 1) for i in range(5))


def reference(q, k, v, dout, return_dsink=False, **kw):
    out, lse = cupyflash.reference.attention(q, k, v, return_lse=True, **kw)
    return (out, lse, *cupyflash.reference.attention_backward(dout, q, k, v, out, lse, return_dsink=return_dsink, **kw))


def assert_matches(got, want, dtype):
    tol = 1e-12 if dtype == np.float64 else 3e-5
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=0, atol=tol * scale, err_msg=name)
    assert got[0].dtype == dtype and got[1].dtype == dtype and all(g.dtype == dtype for g in got[2:])


HEADS = [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (3, 3)]


@given(world=st.integers(1, 8), layout=st.sampled_from(_ring.LAYOUTS), causal=st.booleans(),
       window=st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 12), st.integers(-1, 12))),
       softcap=st.sampled_from([0.0, 2.5]), heads=st.sampled_from(HEADS), headdim=st.sampled_from([4, 8, 16]),
       batch=st.integers(1, 2), half=st.integers(1, 5), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1))
def test_ring_equals_attention_on_the_gathered_sequence(world, layout, causal, window, softcap, heads, headdim,
                                                        batch, half, dtype, seed):
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    q, k, v, dout = global_inputs(world * 2 * half, dtype, seed, batch, *heads, headdim)
    assert_matches(run_ring(world, layout, q, k, v, dout, **kw), reference(q, k, v, dout, **kw), dtype)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", _ring.LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window_size=(4, -1))], ids=["full", "sliding"])
def test_learnable_sinks(world, layout, dtype, kw):
    """A sink joins each row once, after the blocks' merge (a window hides every key from no row here, but
    from some ranks' blocks); dsink is the whole gradient, the same bits on every rank."""
    q, k, v, dout = global_inputs(world * 6, dtype, world, nheads=3, nheads_kv=1)
    sink = np.array([1.5, -np.inf, -0.5], dtype)

    def rank_main(comm):
        args = [shard(x, comm.rank, world, layout) for x in (q, k, v)]
        out, lse = ring_attention(*args, comm=comm, return_lse=True, layout=layout, learnable_sink=sink, **kw)
        grads = ring_attention_backward(shard(dout, comm.rank, world, layout), *args, out, lse, comm=comm,
                                        layout=layout, learnable_sink=sink, return_dsink=True, **kw)
        return out, lse, *grads

    results = LocalRing(world, timeout=30).run(rank_main)
    got = tuple(unshard([r[i] for r in results], layout, axis=2 if i == 1 else 1) for i in range(5))
    assert all(np.array_equal(r[5], results[0][5]) for r in results)
    want = reference(q, k, v, dout, learnable_sink=sink, return_dsink=True, **kw)
    assert_matches(got, want[:5], dtype)
    tol = 1e-12 if dtype == np.float64 else 3e-5
    np.testing.assert_allclose(results[0][5], want[5], rtol=0, atol=tol * max(1.0, float(np.abs(want[5]).max())))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", _ring.LAYOUTS)
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, window_size=(5, -1), softcap=3.0),
                                dict(window_size=(2, 7))], ids=["full", "causal", "causal-window-softcap", "window"])
def test_every_world_layout_and_mask(world, layout, kw):
    q, k, v, dout = global_inputs(world * 6, np.float64, world, nheads=3, nheads_kv=1)
    assert_matches(run_ring(world, layout, q, k, v, dout, **kw), reference(q, k, v, dout, **kw), np.float64)


def test_pieces_longer_than_a_tile():
    # 65-row chunks: the backend's 64-row tiles end inside every piece
    kw = dict(causal=True, window_size=(100, -1))
    q, k, v, dout = global_inputs(2 * 130, np.float64, 3, batch=1)
    assert_matches(run_ring(2, "zigzag", q, k, v, dout, **kw), reference(q, k, v, dout, **kw), np.float64)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16_bit_inputs_match_the_numpy_backend_on_the_gathered_sequence(dtype):
    q, k, v, dout = global_inputs(3 * 8, dtype, 5)
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    want = (out, lse, *cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True))
    got = run_ring(3, "zigzag", q, k, v, dout, causal=True)
    eps = float(ml_dtypes.finfo(dtype).eps)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        w = w.astype(np.float64)  # a few roundings apart: the ring merges 16-bit partial results
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=0, atol=4 * eps * max(1.0, float(np.abs(w).max())))


def test_vjp_equals_forward_then_backward():
    world, layout, kw = 4, "zigzag", dict(causal=True, softcap=5.0)
    q, k, v, dout = global_inputs(world * 4, np.float64, 9)

    def rank_main(comm):
        args = [shard(x, comm.rank, world, layout) for x in (q, k, v)]
        out, vjp = ring_attention_vjp(*args, comm=comm, **kw)
        return out, *vjp(shard(dout, comm.rank, world, layout))

    results = LocalRing(world).run(rank_main)
    got = [unshard([r[i] for r in results], layout) for i in range(4)]
    want = reference(q, k, v, dout, **kw)
    for g, w in zip(got, want[:1] + want[2:]):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


def _visible_pairs(spec):
    """Query-key pairs one backend call computes."""
    return int(cupyflash.reference.visibility(spec)[0, 0].sum())


@pytest.mark.parametrize("world", [2, 3, 8])
def test_causal_zigzag_gives_every_rank_the_same_work_without_masks(world):
    q = np.zeros((1, 8, 2, 4), np.float32)
    base = cupyflash._validate.check_call("test", q, q, q, causal=True)
    work = {}
    for layout in _ring.LAYOUTS:
        for rank in range(world):
            pieces = [spec for step in range(world)
                      for _, _, spec in _ring._calls(base, _ring._segments(layout, rank, world, 8),
                                                     _ring._segments(layout, (rank - step) % world, world, 8), np)]
            assert all(spec.attn_mask is None for spec in pieces)
            work[layout, rank] = sum(_visible_pairs(spec) for spec in pieces)
    total = (world * 8) * (world * 8 + 1) // 2
    assert sum(work["zigzag", r] for r in range(world)) == total == sum(work["contiguous", r] for r in range(world))
    assert len({work["zigzag", r] for r in range(world)}) == 1
    assert work["contiguous", world - 1] > work["contiguous", 0]


def test_windows_use_masks_only_where_a_pair_is_partly_visible():
    q = np.zeros((1, 8, 2, 4), np.float32)
    base = cupyflash._validate.check_call("test", q, q, q, window_size=(6, 0))
    pieces = [spec for step in range(4) for _, _, spec in _ring._calls(
        base, _ring._segments("zigzag", 1, 4, 8), _ring._segments("zigzag", (1 - step) % 4, 4, 8), np)]
    masked = [spec for spec in pieces if spec.attn_mask is not None]
    assert masked and len(masked) < len(pieces)
    # chunk 1 (rows 4-7) sees rows 0-3 through a window of 6: key j when i - 6 <= j
    assert sum(_visible_pairs(spec) for spec in pieces) == sum(min(i, 6) + 1 for i in (4, 5, 6, 7, 24, 25, 26, 27))


@given(world=st.integers(1, 8), chunk=st.integers(1, 4), axis=st.integers(-3, 2), seed=st.integers(0, 1000))
def test_zigzag_shard_and_unshard_round_trip(world, chunk, axis, seed):
    shape = [2, 3, 4]
    shape[axis] = 2 * world * chunk
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    shards = [zigzag_shard(x, r, world, axis) for r in range(world)]
    np.testing.assert_array_equal(zigzag_unshard(shards, axis), x)
    first = np.moveaxis(shards[world - 1], axis, 0)
    np.testing.assert_array_equal(first[:chunk], np.moveaxis(x, axis, 0)[(world - 1) * chunk:world * chunk])
    np.testing.assert_array_equal(first[chunk:], np.moveaxis(x, axis, 0)[world * chunk:(world + 1) * chunk])


# ---- errors: raised on every rank, never a hang


def run_each(world, rank_main):
    """Every rank's result or exception, within LocalRing's timeout."""
    start = time.monotonic()
    results = LocalRing(world, timeout=10).run(rank_main, return_exceptions=True)
    assert time.monotonic() - start < 10
    return results


def test_shapes_that_differ_across_ranks_raise_on_every_rank():
    def rank_main(comm):
        q, k, v, _ = global_inputs(6 if comm.rank == 2 else 8, np.float32, comm.rank)
        return ring_attention(q, k, v, comm=comm)

    for r, result in enumerate(run_each(3, rank_main)):
        assert isinstance(result, ValueError), (r, result)
        assert re.search(r"ring_attention: q.shape on rank 2 must equal rank 0's \(2, 8, 4, 8\) \(every rank passes "
                         r"its shard of the same call\), got \(2, 6, 4, 8\)", str(result))


def test_keywords_that_differ_across_ranks_raise_on_every_rank():
    def rank_main(comm):
        q, k, v, _ = global_inputs(8, np.float32, comm.rank)
        return ring_attention(q, k, v, comm=comm, causal=comm.rank == 1)

    results = run_each(2, rank_main)
    assert all(isinstance(r, ValueError) and "causal on rank 1 must equal rank 0's False" in str(r) for r in results)

    def sink_on_one(comm):
        q, k, v, _ = global_inputs(8, np.float32, comm.rank)
        return ring_attention(q, k, v, comm=comm, learnable_sink=np.zeros(4, np.float32) if comm.rank else None)

    results = run_each(2, sink_on_one)
    assert all(isinstance(r, ValueError) and "a learnable_sink on rank 1 must equal rank 0's False" in str(r)
               for r in results)


def test_an_invalid_argument_on_one_rank_raises_there_and_on_every_other_rank():
    def rank_main(comm):
        q, k, v, _ = global_inputs(8, np.float32, comm.rank)
        return ring_attention(q, k, v.astype(np.float64) if comm.rank == 1 else v, comm=comm)

    results = run_each(3, rank_main)
    assert isinstance(results[1], TypeError) and "v.dtype must equal q.dtype=float32, got float64" in str(results[1])
    for r in (0, 2):
        assert isinstance(results[r], ValueError) and "rank 1 rejected its arguments" in str(results[r])


def test_a_bad_backward_argument_raises_on_every_rank():
    def rank_main(comm):
        q, k, v, dout = global_inputs(8, np.float32, comm.rank)
        out, lse = ring_attention(q, k, v, comm=comm, return_lse=True)
        return ring_attention_backward(dout, q, k, v, out, lse[:, :, :4] if comm.rank == 0 else lse, comm=comm)

    results = run_each(2, rank_main)
    assert isinstance(results[0], ValueError) and "lse.shape must be (batch, nheads, seqlen_q)" in str(results[0])
    assert isinstance(results[1], ValueError) and "rank 0 rejected its arguments" in str(results[1])


@pytest.mark.parametrize("layout, seqlen, pattern", [
    ("zigzag", 7, r"q.shape\[1\] \(seqlen_local\) must be even with layout='zigzag'"),
    ("ring", 8, r"layout must be one of 'zigzag', 'contiguous', got 'ring'"),
])
def test_bad_layout_or_seqlen_raise_on_every_rank(layout, seqlen, pattern):
    def rank_main(comm):
        q, k, v, _ = global_inputs(seqlen, np.float32, 0)
        return ring_attention(q, k, v, comm=comm, layout=layout)

    assert all(isinstance(r, ValueError) and re.search(pattern, str(r)) for r in run_each(2, rank_main))


class NotARing:
    size, rank = 2, 5

    def sendrecv(self, arrays, dst, src):
        raise AssertionError("never reached")


@pytest.mark.parametrize("comm, exc, pattern", [
    (None, TypeError, r"ring_attention: comm must be a communicator with rank, size and sendrecv .*, got NoneType"),
    (LocalRing(2), TypeError, r"comm must be a communicator .*, got cupyflash.distributed._comm.LocalRing"),
    (NotARing(), ValueError, r"comm.rank must be an int in \[0, comm.size=2\), got 5"),
])
def test_bad_comm(comm, exc, pattern):
    q, k, v, _ = global_inputs(8, np.float32, 0)
    with pytest.raises(exc, match=pattern):
        ring_attention(q, k, v, comm=comm)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda x: zigzag_shard(x, 0, 4), ValueError, r"zigzag_shard: x.shape\[1\] must be a multiple of 2 \* world = 8, "
                                                  r"got 12"),
    (lambda x: zigzag_shard(x, 3, 3), ValueError, r"zigzag_shard: rank must be in \[0, world=3\), got 3"),
    (lambda x: zigzag_shard(x, 0, 1, axis=3), ValueError, r"axis must be in \[-3, 3\)"),
    (lambda x: zigzag_shard(x.tolist(), 0, 1), TypeError, r"x must be a numpy.ndarray or cupy.ndarray, got list"),
    (lambda x: zigzag_unshard([x, x[:, :6]]), ValueError, r"shards\[1\].shape must equal shards\[0\].shape"),
    (lambda x: zigzag_unshard(x), TypeError, r"shards must be a non-empty list of arrays"),
])
def test_bad_shard_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(np.zeros((2, 12, 3), np.float32))


def test_local_ring_times_out_instead_of_hanging():
    def rank_main(comm):
        if comm.rank == 0:
            return comm.sendrecv([np.zeros(3)], 1, 1)

    start = time.monotonic()
    results = LocalRing(2, timeout=0.5).run(rank_main, return_exceptions=True)
    assert isinstance(results[0], TimeoutError) and "rank 0 waited 0.5 s for rank 1" in str(results[0])
    assert time.monotonic() - start < 5


# ---- the launcher (processes and rendezvous; no GPU needed)


def launch(tmp_path, nproc, worker, timeout=60):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(worker))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cupyflash.distributed.launch", "--nproc", str(nproc), str(script),
                           "an-argument"], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_import_needs_neither_cupy_nor_mpi4py():
    code = "import sys, cupyflash.distributed; assert not {'cupy', 'mpi4py'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__))


def test_launcher_starts_every_rank_and_serves_the_rendezvous(tmp_path):
    proc, _ = launch(tmp_path, 3, """
        import os, sys
        from cupyflash.distributed import _rendezvous
        rank, address = int(os.environ["RANK"]), os.environ["CUPYFLASH_RENDEZVOUS"]
        if rank == 0:
            _rendezvous.publish(address, "greeting", b"hello from rank 0")
        print(f"rank {rank} of {os.environ['WORLD_SIZE']} {sys.argv[1]}: "
              f"{_rendezvous.fetch(address, 'greeting').decode()}", flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    # the processes share one pipe: lines may interleave
    assert sorted(re.findall(r"rank (\d) of 3 an-argument: hello from rank 0", proc.stdout)) == ["0", "1", "2"]


def test_launcher_stops_the_others_when_a_rank_fails(tmp_path):
    proc, elapsed = launch(tmp_path, 2, """
        import os, sys
        from cupyflash.distributed import _rendezvous
        if os.environ["RANK"] == "1":
            sys.exit(3)
        _rendezvous.fetch(os.environ["CUPYFLASH_RENDEZVOUS"], "nobody-publishes-this")
    """)
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 30


@pytest.mark.parametrize("unique_id", [bytes(range(256))[::2], tuple(range(-64, 64))], ids=["bytes", "tuple"])
def test_the_nccl_unique_id_crosses_the_rendezvous_as_made(unique_id):
    # CuPy 14's get_unique_id gives bytes and NcclCommunicator takes only bytes; older CuPy, a tuple
    from cupyflash.distributed import _comm

    back = _comm._decode_unique_id(_comm._encode_unique_id(unique_id))
    assert type(back) is type(unique_id) and back == unique_id


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_launcher_stopped_by_a_signal_stops_every_rank(tmp_path, signum):
    # what `timeout` and Ctrl-C send: the ranks must not outlive the launcher (they would hold the GPUs)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import os, time
        open(f"rank{os.environ['RANK']}.pid", "w").write(str(os.getpid()))
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, "-m", "cupyflash.distributed.launch", "--nproc", "2", str(script)],
                            cwd=tmp_path)
    pid_files = [tmp_path / f"rank{r}.pid" for r in range(2)]
    deadline = time.monotonic() + 30
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum
    for f in pid_files:
        pid = int(f.read_text())
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the launcher
            os.kill(pid, 0)


# ---- GPUs


def _to_device(cp, x):
    """Host array to the current device, bit for bit (CuPy's bfloat16 is young)."""
    return cp.asarray(x.view(np.uint16 if x.dtype.itemsize == 2 else x.dtype)).view(x.dtype)


def _to_host(x):
    return x.view("uint16").get().view(x.dtype) if x.dtype.itemsize == 2 else x.get()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", _ring.LAYOUTS)
def test_local_ring_on_cupy_matches_attention_on_the_gathered_sequence(layout, dtype):
    cp = pytest.importorskip("cupy")
    world = 4
    kw = dict(causal=True, window_size=(100, -1), softcap=10.0,
              learnable_sink=cp.asarray(np.array([2.0, 0.0, -1.0, -np.inf, 0.5, -4.0], np.float32)))
    host = global_inputs(world * 96, dtype, 1, nheads=6, nheads_kv=2, headdim=64)
    q, k, v, dout = (_to_device(cp, x) for x in host)
    out, lse = cupyflash.attention(q, k, v, return_lse=True, **kw)
    want = (out, lse, *cupyflash.attention_backward(dout, q, k, v, out, lse, return_dsink=True, **kw))

    def rank_main(comm):
        with cp.cuda.Device(0):
            args = [_to_device(cp, shard(x, comm.rank, world, layout)) for x in host]
            out, lse = ring_attention(*args[:3], comm=comm, return_lse=True, layout=layout, **kw)
            return out, lse, *ring_attention_backward(args[3], *args[:3], out, lse, comm=comm, layout=layout,
                                                      return_dsink=True, **kw)

    results = LocalRing(world).run(rank_main)
    assert all(bool((r[5] == results[0][5]).all()) for r in results)  # dsink: the same bits on every rank
    # two orders of the same sums, each rounded to the dtype: up to a few of its units in the last place
    tol = max(1e-2, 2 * float(ml_dtypes.finfo(dtype).eps))
    for i, w in enumerate(want):
        got = _to_host(results[0][i]) if i == 5 else unshard([_to_host(r[i]) for r in results], layout,
                                                               axis=2 if i == 1 else 1)
        assert got.dtype == w.dtype
        w = _to_host(w).astype(np.float64)
        np.testing.assert_allclose(got.astype(np.float64), w, rtol=0, atol=tol * max(1.0, float(np.abs(w).max())))


def _nccl():
    cp = pytest.importorskip("cupy")
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("cupy has no NCCL")
    return cp, nccl


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 1001])  # dK/dV exchanged whole, or in pieces of an odd size
def test_nccl_comm_of_one_gpu_runs_the_ring(chunk, monkeypatch):
    cp, nccl = _nccl()
    from cupyflash.distributed import NcclComm, _comm

    if chunk is not None:
        monkeypatch.setattr(_comm, "EXCHANGE_CHUNK_BYTES", chunk)

    with cp.cuda.Device(0):
        comm = NcclComm(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0))
        q, k, v, dout = (cp.asarray(x) for x in global_inputs(256, np.float32, 2, headdim=64))
        out, vjp = ring_attention_vjp(q, k, v, comm=comm, causal=True)
        grads = vjp(dout)
        want_out, want_lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
        want = (want_out, *cupyflash.attention_backward(dout, q, k, v, want_out, want_lse, causal=True))
        for g, w in zip((out, *grads), want):
            np.testing.assert_allclose(g.get(), w.get(), rtol=0, atol=1e-5)
        (back,) = comm.sendrecv([np.arange(5)], 0, 0)  # host arrays go through the device
        np.testing.assert_array_equal(back, np.arange(5))


TWO_GPU_WORKER = """
    import sys, time
    import cupy
    import ml_dtypes
    import numpy as np
    import cupyflash
    from cupyflash.distributed import NcclComm, _comm, ring_attention, ring_attention_backward, zigzag_shard

    comm = NcclComm.from_env()
    rank, world = comm.rank, comm.size
    print(f"rank {rank} on device {cupy.cuda.Device().id}", flush=True)

    def up(x):  # host -> this device, bit for bit (bfloat16 included)
        return cupy.asarray(x.view(np.uint16) if x.dtype.itemsize == 2 else x).view(x.dtype)

    def down(x):
        return x.view(cupy.uint16).get().view(x.dtype) if x.dtype.itemsize == 2 else x.get()

    def split(x, layout, axis=1):
        return zigzag_shard(x, rank, world, axis) if layout == "zigzag" else np.split(x, world, axis)[rank]

    # flash-attn's rule against the float64 reference on the gathered sequence: the ring's error at
    # most twice one GPU's (same kernels, whole sequence) plus a floor of a few roundings
    # (the last case moves dK/dV through the in-place exchange in pieces of an odd number of bytes)
    kw = dict(causal=True, window_size=(700, -1), softcap=20.0)
    ok = True
    default_chunk = _comm.EXCHANGE_CHUNK_BYTES
    for dtype, layout, seqlen_local, chunk in [(np.float16, "zigzag", 512, default_chunk),
                                               (ml_dtypes.bfloat16, "zigzag", 512, default_chunk),
                                               (np.float32, "zigzag", 512, default_chunk),
                                               (ml_dtypes.bfloat16, "contiguous", 509, 1001)]:
        _comm.EXCHANGE_CHUNK_BYTES = chunk
        rng = np.random.default_rng(0)  # the same global sequence on every rank
        q, k, v, dout = (rng.standard_normal((2, world * seqlen_local, h, 64)).astype(dtype) for h in (8, 2, 2, 8))
        wide = [x.astype(np.float64) for x in (q, k, v, dout)]
        out, lse = cupyflash.reference.attention(*wide[:3], return_lse=True, **kw)
        ref = (out, lse, *cupyflash.reference.attention_backward(wide[3], *wide[:3], out, lse, **kw))
        dev = [up(x) for x in (q, k, v, dout)]
        out, lse = cupyflash.attention(*dev[:3], return_lse=True, **kw)
        single = [down(x) for x in (out, lse, *cupyflash.attention_backward(dev[3], *dev[:3], out, lse, **kw))]
        mine = [up(split(x, layout)) for x in (q, k, v, dout)]
        out, lse = ring_attention(*mine[:3], comm=comm, return_lse=True, layout=layout, **kw)
        got = [down(x) for x in (out, lse, *ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm,
                                                                     layout=layout, **kw))]
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            axis = 2 if name == "lse" else 1
            want = split(ref[i], layout, axis)
            one = split(single[i], layout, axis).astype(np.float64)
            mine_i = got[i].astype(np.float64)
            wide_out = name == "lse" or dtype == np.float32  # float32 results: exp/log rounding, not storage
            floor = (16 * float(np.finfo(np.float32).eps) if wide_out else 2 * float(ml_dtypes.finfo(dtype).eps))
            ring_err, one_err = float(np.abs(mine_i - want).max()), float(np.abs(one - want).max())
            bound = 2 * one_err + floor * max(1.0, float(np.abs(want).max()))
            passed = bool(np.isfinite(mine_i).all()) and got[i].dtype == single[i].dtype and ring_err <= bound
            ok &= passed
            print(f"rank {rank} {np.dtype(dtype).name} {layout} seqlen_local {seqlen_local} {name}: ring error "
                  f"{ring_err:.2e}, one GPU {one_err:.2e}, bound {bound:.2e}{'' if passed else ' FAIL'}", flush=True)

    # shapes that differ across ranks: an error on every rank, not a hang; the ring stays usable
    q = up(np.random.default_rng(1).standard_normal((1, 6 if rank == 1 else 8, 2, 64)).astype(np.float32))
    start = time.monotonic()
    try:
        ring_attention(q, q, q, comm=comm)
        print(f"rank {rank} mismatched shapes: no error FAIL", flush=True)
        ok = False
    except ValueError as exc:
        print(f"rank {rank} mismatched shapes: ValueError after {time.monotonic() - start:.2f} s: {exc}", flush=True)
    q = up(np.random.default_rng(1).standard_normal((1, 8, 2, 64)).astype(np.float32))
    want = cupyflash.attention(up(np.concatenate([q.get()] * world, 1)), up(np.concatenate([q.get()] * world, 1)),
                               up(np.concatenate([q.get()] * world, 1)))[:, rank * 8:(rank + 1) * 8]
    after = ring_attention(q, q, q, comm=comm, layout="contiguous")
    ok &= bool(abs(after - want).max() < 1e-4)
    print(f"rank {rank} after the error: ring call max error {float(abs(after - want).max()):.1e}", flush=True)
    sys.exit(0 if ok else 1)
"""


@pytest.mark.gpu
def test_two_gpus_through_the_launcher_match_one_gpu_on_the_gathered_sequence(tmp_path):
    cp, _ = _nccl()
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    proc, _ = launch(tmp_path, 2, TWO_GPU_WORKER, timeout=600)
    print(proc.stdout)  # the errors of every case (pytest -rA shows them)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(re.findall(r"rank (\d) on device (\d)", proc.stdout)) == [("0", "0"), ("1", "1")], proc.stdout
    assert len(re.findall(r"ring error", proc.stdout)) == 2 * 4 * 5 and "FAIL" not in proc.stdout, proc.stdout
    assert len(re.findall(r"mismatched shapes: ValueError", proc.stdout)) == 2, proc.stdout


def test_example_runs_on_numpy(tmp_path):
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ring_attention.py")
    proc = subprocess.run([sys.executable, example, "--numpy", "--world", "3"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = [float(e) for e in re.findall(r"max error vs one device (\S+)", proc.stdout)]
    assert len(errors) == 3 and max(errors) < 1e-5, proc.stdout
    assert "scaling efficiency" in proc.stdout
