"""Kernel cache and launch for CuPy arrays.

Sources in `cuda_src/` are compiled at first use with NVRTC through `cupy.RawModule`, one
template instantiation per module (so a process only compiles what it runs), kept per process
here and on disk by CuPy's kernel cache. Each pass takes one parameter struct (`cuda_src/params.cuh`)
built here as a NumPy structured scalar. Launches go to CuPy's current stream on the arrays'
device, outputs come from CuPy's memory pool, and nothing synchronizes the device.
"""
import functools
import math
import os
import re

import cupy
import numpy as np

from . import _philox, _plan, _tma
from ._validate import compute_dtype

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


@functools.lru_cache(maxsize=None)
def _module(filename, name, options):
    return cupy.RawModule(code=source(filename), options=options, name_expressions=(name,))


@functools.lru_cache(maxsize=None)
def _kernel(launch, device_id):
    kernel = _module(launch.source, launch.name, launch.options).get_function(launch.name)
    if launch.smem_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = launch.smem_bytes
    return kernel


def compiled_kernel(filename, name, options=_plan.OPTIONS):
    """A kernel of `cuda_src/filename` (the name expression `name`), compiled at first use."""
    return _module(filename, name, tuple(options)).get_function(name)


@functools.lru_cache(maxsize=None)
def _device_info(device_id):
    """(shared-memory limit, whether the device takes the Hopper family)."""
    cc = cupy.cuda.Device(device_id).compute_capability
    major, minor = int(cc[:-1]), int(cc[-1])
    if major < 8:
        raise RuntimeError(
            f"cupyflash: the CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, Hopper); "
            f"device {device_id} has {major}.{minor}. Use NumPy arrays for the CPU backend.")
    return _plan.smem_limit((major, minor)), major == 9


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id):
    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


#: Set to "sm80" to run the mma.sync family on a Hopper GPU too (the tests validate both families there).
FAMILY_VARIABLE = "CUPYFLASH_KERNELS"


def _hopper(hopper_device, *arrays):
    """Whether a 16-bit call takes the Hopper family: a 9.x device, TMA-readable inputs, not forced off."""
    return (hopper_device and os.environ.get(FAMILY_VARIABLE, "") != "sm80"
            and all(_tma.supported(x) for x in arrays))


def _check_grid(spec):
    """Heads and batches index the grid's y and z axes."""
    if spec.batch > _MAX_GRID_YZ or spec.nheads > _MAX_GRID_YZ:
        raise ValueError(f"cupyflash: the CUDA kernels take batch and nheads up to {_MAX_GRID_YZ}, "
                         f"got batch={spec.batch}, nheads={spec.nheads}")


def _launch(launch, grid, params, device_id):
    """One launch on the current stream; ``params`` is a struct from _struct."""
    _kernel(launch, device_id)(grid, (launch.threads,), (params,), shared_mem=launch.smem_bytes)


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


def _aligned(*arrays):
    """16-byte vector loads are possible: base pointers and row strides multiples of 16 bytes."""
    return all(x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:3]) and x.shape[3] % 8 == 0
               for x in arrays)


# ---- parameter structs: NumPy mirrors of cuda_src/params.cuh (C alignment; tests/test_params.py
# checks every offset against NVRTC's layout).
_STRIDES = np.dtype([("b", "i8"), ("s", "i8"), ("h", "i8")], align=True)
VARIANT_PARAMS = np.dtype([
    ("window_left", "i4"), ("window_right", "i4"), ("softcap", "f8"), ("dropout_scale", "f8"),
    ("dropout_threshold", "u4"), ("seed_lo", "u4"), ("seed_hi", "u4"), ("batch_offset", "i4"),
    ("alibi", "u8"), ("alibi_sb", "i8"), ("alibi_sh", "i8"),
    ("mask", "u8"), ("mask_sb", "i8"), ("mask_sh", "i8"), ("mask_sq", "i8"), ("mask_sk", "i8"),
    ("mask_cells", "u8"), ("cells_sb", "i8"), ("cells_sh", "i8"), ("cells_sq", "i8"), ("cells_sk", "i8"),
    ("cell_log2", "i4"),
    ("dbias", "u8"), ("dbias_sb", "i8"), ("dbias_sh", "i8"), ("dbias_sq", "i8"), ("dbias_sk", "i8"),
], align=True)
ROW_FLAGS = np.dtype([("x", "u8"), ("st", _STRIDES), ("seqlen", "i4"), ("heads", "i4"), ("flags", "u8")],
                     align=True)
NONFINITE_PARAMS = np.dtype([("tensors", ROW_FLAGS, (3,)), ("count", "i4"), ("batch", "i4"), ("headdim", "i4")],
                            align=True)
FWD_PARAMS = np.dtype([
    ("q", "u8"), ("k", "u8"), ("v", "u8"), ("out", "u8"), ("lse", "u8"), ("v_nonfinite", "u8"),
    ("q_st", _STRIDES), ("k_st", _STRIDES), ("v_st", _STRIDES), ("o_st", _STRIDES),
    ("seqlen_q", "i4"), ("seqlen_k", "i4"), ("headdim", "i4"), ("nheads", "i4"), ("group", "i4"),
    ("scale", "f8"), ("var", VARIANT_PARAMS),
], align=True)
FWD_PARAMS_SM90 = np.dtype({
    "names": ["tma_q", "tma_k", "tma_v", "fwd", "batch"],
    "formats": [_tma.TENSOR_MAP] * 3 + [FWD_PARAMS, "i4"],
    "offsets": [0, 128, 256, 384, 384 + FWD_PARAMS.itemsize],
    "itemsize": -(-(388 + FWD_PARAMS.itemsize) // 64) * 64,  # TensorMap is 64-byte aligned
})
DECODE_PARAMS = np.dtype([
    ("fwd", FWD_PARAMS), ("seqlens_k", "u8"), ("block_table", "u8"), ("table_stride", "i8"), ("page_size", "i4"),
    ("batch", "i4"), ("num_splits", "i4"), ("keys_per_split", "i4"), ("part_out", "u8"), ("part_lse", "u8"),
], align=True)
BWD_PARAMS = np.dtype([
    ("fwd", FWD_PARAMS), ("dout", "u8"), ("q_nonfinite", "u8"), ("k_nonfinite", "u8"), ("do_nonfinite", "u8"),
    ("delta", "u8"), ("dq", "u8"), ("dk", "u8"), ("dv", "u8"),
    ("do_st", _STRIDES), ("dq_st", _STRIDES), ("dk_st", _STRIDES), ("dv_st", _STRIDES), ("batch", "i4"),
], align=True)
_BWD_SM90_TAIL = 512 + BWD_PARAMS.itemsize  # after four tensor maps and the BwdParams
BWD_PARAMS_SM90 = np.dtype({
    "names": ["tma_q", "tma_k", "tma_v", "tma_do", "bwd", "lse_log2", "dq_accum", "rows", "head_tile"],
    "formats": [_tma.TENSOR_MAP] * 4 + [BWD_PARAMS, "u8", "u8", "i4", "i4"],
    "offsets": [0, 128, 256, 384, 512, _BWD_SM90_TAIL, _BWD_SM90_TAIL + 8, _BWD_SM90_TAIL + 16, _BWD_SM90_TAIL + 20],
    "itemsize": -(-(_BWD_SM90_TAIL + 24) // 64) * 64,  # TensorMap is 64-byte aligned
})


@functools.lru_cache(maxsize=None)
def _raw(dtype):
    return np.dtype((np.void, dtype.itemsize))


def _struct(dtype, values):
    """A parameter struct from its values in field order (nested structs as tuples), as raw bytes:
    one construction instead of a field at a time, and CuPy passes the bytes without walking the
    structured dtype's fields."""
    return np.array([values], dtype).view(_raw(dtype))[0]


def _values(dtype, fields):
    """The values of a flat struct in field order from a {field: value} dict; absent fields are 0."""
    return tuple(fields.get(name, 0) for name in dtype.names)


def _strides(x):
    """(batch, sequence, head) strides in elements."""
    return tuple(s // x.itemsize for s in x.strides[:3])


def _elements(x):
    return tuple(s // x.itemsize for s in x.strides)


def _variant(spec, device_id):
    """The kernel's Variant type, the VariantParams fields of a spec ({name: value}), and the cells of
    a bool mask (classified on the device; they must stay referenced until the call's launches are
    queued)."""
    features = 0
    left, right = spec.window
    var = {"window_left": left, "window_right": right}
    if spec.has_window:
        features |= _plan.WINDOW
    if spec.softcap > 0:
        features |= _plan.SOFTCAP
        var["softcap"] = spec.softcap
    if spec.alibi_slopes is not None:
        features |= _plan.ALIBI
        var["alibi"] = spec.alibi_slopes.data.ptr
        var["alibi_sb"], var["alibi_sh"] = _elements(spec.alibi_slopes)
    mask_dtype = "bool"
    if spec.attn_mask is not None:
        features |= _plan.BOOL_MASK if spec.mask_kind == "bool" else _plan.BIAS
        mask_dtype = np.dtype(spec.attn_mask.dtype).name
        var["mask"] = spec.attn_mask.data.ptr
        var["mask_sb"], var["mask_sh"], var["mask_sq"], var["mask_sk"] = _elements(spec.attn_mask)
    if spec.dropout:
        features |= _plan.DROPOUT
        var["dropout_scale"] = 1.0 / (1.0 - spec.dropout_p)
        var["dropout_threshold"] = _philox.threshold(spec.dropout_p)
        var["seed_lo"], var["seed_hi"] = _philox.split_seed(spec.dropout_seed)
        var["batch_offset"] = spec.batch_offset
    return _plan.variant(features, mask_dtype), var, _classify_mask(spec, var, device_id)


def _classify_mask(spec, var, device_id):
    """For a bool mask: its cells (mask_cells.cu), one uint8 CellKind each, shape (batches, heads,
    query cells, key cells) with a length of 1 along each axis the mask broadcasts, written into
    ``var`` for the kernels' tile classification. None for any other call."""
    if spec.attn_mask is None or spec.mask_kind != "bool" or spec.seqlen_q == 0 or spec.seqlen_k == 0:
        return None
    cell = 1 << _plan.MASK_CELL_LOG2
    strides = _elements(spec.attn_mask)
    sizes = (spec.batch, spec.nheads, -(-spec.seqlen_q // cell), -(-spec.seqlen_k // cell))
    cells = _empty(tuple(n if stride else 1 for n, stride in zip(sizes, strides)), np.uint8)
    var["mask_cells"], var["cell_log2"] = cells.data.ptr, _plan.MASK_CELL_LOG2
    var["cells_sb"], var["cells_sh"], var["cells_sq"], var["cells_sk"] = (
        stride if n > 1 else 0 for n, stride in zip(cells.shape, cells.strides))
    p = _struct(FWD_PARAMS, _fwd_values(spec, var))
    _launch(_plan.mask_cells(), (cells.shape[2] * cells.shape[3], cells.shape[1], cells.shape[0]), p, device_id)
    return cells


def _flag_nonfinite(var_type, spec, device_id, *tensors):
    """For a variant that hides keys: the RowFlags (a uint8 array) of each (array, seqlen, heads) of
    `tensors` (at most three, of one dtype), flagged in one launch (nonfinite.cu); else Nones."""
    if not _plan.hides_keys(var_type):
        return (None,) * len(tensors)
    flags = [_empty((spec.batch, heads, -(-seqlen // _plan.NONFINITE_ROWS)), np.uint8) for _, seqlen, heads in tensors]
    chunks = max(f.size for f in flags)
    if chunks:
        launch = _plan.nonfinite_rows(spec.dtype.name, _aligned(*(x for x, _, _ in tensors)))
        rows = [(x.data.ptr, _strides(x), seqlen, heads, f.data.ptr) for (x, seqlen, heads), f in zip(tensors, flags)]
        rows += [(0, (0, 0, 0), 0, 0, 0)] * (3 - len(rows))
        p = _struct(NONFINITE_PARAMS, (rows, len(tensors), spec.batch, spec.headdim))
        _launch(launch, (math.ceil(chunks / launch.block_rows), len(tensors), 1), p, device_id)
    return flags


def _ptr(x):
    return 0 if x is None else x.data.ptr


def _fwd_values(spec, var, q=None, k=None, v=None, out=None, lse=None, v_nonfinite=None):
    """FwdParams' values; without arrays (the mask classifier) only the sizes and the variant."""
    ptrs = tuple(_ptr(x) for x in (q, k, v, out, lse, v_nonfinite))
    strides = tuple((0, 0, 0) if x is None else _strides(x) for x in (q, k, v, out))
    return (*ptrs, *strides, spec.seqlen_q, spec.seqlen_k, spec.headdim, spec.nheads, spec.group, spec.scale,
            _values(VARIANT_PARAMS, var))


def forward(q, k, v, spec):
    _check_grid(spec)
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        limit, hopper_device = _device_info(device_id)
        q, k, v = (_rows_contiguous(x) for x in (q, k, v))
        out = spec.empty(_empty, q.shape, q.dtype)
        lse = _empty((spec.batch, spec.nheads, spec.seqlen_q), compute_dtype(q.dtype))
        var_type, var, _mask_cells = _variant(spec, device_id)
        v_nonfinite, = _flag_nonfinite(var_type, spec, device_id, (v, spec.seqlen_k, spec.nheads_kv))
        fwd = _fwd_values(spec, var, q, k, v, out, lse, v_nonfinite)
        dtype = q.dtype.name
        if dtype in _plan.TENSOR_CORE_DTYPES and _hopper(hopper_device, q, k, v):
            launch = _plan.forward_sm90(dtype, spec.headdim, var_type)
            _, block_m, block_n = _plan.sm90_tiles(spec.headdim)
            maps = (_tma.tensor_map(q, dtype, block_m), _tma.tensor_map(k, dtype, block_n),
                    _tma.tensor_map(v, dtype, block_n))
            params = _struct(FWD_PARAMS_SM90, (*maps, fwd, spec.batch))
            # persistent: a block per multiprocessor (one fits), or one per work tile if fewer
            work = math.ceil(spec.seqlen_q / launch.block_rows) * spec.nheads * spec.batch
            grid = (min(work, _multiprocessors(device_id)), 1, 1)
        else:
            launch = _plan.forward(dtype, spec.headdim, var_type, _aligned(q, k, v), limit)
            params = _struct(FWD_PARAMS, fwd)
            grid = (math.ceil(spec.seqlen_q / launch.block_rows), spec.nheads, spec.batch)
        _launch(launch, grid, params, device_id)
        return out, lse


def _takes_hopper_backward(spec, hopper_device, deterministic, want_dbias, *arrays):
    """The Hopper backward sums dq with float atomics: `deterministic` takes the mma.sync family, whose dq
    has its own pass; so does a bias gradient. Key tiles may index the grid's z axis."""
    return (spec.dtype.name in _plan.TENSOR_CORE_DTYPES and not deterministic and not want_dbias
            and math.ceil(spec.seqlen_k / _plan.sm90_backward_tiles(spec.headdim)[2]) <= _MAX_GRID_YZ
            and _hopper(hopper_device, *arrays))


def backward(dout, q, k, v, out, lse, spec, deterministic, want_dbias):
    # On the Hopper family dq is summed with float atomics (its last bits vary from run to run);
    # elsewhere, and with `deterministic`, dQ has its own pass and dq, dk and dv are bitwise
    # deterministic. dbias sums over the mask's broadcast dimensions with atomics.
    _check_grid(spec)
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        limit, hopper_device = _device_info(device_id)
        dout, q, k, v, out = (_rows_contiguous(x) for x in (dout, q, k, v, out))
        lse = cupy.ascontiguousarray(lse)
        acc = compute_dtype(q.dtype)
        var_type, var, _mask_cells = _variant(spec, device_id)
        dq, dk, dv = (spec.empty(_empty, x.shape, x.dtype) for x in (q, k, v))
        dbias = None
        if want_dbias:
            # Accumulated in the compute dtype in the mask's own (broadcast) shape: a stride-0
            # dimension of the view sums its contributions.
            dbias = cupy.zeros(spec.mask_shape, acc)
            view = cupy.broadcast_to(dbias.reshape((1,) * (4 - dbias.ndim) + dbias.shape), spec.attn_mask.shape)
            var["dbias"] = view.data.ptr
            var["dbias_sb"], var["dbias_sh"], var["dbias_sq"], var["dbias_sk"] = _elements(view)

        fwd = _fwd_values(spec, var, q, k, v, out, lse)
        flags = _flag_nonfinite(var_type, spec, device_id, (q, spec.seqlen_q, spec.nheads),
                                (k, spec.seqlen_k, spec.nheads_kv), (dout, spec.seqlen_q, spec.nheads))

        def bwd_values(delta):
            return (fwd, dout.data.ptr, *(_ptr(f) for f in flags), delta.data.ptr, dq.data.ptr, dk.data.ptr, dv.data.ptr,
                    *(_strides(x) for x in (dout, dq, dk, dv)), spec.batch)

        if _takes_hopper_backward(spec, hopper_device, deterministic, want_dbias, q, k, v, dout):
            _backward_sm90(bwd_values, dout, q, k, v, spec, var_type, device_id)
        else:
            delta_launch, dkdv_launch, dq_launch = _plan.backward(q.dtype.name, spec.headdim, var_type,
                                                                  _aligned(q, k, v, dout), limit)
            delta = _empty((spec.batch, spec.nheads, spec.seqlen_q), acc)
            p = _struct(BWD_PARAMS, bwd_values(delta))
            rows = spec.batch * spec.nheads * spec.seqlen_q
            _launch(delta_launch, (math.ceil(rows / delta_launch.block_rows), 1, 1), p, device_id)
            key_tiles = math.ceil(spec.seqlen_k / dkdv_launch.block_rows)
            _launch(dkdv_launch, (key_tiles * dkdv_launch.column_slices, spec.nheads_kv, spec.batch), p, device_id)
            _launch(dq_launch, (math.ceil(spec.seqlen_q / dq_launch.block_rows), spec.nheads, spec.batch), p,
                    device_id)
        return dq, dk, dv, None if dbias is None else dbias.astype(spec.attn_mask.dtype)


def _backward_sm90(bwd_values, dout, q, k, v, spec, var_type, device_id):
    """The Hopper backward's three launches: prepare (delta, lse in log2 units, a zeroed float32 dq
    accumulator), the main kernel over key tiles, kv heads and batches, and dq's conversion.
    bwd_values(delta) gives the BwdParams."""
    dtype = q.dtype.name
    prepare, main, convert = _plan.backward_sm90(dtype, spec.headdim, var_type)
    head_tile = _plan.sm90_backward_tiles(spec.headdim)[1]
    rows = -(-spec.seqlen_q // _plan.SM90_BWD_BLOCK_M) * _plan.SM90_BWD_BLOCK_M
    delta, lse_log2 = (_empty((spec.batch, spec.nheads, rows), np.float32) for _ in range(2))
    dq_accum = _empty((spec.batch, spec.nheads, rows, head_tile), np.float32)
    maps = (_tma.tensor_map(q, dtype, _plan.SM90_BWD_BLOCK_M), _tma.tensor_map(k, dtype, main.block_rows),
            _tma.tensor_map(v, dtype, main.block_rows), _tma.tensor_map(dout, dtype, _plan.SM90_BWD_BLOCK_M))
    p = _struct(BWD_PARAMS_SM90, (*maps, bwd_values(delta), lse_log2.data.ptr, dq_accum.data.ptr, rows, head_tile))
    padded_rows = spec.batch * spec.nheads * rows
    _launch(prepare, (math.ceil(padded_rows / prepare.block_rows), 1, 1), p, device_id)
    key_tiles = math.ceil(spec.seqlen_k / main.block_rows)
    # the axes' order of backward_sm90.cu's key_block: key tiles slowest under a causal or window bound
    grid = (spec.nheads_kv, spec.batch, key_tiles) if spec.has_window else (key_tiles, spec.nheads_kv, spec.batch)
    _launch(main, grid, p, device_id)
    quads = dq_accum.size // 4  # the convert kernel takes four accumulator values per thread
    _launch(convert, (math.ceil(quads / convert.block_rows), 1, 1), p, device_id)


DECODE_DTYPES = ("float16", "bfloat16", "float32")


def can_decode(spec, k_cache, v_cache):
    """Whether the split-KV decode kernel takes a KV-cache call: at most DECODE_ROWS[-1] query rows
    per kv head, a head dimension that is a multiple of 8, 16-byte aligned cache rows."""
    return (spec.dtype.name in DECODE_DTYPES and spec.group * spec.seqlen_q <= _plan.DECODE_ROWS[-1]
            and spec.headdim % 8 == 0
            and all(x.data.ptr % 16 == 0 and x.strides[-1] == x.itemsize and all(st % 16 == 0 for st in x.strides[:3])
                    for x in (k_cache, v_cache)))


def decode(q, k_cache, v_cache, spec, seqlens_k, block_table, page_size, num_splits):
    """(out, lse) of q over each sequence's first seqlens_k[b] cache rows (device int32 (batch,)), paged
    through block_table (device int32 (batch, pages)) or, when it is None, sequence b on page b, with
    splits of the keys chosen by _plan.decode_splits (`num_splits` 0: automatic)."""
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        _device_info(device_id)
        q = _rows_contiguous(q)
        out = spec.empty(_empty, q.shape, q.dtype)
        lse = _empty((spec.batch, spec.nheads, spec.seqlen_q), np.float32)
        splits, per_split = _plan.decode_splits(spec.seqlen_k, spec.batch * spec.nheads_kv,
                                                _multiprocessors(device_id), num_splits)
        rows = (splits, spec.batch, spec.nheads, spec.seqlen_q)
        part_out, part_lse = _empty((*rows, spec.headdim), np.float32), _empty(rows, np.float32)
        var_type, var, _ = _variant(spec, device_id)
        table, table_stride = 0, 0
        if block_table is not None:
            block_table = cupy.ascontiguousarray(block_table)
            table, table_stride = block_table.data.ptr, block_table.shape[1]
        p = _struct(DECODE_PARAMS, (_fwd_values(spec, var, q, k_cache, v_cache, out, lse), seqlens_k.data.ptr, table,
                                    table_stride, page_size, spec.batch, splits, per_split, part_out.data.ptr,
                                    part_lse.data.ptr))
        main, combine = _plan.decode(spec.dtype.name, spec.headdim, spec.group * spec.seqlen_q, var_type)
        _launch(main, (splits, spec.nheads_kv, spec.batch), p, device_id)
        _launch(combine, (spec.batch * spec.nheads * spec.seqlen_q, 1, 1), p, device_id)
        return out, lse
