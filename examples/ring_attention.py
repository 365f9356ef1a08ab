"""Ring attention forward + backward over N ranks, timed per rank against one device.

    python -m cupyflash.distributed.launch --nproc 2 examples/ring_attention.py   # 2 GPUs over NCCL
    python -m cupyflash.distributed.launch --nproc 2 examples/ring_attention.py \\
        --seqlen-local 131072 --nheads 32 --headdim 128 --repeats 2              # 256k tokens in all
    python examples/ring_attention.py --world 4          # 4 LocalRing threads sharing one GPU
    python examples/ring_attention.py --numpy            # LocalRing threads on the CPU, small sizes

Each rank holds ``seqlen_local`` tokens of one sequence (zigzag layout) and runs
``ring_attention`` then ``ring_attention_backward``; its shards of out, dq, dk and dv are checked
against one device's attention on the gathered sequence (every rank computes that baseline on its
own device, after the ring). Per rank it prints the time of forward and backward and the memory
held at the peak. Scaling efficiency = (one device's time on the gathered sequence / devices) / the
slowest rank's time: 100 % is the work split perfectly, nothing lost to imbalance or transfers.
Under LocalRing every rank shares one device, so "devices" is 1 there, and the memory is that of
all ranks together.

``--beyond-one-device`` (under the launcher) is for sequences one device cannot hold: it skips the
one-device run and prints instead what one device would hold at once for the gathered sequence
against the device's memory. Every run also checks two identities of exact attention gradients
over the whole sequence, summed over the ranks: <dv, v> = <dout, out> and <dq, q> = <dk, k> (without
softcap), which any wrong block of the gradients breaks.

On GPUs the data are drawn on the device from a seeded generator (the same on every rank, checked
by a checksum), and the kernels are compiled by one warm-up call on a small problem of the same
dtype, heads and layout, so the timed calls are the long ones alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import ml_dtypes
import numpy as np

import cupyflash
from cupyflash.distributed import LocalRing, NcclComm, ring_attention, ring_attention_backward, zigzag_shard

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
DEFAULTS = {  # (seqlen_local, nheads, headdim, dtype, repeats)
    "gpu": (4096, 16, 128, "bfloat16", 5),
    "numpy": (128, 4, 32, "float32", 1),
}
WARMUP_SEQLEN_LOCAL = 1024  # tokens per rank of the warm-up call (GPU)


def human(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class Device:
    """What the measurements need of NumPy or CuPy: arrays, a synchronisation, a memory peak."""

    def __init__(self, xp):
        self.xp = xp
        self.gpu = xp is not np

    def sync(self):
        if self.gpu:
            self.xp.cuda.Device().synchronize()

    def reset_peak(self):
        if self.gpu:
            self.sync()
            self.xp.get_default_memory_pool().free_all_blocks()  # total_bytes() then only grows
        else:
            tracemalloc.start()
            tracemalloc.reset_peak()

    def peak(self):
        if self.gpu:
            self.sync()
            return self.xp.get_default_memory_pool().total_bytes()
        return tracemalloc.get_traced_memory()[1]


# CuPy's bfloat16 (ml_dtypes) is young: on the GPU this example moves and converts it by its bits.
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def raw(x):
    """The same memory as unsigned ints of x's width (copies, slices and concatenations by bits)."""
    return x.view(_UINT[x.dtype.itemsize])


def is_gpu_bf16(device, dtype):
    return device.gpu and np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def narrow(device, x32, dtype):
    """float32 -> dtype, rounding to nearest even."""
    if not is_gpu_bf16(device, dtype):
        return x32.astype(dtype)
    bits = x32.view(device.xp.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(device.xp.uint16).view(dtype)


def widen(device, x):
    """x as float32 (exact from 16-bit floats)."""
    if is_gpu_bf16(device, x.dtype):
        return (raw(x).astype(device.xp.uint32) << 16).view(device.xp.float32)
    return x.astype(np.float32)


def shard(x, rank, world):
    """zigzag_shard along the sequence, moved by bits."""
    return zigzag_shard(raw(x), rank, world).view(x.dtype)


def global_problem(device, args, dtype, world, seqlen_local=None, seed=0):
    """The whole sequence, the same on every rank: q, k, v, dout (on the device)."""
    seqlen = world * (seqlen_local or args.seqlen_local)
    heads = (args.nheads, args.nheads_kv, args.nheads_kv, args.nheads)
    shapes = [(args.batch, seqlen, h, args.headdim) for h in heads]
    if not device.gpu:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    cp = device.xp
    arrays = []
    for i, shape in enumerate(shapes):
        x = cp.empty(shape, dtype)
        rs = cp.random.RandomState(seed * 16 + i)
        rows = max(1, 2**27 // (shape[0] * shape[2] * shape[3]))  # pieces of 128 Mi float32 draws
        for a in range(0, seqlen, rows):
            b = min(seqlen, a + rows)
            piece = narrow(device, rs.standard_normal((shape[0], b - a, *shape[2:]), dtype=cp.float32), x.dtype)
            raw(x)[:, a:b] = raw(piece)
        arrays.append(x)
    return arrays


def checksum(device, arrays):
    """A float that differs if the arrays do (a sparse sample, summed in float64)."""
    total = 0.0
    for x in arrays:
        total += float(widen(device, x.reshape(-1)[::4099]).astype(np.float64).sum())
    return total


def timed(device, fn, repeats, warmup):
    """(result, median forward seconds, median forward + backward seconds): ``warmup()`` once
    (kernel compilation), then ``fn(sync)`` ``repeats`` times; fn returns (result, the
    perf_counter() after its forward)."""
    warmup()
    fwd, total = [], []
    result = None
    for _ in range(repeats):
        result = None  # the last call's arrays go back to the pool first
        device.sync()
        start = time.perf_counter()
        result, mid = fn(device.sync)
        device.sync()
        end = time.perf_counter()
        fwd.append(mid - start)
        total.append(end - start)
    return result, float(np.median(fwd)), float(np.median(total))


def single_device_fn(q, k, v, dout, causal):
    def fwd_bwd(sync):
        out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
        sync()
        mid = time.perf_counter()
        return (out, *cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal)), mid

    return fwd_bwd


def ring_fn(comm, q, k, v, dout, causal):
    def fwd_bwd(sync):
        out, lse = ring_attention(q, k, v, comm=comm, causal=causal, return_lse=True)
        sync()
        mid = time.perf_counter()
        return (out, *ring_attention_backward(dout, q, k, v, out, lse, comm=comm, causal=causal)), mid

    return fwd_bwd


def breakdown(device, comm, q, k, v, dout, causal, repeats):
    """Where a rank's ring time goes: (forward, backward) seconds of the same attention pieces that
    the ring computes on this rank, alone (no transfers, no merges; data of its own block), and the
    seconds of one K/V hop and of one float32 dK/dV hop around the ring. Uses the ring's private
    schedule (cupyflash.distributed._ring), so it is a diagnostic, not an API."""
    from cupyflash import _validate
    from cupyflash.distributed import _ring

    xp, rank, world, n = device.xp, comm.rank, comm.size, q.shape[1]
    base = _validate.check_call("breakdown", q, k, v, causal=causal)
    q_rows = _ring._segments("zigzag", rank, world, n)
    pieces = [(qs, ks, spec) for step in range(world)
              for qs, ks, spec in _ring._calls(base, q_rows, _ring._segments("zigzag", (rank - step) % world, world, n),
                                                xp)]

    def kw(spec):
        return dict(causal=spec.causal, window_size=spec.window, softcap=spec.softcap, scale=spec.scale,
                    attn_mask=spec.attn_mask)

    fwd, bwd = [], []
    for _ in range(repeats):
        device.sync()
        start = time.perf_counter()
        outs = [cupyflash.attention(q[:, qs], k[:, ks], v[:, ks], return_lse=True, **kw(spec))
                for qs, ks, spec in pieces]
        device.sync()
        mid = time.perf_counter()
        for (qs, ks, spec), (out, lse) in zip(pieces, outs):
            cupyflash.attention_backward(dout[:, qs], q[:, qs], k[:, ks], v[:, ks], out, lse, **kw(spec))
        device.sync()
        fwd.append(mid - start)
        bwd.append(time.perf_counter() - mid)
        del outs
    hops = []
    for arrays in ([k, v], [xp.zeros(k.shape, xp.float32), xp.zeros(v.shape, xp.float32)]):
        comm.sendrecv(arrays, (rank + 1) % world, (rank - 1) % world)  # the connection's first use
        device.sync()
        start = time.perf_counter()
        comm.sendrecv(arrays, (rank + 1) % world, (rank - 1) % world)
        device.sync()
        hops.append(time.perf_counter() - start)
    return float(np.median(fwd)), float(np.median(bwd)), hops[0], hops[1], len(pieces)


def errors(device, got, want):
    """(max |got - want| / max(1, max |want|), worst ||got - want|| / ||want||) over the tensors,
    in float32 on the arrays' device."""
    xp = device.xp
    worst_max = worst_norm = 0.0
    for g, w in zip(got, want):
        g, w = widen(device, g), widen(device, w)
        d = g - w
        worst_max = max(worst_max, float(abs(d).max()) / max(1.0, float(abs(w).max())))
        worst_norm = max(worst_norm, float(xp.linalg.norm(d.ravel())) / max(1e-30, float(xp.linalg.norm(w.ravel()))))
    return worst_max, worst_norm


def dot(device, a, b):
    """sum(a * b) in float64, in slices along the sequence (no full-size temporary)."""
    total = 0.0
    for start in range(0, a.shape[1], 16384):
        piece = slice(start, start + 16384)
        total += float((widen(device, a[:, piece]).astype(np.float64) * widen(device, b[:, piece])).sum())
    return total


def identities(device, comm, shards, grads):
    """The relative misfit of <dv, v> = <dout, out> and of <dq, q> = <dk, k>, summed over the ranks."""
    q, k, v, dout = shards
    out, dq, dk, dv = grads
    sums = [sum(ring_allgather(comm, dot(device, a, b))) for a, b in ((dv, v), (dout, out), (dq, q), (dk, k))]
    return [abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in (sums[:2], sums[2:])]


def one_device_need(args, world, dtype):
    """Bytes one device holds at once in a forward + backward on the gathered sequence, at least:
    q, k, v, out, dout and the three gradients in the inputs' dtype, the float32 (float64) dq
    accumulator of the backward, lse and its row statistics."""
    tokens = args.batch * world * args.seqlen_local
    itemsize = np.dtype(dtype).itemsize
    wide = max(4, itemsize)
    per_token = (4 * args.nheads + 4 * args.nheads_kv) * args.headdim * itemsize \
        + args.nheads * (args.headdim * wide + 3 * wide)
    return tokens * per_token


def flops(args, world):
    """Matrix-product flops of forward and of backward on the gathered sequence (causal: half)."""
    seqlen = world * args.seqlen_local
    fwd = 4 * args.batch * args.nheads * args.headdim * seqlen * seqlen * (0.5 if args.causal else 1.0)
    return fwd, 2.5 * fwd


def ring_allgather(comm, value):
    """Every rank's float ``value``, in rank order, passed around the ring."""
    values = {comm.rank: value}
    travelling = np.array([comm.rank, value])
    for _ in range(comm.size - 1):
        (travelling,) = comm.sendrecv([travelling], (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size)
        values[int(travelling[0])] = float(travelling[1])
    return [values[r] for r in range(comm.size)]


def summary(args, world, devices, single, single_peak, ring):
    """``single``: (fwd, total) seconds of one device; ``ring``: every rank's (fwd, total)."""
    seqlen = world * args.seqlen_local
    fwd_flops, bwd_flops = flops(args, world)
    s_fwd, s_total = single
    r_fwd, r_total = max(f for f, _ in ring), max(t for _, t in ring)
    r_bwd = max(t - f for f, t in ring)
    print(f"one device, gathered sequence of {seqlen} tokens: forward {s_fwd * 1e3:.1f} ms + backward "
          f"{(s_total - s_fwd) * 1e3:.1f} ms = {s_total * 1e3:.1f} ms "
          f"({(fwd_flops + bwd_flops) / s_total / 1e12:.1f} TFLOP/s), memory peak {human(single_peak)}")
    print(f"ring over {world} ranks on {devices} device(s), slowest rank: forward {r_fwd * 1e3:.1f} ms "
          f"(efficiency {100 * s_fwd / devices / r_fwd:.0f} %), backward {r_bwd * 1e3:.1f} ms "
          f"(efficiency {100 * (s_total - s_fwd) / devices / r_bwd:.0f} %), per-device "
          f"{(fwd_flops + bwd_flops) / devices / r_total / 1e12:.1f} TFLOP/s")
    print(f"forward + backward: slowest rank {r_total * 1e3:.1f} ms, ideal {s_total / devices * 1e3:.1f} ms, "
          f"scaling efficiency {100 * s_total / devices / r_total:.0f} %")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numpy", action="store_true", help="NumPy on the CPU (also the fallback without a GPU)")
    p.add_argument("--world", type=int, default=4, help="LocalRing ranks (without the launcher)")
    p.add_argument("--seqlen-local", type=int, help="tokens per rank (even)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int)
    p.add_argument("--nheads-kv", type=int, help="default: nheads")
    p.add_argument("--headdim", type=int)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--repeats", type=int, help="timed runs after one warm-up (the median is printed)")
    p.add_argument("--beyond-one-device", action="store_true",
                   help="under the launcher, skip the one-device run (for sequences one device cannot hold)")
    p.add_argument("--breakdown", action="store_true",
                   help="under the launcher, also time the ring's attention pieces alone and one hop of K/V and "
                        "of dK/dV")
    args = p.parse_args(argv)
    launched = "WORLD_SIZE" in os.environ and "CUPYFLASH_RENDEZVOUS" in os.environ
    if not launched and not args.numpy and not gpu_available():
        print("no GPU visible to cupy: running on NumPy (--numpy)")
        args.numpy = True
    preset = DEFAULTS["numpy" if args.numpy else "gpu"]
    for name, value in zip(("seqlen_local", "nheads", "headdim", "dtype", "repeats"), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.nheads_kv = args.nheads_kv or args.nheads
    dtype = DTYPES[args.dtype]

    if args.numpy:
        device = Device(np)
    else:
        import cupy

        device = Device(cupy)
    # the warm-up: the full size on the CPU (nothing to compile), a small problem on GPUs
    warm_local = args.seqlen_local if args.numpy else min(args.seqlen_local, WARMUP_SEQLEN_LOCAL)

    if launched:  # one process per GPU, NCCL between them
        comm = NcclComm.from_env()
        rank, world = comm.rank, comm.size
        problem = global_problem(device, args, dtype, world)
        sums = ring_allgather(comm, checksum(device, problem))
        if max(sums) - min(sums) > 1e-9 * max(1.0, max(abs(x) for x in sums)):
            raise RuntimeError(f"rank {rank}: the ranks drew different data (checksums {sums})")
        shards = [shard(x, rank, world) for x in problem]
        del problem
        warm = [shard(x, rank, world) for x in global_problem(device, args, dtype, world, warm_local, seed=1)]
        device.reset_peak()
        got, fwd, total = timed(device, ring_fn(comm, *shards, args.causal), args.repeats,
                                lambda: ring_fn(comm, *warm, args.causal)(device.sync))
        ring_peak = device.peak()
        if args.breakdown:
            p_fwd, p_bwd, kv_hop, grad_hop, n_pieces = breakdown(device, comm, *shards, args.causal, args.repeats)
            print(f"rank {rank}: its {n_pieces} attention pieces alone: forward {p_fwd * 1e3:.1f} ms + backward "
                  f"{p_bwd * 1e3:.1f} ms = {(p_fwd + p_bwd) * 1e3:.1f} ms; one K/V hop {kv_hop * 1e3:.1f} ms, "
                  f"one float32 dK/dV hop {grad_hop * 1e3:.1f} ms", flush=True)
        del warm
        misfit = identities(device, comm, shards, got)
        del shards
        if rank == 0:
            print(f"gradient identities over the whole sequence: <dv, v> = <dout, out> to {misfit[0]:.1e}, "
                  f"<dq, q> = <dk, k> to {misfit[1]:.1e} (relative)", flush=True)
        if args.beyond_one_device:
            fwd_flops, bwd_flops = flops(args, world)
            print(f"rank {rank}: forward {fwd * 1e3:.1f} ms + backward {(total - fwd) * 1e3:.1f} ms = "
                  f"{total * 1e3:.1f} ms ({(fwd_flops + bwd_flops) / world / total / 1e12:.1f} TFLOP/s per "
                  f"device), memory peak {human(ring_peak)}", flush=True)
            if rank == 0:
                need, have = one_device_need(args, world, dtype), device.xp.cuda.runtime.memGetInfo()[1]
                print(f"one device would hold at least {human(need)} at once for the {world * args.seqlen_local} "
                      f"tokens; it has {human(have)}: {'more' if need > have else 'less'} than it has", flush=True)
            return 0

        problem = global_problem(device, args, dtype, world)  # the same draws again, for one device
        warm = global_problem(device, args, dtype, world, warm_local, seed=1)
        device.reset_peak()
        want, s_fwd, s_total = timed(device, single_device_fn(*problem, args.causal), args.repeats,
                                     lambda: single_device_fn(*warm, args.causal)(device.sync))
        single_peak = device.peak()
        del problem, warm
        want = [shard(x, rank, world) for x in want]
        error, norm_error = errors(device, got, want)
        print(f"rank {rank}: forward {fwd * 1e3:.1f} ms + backward {(total - fwd) * 1e3:.1f} ms = "
              f"{total * 1e3:.1f} ms, memory peak {human(ring_peak)}, max error vs one device {error:.1e} "
              f"(norm-wise {norm_error:.1e}); one device: {s_total * 1e3:.1f} ms", flush=True)
        ring = list(zip(ring_allgather(comm, fwd), ring_allgather(comm, total)))
        single_fwd, single_total = ring_allgather(comm, s_fwd), ring_allgather(comm, s_total)
        if rank == 0:
            # the one-device baseline ran on every rank's GPU: their mean
            summary(args, world, world, (float(np.mean(single_fwd)), float(np.mean(single_total))), single_peak,
                    ring)
        return 0

    world = args.world
    problem = global_problem(device, args, dtype, world)
    warm = global_problem(device, args, dtype, world, warm_local, seed=1)
    device.reset_peak()
    want, s_fwd, s_total = timed(device, single_device_fn(*problem, args.causal), args.repeats,
                                 lambda: single_device_fn(*warm, args.causal)(device.sync))
    single_peak = device.peak()
    device.reset_peak()

    def rank_main(comm):
        if device.gpu:
            device.xp.cuda.Device(0).use()
        shards = [shard(x, comm.rank, world) for x in problem]
        warm_shards = [shard(x, comm.rank, world) for x in warm]
        got, fwd, total = timed(device, ring_fn(comm, *shards, args.causal), args.repeats,
                                lambda: ring_fn(comm, *warm_shards, args.causal)(device.sync))
        return (fwd, total), errors(device, got, [shard(x, comm.rank, world) for x in want])

    results = LocalRing(world, timeout=600).run(rank_main)
    for rank, ((fwd, total), (error, norm_error)) in enumerate(results):
        print(f"rank {rank}: forward {fwd * 1e3:.1f} ms + backward {(total - fwd) * 1e3:.1f} ms = "
              f"{total * 1e3:.1f} ms, max error vs one device {error:.1e} (norm-wise {norm_error:.1e})")
    print(f"memory peak of all {world} ranks together (LocalRing shares one device): {human(device.peak())}")
    summary(args, world, 1, (s_fwd, s_total), single_peak, [times for times, _ in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
