"""Communicators for the ring: what :mod:`cupyflash.distributed` asks of one, and two that have it.

A communicator is any object with

* ``rank`` and ``size`` (the world), ints with ``0 <= rank < size``;
* ``sendrecv(send_arrays, dst, src) -> received_arrays``: send a list of arrays to rank ``dst`` and
  receive as many arrays of the same shapes and dtypes from rank ``src``, in one step (every rank
  calls it at the same point of the schedule);

and optionally ``start_sendrecv(send_arrays, dst, src)``, the same transfer returned as a handle
whose ``wait()`` gives the received arrays: the ring starts the next block's transfer, computes
with the current block, and waits only when it needs the next one; and ``start_exchange(arrays,
dst, src)``, a started transfer that overwrites ``arrays`` in place with ``src``'s (the ring's
float32 dK/dV accumulators travel this way, without a second copy of them in memory).

:class:`LocalRing` runs every rank as a thread of one process (NumPy or CuPy arrays; for tests and
for checking a schedule anywhere). :class:`NcclComm` is one process per GPU over NCCL. Nothing
here imports cupy until an NcclComm is made.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import threading
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from .._validate import array_kind
from . import _rendezvous

__all__ = ["LocalRing", "NcclComm"]

Array = Any  # numpy.ndarray or cupy.ndarray


def _check_peer(name, value, size):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
        raise ValueError(f"sendrecv: {name} must be a rank in [0, {size}), got {value!r}")


class LocalRing:
    """In-process communicators for ``world`` threads, one per rank.

    ``LocalRing(world).run(fn)`` calls ``fn(comm)`` on one thread per rank and returns the results
    in rank order; ``comms[r]`` is rank r's communicator for threads of one's own. Arrays move as
    copies through one queue per (sender, receiver) pair, so no rank sees another's buffers; CuPy
    arrays are copied on the sender's device, so every rank should use one device (this simulates
    the schedule, it does not spread work over GPUs). ``timeout`` (seconds) bounds each wait for a
    message: a rank whose peer died raises TimeoutError instead of waiting for ever.
    """

    def __init__(self, world: int, *, timeout: float = 60.0) -> None:
        if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or world < 1:
            raise ValueError(f"LocalRing: world must be an int >= 1, got {world!r}")
        self.world = int(world)
        self.timeout = timeout
        self._queues = {}
        self._lock = threading.Lock()
        self.comms = [_LocalComm(self, rank) for rank in range(self.world)]

    def _queue(self, sender, receiver):
        with self._lock:
            return self._queues.setdefault((sender, receiver), queue.SimpleQueue())

    def run(self, fn: Callable[[Any], Any], *, return_exceptions: bool = False) -> List[Any]:
        """``[fn(comms[0]), ..., fn(comms[world - 1])]``, each on a thread of its own. An exception
        of a rank is raised (the lowest rank's first) or, with ``return_exceptions``, returned in
        its place."""
        results: List[Any] = [None] * self.world
        failed = [False] * self.world

        def rank_main(rank):
            try:
                results[rank] = fn(self.comms[rank])
            except BaseException as exc:  # handed to the caller's thread below
                results[rank], failed[rank] = exc, True

        threads = [threading.Thread(target=rank_main, args=(r,), name=f"LocalRing rank {r}", daemon=True)
                   for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not return_exceptions:
            for result, bad in zip(results, failed):
                if bad:
                    raise result
        return results


class _LocalComm:
    """Rank ``rank`` of a :class:`LocalRing`."""

    def __init__(self, ring, rank):
        self._ring = ring
        self.rank = rank
        self.size = ring.world

    def sendrecv(self, send_arrays: Sequence[Array], dst: int, src: int) -> List[Array]:
        _check_peer("dst", dst, self.size)
        _check_peer("src", src, self.size)
        copies = [x.copy() for x in send_arrays]
        if any(array_kind(x) == "cupy" for x in copies):
            import cupy

            cupy.cuda.get_current_stream().synchronize()  # the receiver may read on another stream
        self._ring._queue(self.rank, dst).put(copies)
        try:
            return self._ring._queue(src, self.rank).get(timeout=self._ring.timeout)
        except queue.Empty:
            raise TimeoutError(f"LocalRing: rank {self.rank} waited {self._ring.timeout} s for rank {src}, "
                               "which never sent (did it fail or take another path?)") from None


class _NcclTransfer:
    """A started NCCL send/recv: ``wait()`` makes the caller's stream wait for it and returns the
    received arrays. The send buffers stay referenced until then, so CuPy's pool cannot hand their
    memory out while NCCL still reads it."""

    def __init__(self, device, done, sent, received, to_host):
        self._device, self._done, self._sent = device, done, sent
        self._received, self._to_host = received, to_host

    def wait(self) -> List[Array]:
        import cupy

        with cupy.cuda.Device(self._device):
            cupy.cuda.get_current_stream().wait_event(self._done)
            self._sent = None
            return [x.get() if host else x for x, host in zip(self._received, self._to_host)]


_communicator_ids = itertools.count()


def _encode_unique_id(unique_id) -> bytes:
    """``nccl.get_unique_id()`` as text for the rendezvous. CuPy 14 gives bytes (and its
    NcclCommunicator takes only bytes); older CuPy gave a tuple of C chars as ints, signed or not
    by platform. The kind travels along, so the other ranks rebuild exactly what rank 0 made."""
    kind = "bytes" if isinstance(unique_id, (bytes, bytearray)) else "tuple"
    return json.dumps({"kind": kind, "id": list(unique_id)}).encode()


def _decode_unique_id(data: bytes):
    message = json.loads(data)
    return bytes(message["id"]) if message["kind"] == "bytes" else tuple(message["id"])


#: The largest piece an in-place exchange moves at once (its bounce buffer).
EXCHANGE_CHUNK_BYTES = 256 << 20


class NcclComm:
    """A ring communicator over NCCL: one process per GPU, point-to-point sends and receives on a
    stream of its own.

    ``start_sendrecv`` queues the sends and receives of one step (``ncclGroupStart``/``End``)
    behind the work already queued on the caller's stream, and records an event after them; the
    caller's stream waits on that event only in ``wait()``, so the transfer runs under the compute
    queued in between. Arrays move as raw bytes (any dtype); NumPy arrays go through the device
    and come back as NumPy arrays (the ring's small shape check uses this).

    Make one with :meth:`from_env` (processes started by ``python -m
    cupyflash.distributed.launch``), :meth:`from_mpi`, or from a ``cupy.cuda.nccl.NcclCommunicator``
    of one's own.
    """

    def __init__(self, communicator: Any) -> None:
        import cupy

        self._nccl = communicator
        self.rank = communicator.rank_id()
        self.size = communicator.size()
        self.device = communicator.device_id()
        with cupy.cuda.Device(self.device):
            self._stream = cupy.cuda.Stream(non_blocking=True)

    @classmethod
    def from_mpi(cls, mpi_comm: Any, device: Optional[int] = None) -> "NcclComm":
        """Over the processes of an mpi4py communicator (rank for rank): rank 0 makes the NCCL
        unique id and broadcasts it. ``device`` (default: the current one) becomes the current
        device."""
        import cupy
        from cupy.cuda import nccl

        if device is not None:
            cupy.cuda.Device(device).use()
        rank, world = mpi_comm.Get_rank(), mpi_comm.Get_size()
        unique_id = mpi_comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
        return cls(nccl.NcclCommunicator(world, unique_id, rank))

    @classmethod
    def from_env(cls) -> "NcclComm":
        """In a process started by ``python -m cupyflash.distributed.launch``: RANK, WORLD_SIZE and
        CUPYFLASH_RENDEZVOUS from the environment; device LOCAL_RANK (else RANK) becomes the
        current device. Every process must make its communicators in the same order."""
        import cupy
        from cupy.cuda import nccl

        env = {}
        for name in ("RANK", "WORLD_SIZE", _rendezvous.ENV):
            if name not in os.environ:
                raise RuntimeError(f"NcclComm.from_env: the environment variable {name} is not set; start the "
                                   "script with python -m cupyflash.distributed.launch --nproc N script.py")
            env[name] = os.environ[name]
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        cupy.cuda.Device(int(os.environ.get("LOCAL_RANK", rank))).use()
        key = f"nccl_id/{next(_communicator_ids)}"
        address = env[_rendezvous.ENV]
        if rank == 0:
            unique_id = nccl.get_unique_id()
            _rendezvous.publish(address, key, _encode_unique_id(unique_id))
        else:
            unique_id = _decode_unique_id(_rendezvous.fetch(address, key))
        return cls(nccl.NcclCommunicator(world, unique_id, rank))

    def start_sendrecv(self, send_arrays: Sequence[Array], dst: int, src: int) -> _NcclTransfer:
        import cupy
        from cupy.cuda import nccl

        _check_peer("dst", dst, self.size)
        _check_peer("src", src, self.size)
        for x in send_arrays:
            if array_kind(x) == "cupy" and x.device.id != self.device:
                raise ValueError(f"sendrecv: arrays must be on the communicator's device {self.device}, "
                                 f"got one on device {x.device.id}")
        with cupy.cuda.Device(self.device):
            to_host = [array_kind(x) != "cupy" for x in send_arrays]
            sent = [cupy.ascontiguousarray(cupy.asarray(x)) for x in send_arrays]
            # Allocated on the caller's stream, and the transfer waits for everything queued there
            # so far: memory the pool hands out here may still be read by earlier kernels.
            received = [cupy.empty(x.shape, x.dtype) for x in sent]
            self._stream.wait_event(cupy.cuda.get_current_stream().record())
            nccl.groupStart()
            try:
                for x, buf in zip(sent, received):
                    self._nccl.send(x.data.ptr, x.nbytes, nccl.NCCL_UINT8, dst, self._stream.ptr)
                    self._nccl.recv(buf.data.ptr, buf.nbytes, nccl.NCCL_UINT8, src, self._stream.ptr)
            finally:
                nccl.groupEnd()
            return _NcclTransfer(self.device, self._stream.record(), sent, received, to_host)

    def start_exchange(self, arrays: Sequence[Array], dst: int, src: int) -> _NcclTransfer:
        """Send ``arrays`` (C-contiguous CuPy arrays on this device) to ``dst`` and overwrite them
        with ``src``'s, in place; ``wait()`` gives an empty list. The arrays move in pieces of at
        most :data:`EXCHANGE_CHUNK_BYTES` through one bounce buffer, so the transfer costs that
        buffer instead of a second copy of the arrays. Neither side may touch the arrays until
        ``wait()``."""
        import cupy
        from cupy.cuda import nccl

        _check_peer("dst", dst, self.size)
        _check_peer("src", src, self.size)
        for i, x in enumerate(arrays):
            if array_kind(x) != "cupy" or x.device.id != self.device or not x.flags.c_contiguous:
                raise ValueError(f"start_exchange: arrays[{i}] must be a C-contiguous cupy.ndarray on the "
                                 f"communicator's device {self.device}")
        with cupy.cuda.Device(self.device):
            largest = max((x.nbytes for x in arrays), default=0)
            bounce = cupy.empty(min(largest, EXCHANGE_CHUNK_BYTES), cupy.uint8)  # on the caller's stream
            self._stream.wait_event(cupy.cuda.get_current_stream().record())
            for x in arrays:
                for start in range(0, x.nbytes, EXCHANGE_CHUNK_BYTES):
                    size = min(EXCHANGE_CHUNK_BYTES, x.nbytes - start)
                    nccl.groupStart()
                    try:
                        self._nccl.send(x.data.ptr + start, size, nccl.NCCL_UINT8, dst, self._stream.ptr)
                        self._nccl.recv(bounce.data.ptr, size, nccl.NCCL_UINT8, src, self._stream.ptr)
                    finally:
                        nccl.groupEnd()
                    cupy.cuda.runtime.memcpyAsync(x.data.ptr + start, bounce.data.ptr, size,
                                                  cupy.cuda.runtime.memcpyDeviceToDevice, self._stream.ptr)
            return _NcclTransfer(self.device, self._stream.record(), (list(arrays), bounce), [], [])

    def sendrecv(self, send_arrays: Sequence[Array], dst: int, src: int) -> List[Array]:
        return self.start_sendrecv(send_arrays, dst, src).wait()
