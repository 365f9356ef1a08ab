"""Kernel cache and launch for CuPy arrays.

Sources in `cuda_src/` are compiled at first use with NVRTC through `cupy.RawModule`, one
template instantiation per module (so a process only compiles what it runs), kept per process
here and on disk by CuPy's kernel cache. Launches go to CuPy's current stream on the arrays'
device, outputs come from CuPy's memory pool, and nothing synchronizes the device.
"""
import functools
import math
import os
import re

import cupy
import numpy as np

from . import _plan

_SOURCE_DIRS = (
    os.path.join(os.path.dirname(__file__), "cuda_src"),                  # installed package
    os.path.join(os.path.dirname(os.path.dirname(__file__)), "cuda_src"),  # source checkout
)
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)
_MAX_GRID_YZ = 65535


def _source_dir():
    for path in _SOURCE_DIRS:
        if os.path.isdir(path):
            return path
    raise RuntimeError(f"cupyflash: CUDA sources not found in {' or '.join(_SOURCE_DIRS)}")


@functools.lru_cache(maxsize=None)
def source(filename):
    """The file with its local includes inlined (each once), so CuPy's disk cache, which
    hashes the code it is given, sees every line the kernel depends on."""
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        with open(os.path.join(_source_dir(), name)) as f:
            text = f.read().replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


OPTIONS = ("-std=c++17",)


@functools.lru_cache(maxsize=None)
def _module(filename, name):
    return cupy.RawModule(code=source(filename), options=OPTIONS, name_expressions=(name,))


@functools.lru_cache(maxsize=None)
def _kernel(launch, device_id):
    kernel = _module(launch.source, launch.name).get_function(launch.name)
    if launch.smem_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = launch.smem_bytes
    return kernel


@functools.lru_cache(maxsize=None)
def _device_info(device_id):
    cc = cupy.cuda.Device(device_id).compute_capability
    major, minor = int(cc[:-1]), int(cc[-1])
    if major < 8:
        raise RuntimeError(
            f"cupyflash: the CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, Hopper); "
            f"device {device_id} has {major}.{minor}. Use NumPy arrays for the CPU backend.")
    return _plan.smem_limit((major, minor))


def _check_grid(q):
    """Heads and batches index the grid's y and z axes."""
    batch, nheads = q.shape[0], q.shape[2]
    if batch > _MAX_GRID_YZ or nheads > _MAX_GRID_YZ:
        raise ValueError(f"cupyflash: the CUDA kernels take batch and nheads up to {_MAX_GRID_YZ}, "
                         f"got batch={batch}, nheads={nheads}")


def _launch(launch, grid, args, device_id):
    _kernel(launch, device_id)(grid, (launch.threads,), args, shared_mem=launch.smem_bytes)


def _empty(shape, dtype):
    """Every output buffer comes from here (CuPy's pool); tests poison it with NaN."""
    return cupy.empty(shape, dtype)


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _rows_contiguous(x):
    """The kernels take any batch, sequence and head strides but need a unit last stride;
    other layouts are copied once (as raw bits, which works for every dtype, bfloat16 too)."""
    if x.strides[-1] == x.itemsize:
        return x
    return cupy.ascontiguousarray(x.view(_UINT[x.itemsize])).view(x.dtype)


def _strides(x):
    """(batch, sequence, head) strides in elements."""
    return [np.int64(s // x.itemsize) for s in x.strides[:3]]


def _aligned(*arrays):
    """16-byte vector loads are possible: base pointers and row strides multiples of 16 bytes."""
    return all(x.data.ptr % 16 == 0 and all(int(s) % 8 == 0 for s in _strides(x)) and x.shape[3] % 8 == 0
               for x in arrays)


def _acc_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def forward(q, k, v, causal, scale):
    _check_grid(q)
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        limit = _device_info(device_id)
        q, k, v = (_rows_contiguous(x) for x in (q, k, v))
        batch, seqlen_q, nheads, headdim = q.shape
        seqlen_k, nheads_kv = k.shape[1], k.shape[2]
        acc = _acc_dtype(q.dtype)
        out = _empty(q.shape, q.dtype)
        lse = _empty((batch, nheads, seqlen_q), acc)
        launch = _plan.forward(q.dtype.name, headdim, causal, _aligned(q, k, v), limit)
        grid = (math.ceil(seqlen_q / launch.block_rows), nheads, batch)
        args = (q, k, v, out, lse, np.int32(seqlen_q), np.int32(seqlen_k), np.int32(headdim), np.int32(nheads),
                np.int32(nheads // nheads_kv), *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                acc(scale))
        _launch(launch, grid, args, device_id)
        return out, lse


def backward(dout, q, k, v, out, lse, causal, scale, deterministic):
    # Always deterministic: dQ has its own pass, so no gradient is summed with atomics.
    del deterministic
    _check_grid(q)
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        limit = _device_info(device_id)
        dout, q, k, v, out = (_rows_contiguous(x) for x in (dout, q, k, v, out))
        lse = cupy.ascontiguousarray(lse)
        batch, seqlen_q, nheads, headdim = q.shape
        seqlen_k, nheads_kv = k.shape[1], k.shape[2]
        acc = _acc_dtype(q.dtype)
        delta_launch, dkdv_launch, dq_launch = _plan.backward(q.dtype.name, headdim, causal,
                                                              _aligned(q, k, v, dout), limit)

        delta = _empty((batch, nheads, seqlen_q), acc)
        rows = batch * nheads * seqlen_q
        _launch(delta_launch, (math.ceil(rows / delta_launch.block_rows), 1, 1),
                (dout, out, delta, np.int32(batch), np.int32(seqlen_q), np.int32(headdim), np.int32(nheads),
                 *_strides(dout), *_strides(out)), device_id)

        dq, dk, dv = _empty(q.shape, q.dtype), _empty(k.shape, k.dtype), _empty(v.shape, v.dtype)
        sizes = (np.int32(seqlen_q), np.int32(seqlen_k), np.int32(headdim), np.int32(nheads),
                 np.int32(nheads // nheads_kv))
        inputs = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
        _launch(dkdv_launch, (math.ceil(seqlen_k / dkdv_launch.block_rows), nheads_kv, batch),
                (q, k, v, dout, lse, delta, dk, dv, *sizes, *inputs, *_strides(dk), *_strides(dv), acc(scale)),
                device_id)
        _launch(dq_launch, (math.ceil(seqlen_q / dq_launch.block_rows), nheads, batch),
                (q, k, v, dout, lse, delta, dq, *sizes, *inputs, *_strides(dq), acc(scale)), device_id)
        return dq, dk, dv
