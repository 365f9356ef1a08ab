"""Tensor maps for the Hopper kernels' TMA loads, encoded by the CUDA driver's
`cuTensorMapEncodeTiled` (called through ctypes: CuPy does not expose it, and the driver
library is present wherever a GPU is).

A (batch, seqlen, heads, headdim) array with a unit last stride is described as the 4-D tensor
(headdim, seqlen, heads, batch) with its byte strides; a load copies a box of 64 columns x
`box_rows` rows of one head into shared memory with 128-byte swizzle, zero-filling what lies
past the tensor's ends.
"""
import ctypes
import functools

import numpy as np

from . import _csource

_DATA_TYPES = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_CACHE_SIZE = 256  # maps of recent arrays: CuPy's pool hands the same buffers out again
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
BOX_COLUMNS = 64  # 128 bytes of 16-bit values: the widest box a 128-byte swizzle takes
TENSOR_MAP = _csource.struct_dtype(_csource.source("params.cuh"), "TensorMap")  # bytes the driver fills


@functools.lru_cache(maxsize=None)
def _encode():
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _strides(shape, strides):
    """Byte strides of the seqlen, heads and batch axes; an axis of length 1 is never stepped along,
    so any valid stride describes it."""
    return tuple(strides[axis] if shape[axis] > 1 else 16 for axis in (1, 2, 0))


def supported(x):
    """Whether TMA can read the 16-bit array: 16-byte aligned base and strides, positive strides."""
    return (x.strides[-1] == x.itemsize and x.data.ptr % 16 == 0
            and all(s > 0 and s % 16 == 0 and s < 2 ** 40 for s in _strides(x.shape, x.strides)))


def tensor_map(x, dtype, box_rows):
    """The 128-byte CUtensorMap of `x`, whose dtype is named `dtype` ("float16" or "bfloat16"; see the
    module docstring), as a NumPy void scalar."""
    return _tensor_map(dtype, x.data.ptr, x.shape, x.strides, box_rows)


def tensor_map_words(x, dtype, box_rows):
    """tensor_map as 16 uint64 words, for a parameter struct whose maps are filled in per call."""
    return _tensor_map(dtype, x.data.ptr, x.shape, x.strides, box_rows).reshape(1).view(np.uint64)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _tensor_map(dtype, ptr, shape, strides, box_rows):
    batch, seqlen, heads, headdim = shape
    out = np.zeros((), TENSOR_MAP)
    dims = (ctypes.c_uint64 * 4)(headdim, seqlen, heads, batch)
    steps = (ctypes.c_uint64 * 3)(*_strides(shape, strides))
    box = (ctypes.c_uint32 * 4)(BOX_COLUMNS, box_rows, 1, 1)
    unit = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    status = _encode()(out.ctypes.data, _DATA_TYPES[dtype], 4, ptr, dims, steps, box, unit, 0, _SWIZZLE_128B,
                       _L2_PROMOTION_128B, 0)
    if status != 0:
        raise RuntimeError(f"cupyflash: cuTensorMapEncodeTiled failed with CUresult {status} for an array of "
                           f"shape {shape}, strides {strides}, dtype {dtype}")
    return out
