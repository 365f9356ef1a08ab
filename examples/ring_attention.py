"""Ring attention forward + backward over N ranks, timed per rank against one device.

    python -m cupyflash.distributed.launch --nproc 4 examples/ring_attention.py   # 4 GPUs over NCCL
    python examples/ring_attention.py --world 4          # 4 LocalRing threads sharing one GPU
    python examples/ring_attention.py --numpy            # LocalRing threads on the CPU, small sizes

Each rank holds ``seqlen_local`` tokens of one sequence (zigzag layout) and runs
``ring_attention`` then ``ring_attention_backward``; its shards of out, dq, dk and dv are checked
against one device's attention on the gathered sequence. Per rank it prints the time of forward +
backward and the memory held at the peak. Scaling efficiency = (one device's time on the gathered
sequence / devices) / the slowest rank's time: 100 % is the work split perfectly, nothing lost to
imbalance or transfers. Under LocalRing every rank shares one device, so "devices" is 1 there, and
the memory is that of all ranks together.
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


def global_problem(args, dtype, world):
    """The whole sequence, the same on every rank: q, k, v, dout on the host."""
    rng = np.random.default_rng(0)
    seqlen = world * args.seqlen_local
    q, dout = (rng.standard_normal((args.batch, seqlen, args.nheads, args.headdim)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((args.batch, seqlen, args.nheads_kv, args.headdim)).astype(dtype) for _ in range(2))
    return q, k, v, dout


def timed(device, fn, repeats):
    """(result, median seconds) of ``fn`` after one warm-up call (kernel compilation)."""
    result = fn()
    times = []
    for _ in range(repeats):
        device.sync()
        start = time.perf_counter()
        result = fn()
        device.sync()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def single_device(device, problem, args):
    """One device's forward + backward on the gathered sequence: (out, dq, dk, dv), seconds, peak."""
    q, k, v, dout = (device.xp.asarray(x) for x in problem)

    def fwd_bwd():
        out, lse = cupyflash.attention(q, k, v, causal=args.causal, return_lse=True)
        return (out, *cupyflash.attention_backward(dout, q, k, v, out, lse, causal=args.causal))

    device.reset_peak()
    result, seconds = timed(device, fwd_bwd, args.repeats)
    return result, seconds, device.peak()


def ring_rank(comm, device, problem, reference, args):
    """This rank's forward + backward: (seconds, max error of its shards vs the single device)."""
    world = comm.size
    q, k, v, dout = (device.xp.asarray(zigzag_shard(x, comm.rank, world)) for x in problem)

    def fwd_bwd():
        out, lse = ring_attention(q, k, v, comm=comm, causal=args.causal, return_lse=True)
        return (out, *ring_attention_backward(dout, q, k, v, out, lse, comm=comm, causal=args.causal))

    result, seconds = timed(device, fwd_bwd, args.repeats)
    error = 0.0
    for got, want in zip(result, reference):
        want = zigzag_shard(want, comm.rank, world).astype(np.float64)
        got = (got.get() if device.gpu else got).astype(np.float64)
        error = max(error, float(abs(got - want).max()) / max(1.0, float(abs(want).max())))
    return seconds, error


def ring_allgather(comm, value):
    """Every rank's float ``value``, in rank order, passed around the ring."""
    values = {comm.rank: value}
    travelling = np.array([comm.rank, value])
    for _ in range(comm.size - 1):
        (travelling,) = comm.sendrecv([travelling], (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size)
        values[int(travelling[0])] = float(travelling[1])
    return [values[r] for r in range(comm.size)]


def summary(args, world, devices, single_seconds, single_peak, ring_seconds):
    seqlen = world * args.seqlen_local
    slowest = max(ring_seconds)
    print(f"one device, gathered sequence of {seqlen} tokens: {single_seconds * 1e3:.1f} ms, "
          f"memory peak {human(single_peak)}")
    print(f"ring over {world} ranks on {devices} device(s): slowest rank {slowest * 1e3:.1f} ms, "
          f"ideal {single_seconds / devices * 1e3:.1f} ms, scaling efficiency "
          f"{100 * single_seconds / devices / slowest:.0f} %")


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

    if launched:  # one process per GPU, NCCL between them
        comm = NcclComm.from_env()
        problem = global_problem(args, dtype, comm.size)
        reference, single_seconds, single_peak = single_device(device, problem, args)
        reference = [x.get() for x in reference]
        device.reset_peak()
        seconds, error = ring_rank(comm, device, problem, reference, args)
        print(f"rank {comm.rank}: forward + backward {seconds * 1e3:.1f} ms, memory peak {human(device.peak())}, "
              f"max error vs one device {error:.1e}", flush=True)
        ring_seconds = ring_allgather(comm, seconds)
        if comm.rank == 0:
            summary(args, comm.size, comm.size, single_seconds, single_peak, ring_seconds)
        return 0

    world = args.world
    problem = global_problem(args, dtype, world)
    reference, single_seconds, single_peak = single_device(device, problem, args)
    reference = [x.get() if device.gpu else x for x in reference]
    device.reset_peak()

    def rank_main(comm):
        if device.gpu:
            device.xp.cuda.Device(0).use()
        return ring_rank(comm, device, problem, reference, args)

    results = LocalRing(world, timeout=600).run(rank_main)
    for rank, (seconds, error) in enumerate(results):
        print(f"rank {rank}: forward + backward {seconds * 1e3:.1f} ms, max error vs one device {error:.1e}")
    print(f"memory peak of all {world} ranks together (LocalRing shares one device): {human(device.peak())}")
    summary(args, world, 1, single_seconds, single_peak, [s for s, _ in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
