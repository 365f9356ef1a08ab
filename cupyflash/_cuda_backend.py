"""Kernel cache and launch for CuPy arrays.

Sources in `cuda_src/` (`_csource.source`) are compiled at first use with NVRTC through
`cupy.RawModule`, one template instantiation per module (so a process only compiles what it runs),
kept per process here and on disk by CuPy's kernel cache. Each pass takes one parameter struct
(`cuda_src/params.cuh`), built here as a NumPy structured scalar of the dtype read from its C
declaration; a call's variant fills its VariantParams from `_variants.kernel_variant`. Launches go
to CuPy's current stream on the arrays' device, outputs come from CuPy's memory pool, and nothing
synchronizes the device.
"""
import functools
import math
import os
import threading
import typing
import weakref

import cupy
import numpy as np

from . import _csource, _plan, _tma, _variants
from ._csource import source
from ._validate import compute_dtype, lse_shape

_MAX_GRID_YZ = 65535


@functools.lru_cache(maxsize=None)
def _module(filename, name, options):
    return cupy.RawModule(code=source(filename), options=options, name_expressions=(name,))


@functools.lru_cache(maxsize=None)
def _kernel(launch, device_id):
    """The launch's compiled function on device `device_id` (the current device), allowed its shared memory."""
    kernel = _module(launch.source, launch.name, launch.options).get_function(launch.name)
    if launch.smem_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = launch.smem_bytes
    return kernel.kernel  # the driver's function, launched without the lookup of the current device


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


@functools.lru_cache(maxsize=None)
def _resident_blocks(launch, device_id):
    """How many of `launch`'s blocks a multiprocessor holds at once (the driver's occupancy, from the compiled
    kernel's registers and shared memory)."""
    return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
        _kernel(launch, device_id).ptr, launch.threads, launch.smem_bytes)


@functools.lru_cache(maxsize=None)
def _l2_bytes(device_id):
    return cupy.cuda.Device(device_id).attributes["L2CacheSize"]


#: Set to "sm80" to run the mma.sync family on a Hopper GPU too, or to "simt" to run float32 and float64 on CUDA
#: cores (the tests validate every family).
FAMILY_VARIABLE = "CUPYFLASH_KERNELS"
#: CuPy's own switch for TF32 in float32 products; cupyflash follows it.
TF32_VARIABLE = "CUPY_TF32"


def _math():
    """How float32 and float64 calls compute: on tensor cores unless forced onto CUDA cores, float32 exact
    unless CUPY_TF32 asks for TF32."""
    return dict(tensor_cores=os.environ.get(FAMILY_VARIABLE, "") != "simt",
                tf32=os.environ.get(TF32_VARIABLE, "0") not in ("", "0"))


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
    """One launch on the current stream; ``params`` is a struct from _struct or a _Readdressed."""
    _kernel(launch, device_id)(grid, (launch.threads,), (params,), shared_mem=launch.smem_bytes)


def _empty(shape, dtype):
    """Every output buffer comes from here (CuPy's pool); tests poison it with NaN."""
    return cupy.empty(shape, dtype)


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _rows_contiguous(x):
    """The kernels take any batch, sequence and head strides but need a unit last stride;
    other layouts are copied once (_contiguous)."""
    return x if x.strides[-1] == x.itemsize else _contiguous(x)


def _contiguous(x):
    """x in C order, copied as raw bits where it is not (which works for every dtype, bfloat16 too)."""
    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x.view(_UINT[x.itemsize])).view(x.dtype)


def _aligned(*arrays):
    """16-byte vector loads are possible: base pointers and row strides multiples of 16 bytes."""
    return all(x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:3]) and x.shape[3] % 8 == 0
               for x in arrays)


# ---- parameter structs: NumPy dtypes read from their declarations in cuda_src/params.cuh
def _params_dtype(name):
    return _csource.struct_dtype(source("params.cuh"), name)


VARIANT_PARAMS = _params_dtype("VariantParams")
ROW_FLAGS = _params_dtype("RowFlags")
NONFINITE_PARAMS = _params_dtype("NonfiniteParams")
FWD_PARAMS = _params_dtype("FwdParams")
FWD_PARAMS_SM90 = _params_dtype("FwdParamsSm90")
SPLIT_PARAMS = _params_dtype("SplitParams")
DECODE_PARAMS = _params_dtype("DecodeParams")
BWD_PARAMS = _params_dtype("BwdParams")
SINK_GRAD_PARAMS = _params_dtype("SinkGradParams")
BWD_PARAMS_SM90 = _params_dtype("BwdParamsSm90")


@functools.lru_cache(maxsize=None)
def _raw(dtype):
    return np.dtype((np.void, dtype.itemsize))


def _struct(dtype, values):
    """A parameter struct from its values in field order (nested structs as tuples), as raw bytes:
    one construction instead of a field at a time, and CuPy passes the bytes without walking the
    structured dtype's fields."""
    return np.array([values], dtype).view(_raw(dtype))[0]


def _values(dtype, fields):
    """The values of a flat struct in field order from a {field: value} dict; absent fields are 0, and a
    name the struct lacks is an error (a misspelt member would otherwise be dropped)."""
    if not fields.keys() <= dtype.fields.keys():
        raise KeyError(f"cupyflash: no parameter struct member {sorted(fields.keys() - dtype.fields.keys())}")
    return tuple(fields.get(name, 0) for name in dtype.names)


def _strides(x):
    """(batch, sequence, head) strides in elements."""
    return tuple(s // x.itemsize for s in x.strides[:3])


def _elements(x):
    return tuple(s // x.itemsize for s in x.strides)


def _variant(spec, device_id):
    """The kernel's Variant type, the VariantParams members of a spec ({name: value}), and the cells of
    a bool mask (classified on the device; they must stay referenced until the call's launches are
    queued)."""
    features, mask_dtype, fields = _variants.kernel_variant(spec)
    var = _variant_params(fields)
    if spec.learnable_sink is not None:  # in the accumulation dtype (_validate): read where it is
        var["sink"], var["sink_sh"] = spec.learnable_sink.data.ptr, _elements(spec.learnable_sink)[0]
    return _plan.variant(features, mask_dtype), var, _classify_mask(spec, var, device_id)


def sink_gradient(dout, out, lse, spec):
    """d loss / d learnable_sink, (nheads,) in the sink's dtype, the accumulation dtype (sink_grad.cu), from the
    caller's dout and out (as the backward takes them) and lse."""
    with cupy.cuda.Device(dout.device.id):
        acc = compute_dtype(spec.dtype)
        if spec.varlen:  # (total_q, heads, headdim) rows, lse (nheads, total_q): one sequence of them all
            dout, out, lse = dout[None], out[None], lse[None]
        dout, out, lse = _rows_contiguous(dout), _rows_contiguous(out), cupy.ascontiguousarray(lse)
        partials, total = _plan.sink_gradient(spec.dtype.name, spec.headdim, _aligned(dout, out))
        batch, seqlen, nheads = dout.shape[:3]
        # one wave of blocks over every sequence and head: a second wave's few blocks would double the time
        wave = _resident_blocks(partials, dout.device.id) * _multiprocessors(dout.device.id)
        blocks = max(1, min(wave // (batch * nheads), -(-seqlen // partials.block_rows)))
        partial, dsink = _empty((batch, nheads, blocks), acc), _empty((nheads,), acc)
        sink = cupy.ascontiguousarray(spec.learnable_sink)
        lse_sb, lse_sh = _elements(lse)[:2]
        params = _struct(SINK_GRAD_PARAMS, (dout.data.ptr, out.data.ptr, _strides(dout), _strides(out), lse.data.ptr,
                                            lse_sb, lse_sh, sink.data.ptr, partial.data.ptr, dsink.data.ptr, seqlen,
                                            spec.headdim, batch, blocks))
        _launch(partials, (blocks, nheads, batch), params, dout.device.id)
        _launch(total, (nheads, 1, 1), params, dout.device.id)
        return dsink


def _variant_params(fields):
    """VariantParams members from {name: value}: an array gives member `name` its device pointer and the
    members name_sb, name_sh, name_sq, name_sk (as many as it has axes) its element strides."""
    var = {}
    for name, value in fields.items():
        if isinstance(value, cupy.ndarray):
            var[name] = value.data.ptr
            var.update(zip((f"{name}_s{axis}" for axis in "bhqk"), _elements(value)))
        else:
            var[name] = value
    return var


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
    """For a variant that hides keys: the RowFlags (a uint8 array) of each (array, heads) of `tensors` (at
    most three, of one dtype, each (batch entries, rows, heads, headdim)), flagged in one launch
    (nonfinite.cu); else Nones."""
    if not _plan.hides_keys(var_type):
        return (None,) * len(tensors)
    entries = tensors[0][0].shape[0]
    flags = [_empty((entries, heads, -(-x.shape[1] // _plan.NONFINITE_ROWS)), np.uint8) for x, heads in tensors]
    chunks = max(f.size for f in flags)
    if chunks:
        launch = _plan.nonfinite_rows(spec.dtype.name, _aligned(*(x for x, _ in tensors)))
        rows = [(x.data.ptr, _strides(x), x.shape[1], heads, f.data.ptr) for (x, heads), f in zip(tensors, flags)]
        rows += [(0, (0, 0, 0), 0, 0, 0)] * (3 - len(rows))
        p = _struct(NONFINITE_PARAMS, (rows, entries, spec.headdim))
        _launch(launch, (math.ceil(chunks / launch.block_rows), len(tensors), 1), p, device_id)
    return flags


def _ptr(x):
    return 0 if x is None else x.data.ptr


def _fwd_values(spec, var, q=None, k=None, v=None, out=None, lse=None, v_nonfinite=None, variant=None,
                packed=None, runs_on_nonfinite=0):
    """FwdParams' values; without arrays (the mask classifier) only the sizes and the variant, given as
    VariantParams members {name: value} (`var`) or as their values in order (`variant`). A packed batch
    gives its q, k, v and out as one batch entry of all rows, its offsets as `packed` (_Packed). The gate's
    address is filled in per call (_SplitForward)."""
    ptrs = tuple(_ptr(x) for x in (q, k, v, out, lse, v_nonfinite))
    strides = tuple((0, 0, 0) if x is None else _strides(x) for x in (q, k, v, out))
    if packed is None:
        rows = (0, 0, 0, spec.seqlen_q, spec.seqlen_k, spec.nheads * spec.seqlen_q, spec.seqlen_q)
    else:  # lse: (nheads, total_q)
        rows = (packed.cu_q.data.ptr, packed.cu_k.data.ptr, _ptr(packed.used_k), packed.total_q, packed.total_k, 0,
                packed.total_q)
    return (*ptrs, *strides, spec.seqlen_q, spec.seqlen_k, spec.headdim, spec.nheads, spec.group, spec.scale,
            _values(VARIANT_PARAMS, var) if variant is None else variant, *rows, 0, runs_on_nonfinite)


class _Packed(typing.NamedTuple):
    """A packed batch's offsets on the device (int32), its keys' lengths where they are given apart
    (Spec.seqused_k; else None), and its total rows."""
    cu_q: cupy.ndarray
    cu_k: cupy.ndarray
    used_k: typing.Optional[cupy.ndarray]
    total_q: int
    total_k: int


def _packed(spec):
    """The offsets of a packed batch on the current device: the caller's CuPy arrays where they are on it,
    else the host ones (and the keys' lengths) copied there in one transfer; None when dense."""
    if not spec.varlen:
        return None
    totals = spec.total_q, spec.total_k
    given = spec.device_offsets
    if given is not None and given[0].device.id == cupy.cuda.Device().id == given[1].device.id:
        return _Packed(*given, None, *totals)
    host = (spec.cu_seqlens_q, spec.cu_seqlens_k) + (() if spec.seqused_k is None else (spec.seqused_k,))
    words = cupy.asarray(np.concatenate(host).astype(np.int32))
    n = spec.batch + 1
    return _Packed(words[:n], words[n:2 * n], None if spec.seqused_k is None else words[2 * n:], *totals)


def forward(q, k, v, spec):
    """(out, lse) of (batch, seqlen, heads, headdim) q, k, v; a packed batch (spec.varlen) comes as one batch
    entry of all its rows, and its lse is (nheads, total_q)."""
    _check_grid(spec)
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        q, k, v = (_rows_contiguous(x) for x in (q, k, v))
        out = spec.empty(_empty, q.shape, q.dtype)
        lse = _empty(lse_shape(spec), compute_dtype(q.dtype))
        call = _planned(_FORWARD_CALLS, _call_key(spec, device_id, q, k, v, out),
                        lambda: _forward_call(spec, device_id, q, k, v, out, lse))
        if isinstance(call, _SplitForward):
            return call.run(spec, device_id, q, k, v, out, lse)
        v_nonfinite, = (_flag_nonfinite(call.var_type, spec, device_id, (v, spec.nheads_kv)) if call.reads_row_flags
                        else (None,))
        maps = tuple(_tma.tensor_map_words(x, spec.dtype.name, rows) for x, rows in zip((q, k, v), call.map_rows))
        scratch = [_empty(shape, dtype) for shape, dtype in call.buffers]
        params = call.params((q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, lse.data.ptr, _ptr(v_nonfinite),
                              *(x.data.ptr for x in scratch)), maps)
        for launch, grid in call.launches:
            _launch(launch, grid, params, device_id)
        return out, lse


class _Call(typing.NamedTuple):
    """What one pass launches, planned once for a call without array keywords (_call_key): its kernels and
    their grids in order, their parameter struct with the arrays' addresses (and tensor maps) left to fill
    in, the rows of each tensor map's box (none off the Hopper family), the (shape, dtype) of each scratch
    buffer a call allocates, and the device arrays the struct points to besides the call's own (a bool mask's
    cells, a packed batch's offsets copied from the host), which must live until the launches; and whether
    its kernels read the per-call flags of NaN/inf rows (_flag_nonfinite) where the variant hides keys (the
    Hopper family scans its tiles itself)."""
    launches: tuple
    params: "_Readdressed"
    var_type: str
    map_rows: tuple = ()
    buffers: tuple = ()
    referenced: tuple = ()
    reads_row_flags: bool = True


#: Planned calls by _call_key; bounded, cleared when full.
_FORWARD_CALLS = {}
_PLANNED_MAX = 128
_FWD_ADDRESSES = ("q", "k", "v", "out", "lse", "v_nonfinite")


def _call_key(spec, device_id, *arrays):
    """What a pass's launches depend on besides its arrays' addresses: the spec, the device, the
    environment's switches, the arrays' shapes and strides and which addresses are 16-byte aligned (TMA
    and vector loads). None for a call with an attn_mask (its cells are classified per call); ALiBi's slopes and
    a learnable sink are their spec's, checked once per address (_api._signature), and a packed batch's offsets,
    checked once per contents or, left on the device, per arrays (_validate.packed_signature); a KV cache's dense
    pass (Spec.seqused_k), once per contents too (_kvcache._packed_spec)."""
    if spec.attn_mask is not None:
        return None
    return (spec, device_id, os.environ.get(FAMILY_VARIABLE, ""), os.environ.get(TF32_VARIABLE, ""),
            tuple(x.data.ptr % 16 == 0 for x in arrays), *((x.shape, x.strides) for x in arrays))


def _planned(calls, key, plan):
    """plan() once per key (every time for None): a training loop's calls are planned once."""
    if key is None:
        return plan()
    call = calls.get(key)
    if call is None:
        if len(calls) >= _PLANNED_MAX:
            calls.clear()
        call = calls[key] = plan()
    return call


def reads_pages(spec, q, k, v):
    """Whether the forward of `spec` on these arrays reads a KV cache's pages in place (Spec.block_table): the
    Hopper forward of 16-bit inputs does; the other families take the pages gathered."""
    return spec.dtype.name in _plan.TENSOR_CORE_DTYPES and _hopper(_device_info(q.device.id)[1], q, k, v)


def _forward_call(spec, device_id, q, k, v, out, lse):
    limit, hopper_device = _device_info(device_id)
    var_type, var, mask_cells = _variant(spec, device_id)
    dtype = q.dtype.name
    packed = _packed(spec)
    fwd = _fwd_values(spec, var, q, k, v, out, lse, packed=packed)
    if spec.block_table is not None and not reads_pages(spec, q, k, v):
        raise RuntimeError("cupyflash: a KV cache's pages reach a forward that does not read them (reads_pages)")
    if _splits_float32(spec, hopper_device):
        hopper = _forward_sm90_call(spec, device_id, var_type, mask_cells, packed, fwd, _FWD_ADDRESSES + ("gate",))
        launch = _plan.forward(dtype, spec.headdim, var_type, _aligned(q, k, v), limit, **_math())
        fallback = _Call(((launch, (math.ceil(spec.seqlen_q / launch.block_rows), spec.nheads, spec.batch)),),
                         _Readdressed(FWD_PARAMS, _fwd_values(spec, var, q, k, v, out, lse, packed=packed,
                                                              runs_on_nonfinite=1), _FWD_ADDRESSES + ("gate",)),
                         var_type, (), (), (mask_cells, packed))
        return _SplitForward(hopper, fallback)
    if dtype in _plan.TENSOR_CORE_DTYPES and _hopper(hopper_device, q, k, v):
        return _forward_sm90_call(spec, device_id, var_type, mask_cells, packed, fwd, _FWD_ADDRESSES)
    launch = _plan.forward(dtype, spec.headdim, var_type, _aligned(q, k, v), limit, **_math())
    grid = (math.ceil(spec.seqlen_q / launch.block_rows), spec.nheads, spec.batch)
    return _Call(((launch, grid),), _Readdressed(FWD_PARAMS, fwd, _FWD_ADDRESSES), var_type, (), (), (mask_cells, packed))


def _splits_float32(spec, hopper_device):
    """Whether a float32 forward takes the Hopper kernel on split operands: exact float32 (not TF32) on
    tensor cores, a head of up to SM90_SPLIT_HEADDIM, the Hopper family not forced off."""
    math_mode = _math()
    return (spec.dtype.name == "float32" and hopper_device and math_mode["tensor_cores"] and not math_mode["tf32"]
            and os.environ.get(FAMILY_VARIABLE, "") != "sm80" and spec.headdim <= _plan.SM90_SPLIT_HEADDIM)


def _forward_sm90_call(spec, device_id, var_type, mask_cells, packed, fwd, addresses):
    """The Hopper forward's _Call, with the members `addresses` of its FwdParams filled in per call (and
    the tensor maps)."""
    keys = _plan.keys_seen(spec.seqlen_q, spec.seqlen_k, spec.window)  # the longest sequences' in a packed batch
    launch = _plan.forward_sm90(spec.dtype.name, spec.headdim, var_type, keys, spec.softcap)
    _, block_m, block_n, _ = _plan.sm90_forward_tiles(spec.dtype.name, spec.headdim, keys, var_type)
    pages = (0, 0, 0, 0)
    if spec.block_table is not None:  # K and V in boxes within a page, a power of two (FwdParamsSm90::block_table)
        block_n = math.gcd(block_n, spec.page_size, *(int(k0) for k0 in spec.cu_seqlens_k[:-1]))
        block_n &= -block_n
        if block_n < _plan.PAGE_BOX_ROWS:  # the producer reads at most a tile's PAGE_BOX_ROWS-row boxes
            raise RuntimeError(f"cupyflash: pages read through the table in boxes of {block_n} rows, below "
                               f"{_plan.PAGE_BOX_ROWS}")
        table = spec.block_table
        pages = (table.data.ptr, table.strides[0] // table.itemsize, spec.page_size, block_n)
    map_rows = (block_m, block_n, block_n)
    maps = tuple(np.zeros((), _tma.TENSOR_MAP) for _ in map_rows)
    parts_apart = spec.batch if packed is None else 1  # split float32: a part's batch entries, or its one
    params = _Readdressed(FWD_PARAMS_SM90, (*maps, fwd, 0, spec.batch, parts_apart, *pages),
                          tuple(f"fwd.{m}" for m in addresses) + (() if packed is None else ("work",)),
                          ("tma_q", "tma_k", "tma_v"))
    # persistent: a block per multiprocessor (one fits), or one per work tile if fewer
    tiles = math.ceil(spec.seqlen_q / block_m) * spec.nheads * spec.batch
    launches = ((launch, (min(tiles, _multiprocessors(device_id)), 1, 1)),)
    buffers = ()
    if packed is not None:  # its work list, built on the device before each launch (work_list.cu)
        launches = ((_plan.work_list(block_m), (1, 1, 1)),) + launches
        buffers = (((2 * spec.batch + 2,), np.int32),)
    return _Call(launches, params, var_type, map_rows, buffers, (mask_cells, packed, spec.block_table),
                 reads_row_flags=False)


def _split_inputs(device_id, gate, tensors):
    """Each float32 (array, tensor-map rows) of `tensors` split into SM90_SPLIT_PARTS bfloat16 parts (split.cu),
    `gate` (a zeroed int32 on the device) set where any holds NaN or inf: the parts' tensor maps, and the parts,
    which must live until the launches reading them are queued (the pool hands freed memory out again)."""
    split = _plan.split_float32()
    maps, parts = [], []
    for x, rows in tensors:
        entries, seqlen, heads, headdim = x.shape
        cols = -(-headdim // 8) * 8
        parts.append(_empty((_plan.SM90_SPLIT_PARTS * entries, seqlen, heads, cols), np.uint16))
        p = _struct(SPLIT_PARAMS, (x.data.ptr, _strides(x), entries, seqlen, heads, headdim, cols,
                                   parts[-1].data.ptr, gate.data.ptr))
        blocks = min(math.ceil(entries * seqlen * heads * cols / split.threads), 8 * _multiprocessors(device_id))
        _launch(split, (max(blocks, 1), 1, 1), p, device_id)
        maps.append(_tma.tensor_map_words(parts[-1], "bfloat16", rows))
    return maps, parts


class _SplitForward(typing.NamedTuple):
    """A float32 forward on Hopper: q, k and v split into bfloat16 parts (split.cu), then two launches of
    which the gate lets one run (FwdParams::gate): the Hopper kernel on the parts, or, where an input holds
    NaN or inf (which the parts' products cannot carry), the mma.sync kernel on the inputs. No read of the
    gate on the host: the call stays asynchronous."""
    hopper: _Call
    fallback: _Call

    def run(self, spec, device_id, q, k, v, out, lse):
        gate = cupy.zeros(1, np.int32)
        maps, parts = _split_inputs(device_id, gate, zip((q, k, v), self.hopper.map_rows))
        addresses = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, lse.data.ptr, 0, gate.data.ptr)
        scratch = [_empty(shape, dtype) for shape, dtype in self.hopper.buffers]
        params = self.hopper.params(addresses + tuple(x.data.ptr for x in scratch), maps)
        for launch, grid in self.hopper.launches:
            _launch(launch, grid, params, device_id)
        v_nonfinite, = (_flag_nonfinite(self.fallback.var_type, spec, device_id, (v, spec.nheads_kv))
                        if self.fallback.reads_row_flags else (None,))
        addresses = addresses[:5] + (_ptr(v_nonfinite), gate.data.ptr)
        (launch, grid), = self.fallback.launches
        _launch(launch, grid, self.fallback.params(addresses), device_id)
        return out, lse


class _SplitBackward(typing.NamedTuple):
    """A float32 backward on Hopper, as _SplitForward: q, k, v and dout split into bfloat16 parts, then the
    Hopper backward's launches on the parts and the mma.sync family's on the inputs, which the gate lets run
    where an input holds NaN or inf."""
    hopper: _Call
    fallback: _Call

    def run(self, spec, device_id, dout, q, k, v, out, lse, dq, dk, dv):
        gate = cupy.zeros(1, np.int32)
        maps, parts = _split_inputs(device_id, gate, zip((q, k, v, dout), self.hopper.map_rows))
        arrays = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, lse.data.ptr, dout.data.ptr)
        grads = (dq.data.ptr, dk.data.ptr, dv.data.ptr)
        scratch = [_empty(shape, dtype) for shape, dtype in self.hopper.buffers]
        params = self.hopper.params((*arrays, 0, 0, 0, *grads, *(x.data.ptr for x in scratch), gate.data.ptr), maps)
        for launch, grid in self.hopper.launches:
            _launch(launch, grid, params, device_id)
        flags = (_flag_nonfinite(self.fallback.var_type, spec, device_id, (q, spec.nheads), (k, spec.nheads_kv),
                                 (dout, spec.nheads)) if self.fallback.reads_row_flags else (None,) * 3)
        scratch = [_empty(shape, dtype) for shape, dtype in self.fallback.buffers]
        params = self.fallback.params((*arrays, *(_ptr(f) for f in flags), *grads, *(x.data.ptr for x in scratch),
                                       gate.data.ptr))
        for launch, grid in self.fallback.launches:
            _launch(launch, grid, params, device_id)
        return dq, dk, dv, None


def _takes_hopper_backward(spec, hopper_device, deterministic, want_dbias, *arrays):
    """The Hopper backward sums dq with float atomics: `deterministic` takes the mma.sync family, whose dq
    has its own pass; so does a bias gradient. At most 65535 key tiles per sequence. 16-bit inputs where
    TMA reads them; float32 on split operands (_splits_float32), whose parts TMA always reads."""
    if deterministic or want_dbias:
        return False
    dtype = spec.dtype.name
    if dtype == "float32":
        if not _splits_float32(spec, hopper_device):
            return False
    elif not (dtype in _plan.TENSOR_CORE_DTYPES and _hopper(hopper_device, *arrays)):
        return False
    return math.ceil(spec.seqlen_k / _plan.sm90_backward_keys(dtype, spec.headdim)) <= _MAX_GRID_YZ


def backward(dout, q, k, v, out, lse, spec, deterministic, want_dbias):
    """(dq, dk, dv, dbias or None), the arrays as forward takes them."""
    # On the Hopper family, and float64's tensor cores, dq is summed with atomics (its last bits vary
    # from run to run); elsewhere, and with `deterministic`, dQ has its own pass and dq, dk and dv are
    # bitwise deterministic. dbias sums over the mask's broadcast dimensions with atomics.
    _check_grid(spec)
    device_id = q.device.id
    with cupy.cuda.Device(device_id):
        dout, q, k, v, out = (_rows_contiguous(x) for x in (dout, q, k, v, out))
        lse = cupy.ascontiguousarray(lse)
        dq, dk, dv = (spec.empty(_empty, x.shape, x.dtype) for x in (q, k, v))
        dbias = None
        if want_dbias:
            # Accumulated in the compute dtype in the mask's own (broadcast) shape: a stride-0
            # dimension of the view sums its contributions.
            dbias = cupy.zeros(spec.mask_shape, compute_dtype(q.dtype))
        arrays = (dout, q, k, v, out, lse, dq, dk, dv)
        key = _call_key(spec, device_id, *arrays)
        call = _planned(_BACKWARD_CALLS, key and (key, deterministic),
                        lambda: _backward_call(spec, device_id, deterministic, dbias, *arrays))
        if isinstance(call, _SplitBackward):
            return call.run(spec, device_id, *arrays)
        flags = (_flag_nonfinite(call.var_type, spec, device_id, (q, spec.nheads), (k, spec.nheads_kv), (dout, spec.nheads))
                 if call.reads_row_flags else (None,) * 3)
        scratch = [_empty(shape, dtype) for shape, dtype in call.buffers]
        maps = tuple(_tma.tensor_map_words(x, spec.dtype.name, rows) for x, rows in zip((q, k, v, dout), call.map_rows))
        params = call.params((q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, lse.data.ptr, dout.data.ptr,
                              *(_ptr(f) for f in flags), dq.data.ptr, dk.data.ptr, dv.data.ptr,
                              *(x.data.ptr for x in scratch)), maps)
        for launch, grid in call.launches:
            _launch(launch, grid, params, device_id)
        return dq, dk, dv, None if dbias is None else dbias.astype(spec.attn_mask.dtype)


#: Planned backward calls by (_call_key, deterministic).
_BACKWARD_CALLS = {}
_BWD_ADDRESSES = ("fwd.q", "fwd.k", "fwd.v", "fwd.out", "fwd.lse", "dout", "q_nonfinite", "k_nonfinite",
                  "do_nonfinite", "dq", "dk", "dv")


def _backward_call(spec, device_id, deterministic, dbias, dout, q, k, v, out, lse, dq, dk, dv):
    """The backward's _Call: the Hopper family's launches or the delta, dQ and dK/dV passes of the
    others, and the scratch buffers each call allocates (their addresses follow _BWD_ADDRESSES'); for
    float32 on Hopper, a _SplitBackward of both."""
    limit, hopper_device = _device_info(device_id)
    var_type, var, mask_cells = _variant(spec, device_id)
    if dbias is not None:
        view = cupy.broadcast_to(dbias.reshape((1,) * (4 - dbias.ndim) + dbias.shape), spec.attn_mask.shape)
        var.update(_variant_params({"dbias": view}))
    packed = _packed(spec)
    referenced = (mask_cells, packed)

    def bwd_values(runs_on_nonfinite=0):
        fwd = _fwd_values(spec, var, q, k, v, out, lse, packed=packed, runs_on_nonfinite=runs_on_nonfinite)
        return (fwd, 0, 0, 0, 0, 0, 0, 0, 0, 0, *(_strides(x) for x in (dout, dq, dk, dv)), spec.batch)

    if not _takes_hopper_backward(spec, hopper_device, deterministic, dbias is not None, q, k, v, dout):
        return _backward_mma_call(spec, limit, var_type, bwd_values(), referenced, q, k, v, dout, lse,
                                  dq_atomics=not deterministic and dbias is None)
    if spec.dtype.name != "float32":
        return _backward_sm90_call(spec, device_id, var_type, bwd_values(), referenced, q, k, v, dout, out)
    gate = ("fwd.gate",)
    return _SplitBackward(_backward_sm90_call(spec, device_id, var_type, bwd_values(), referenced, q, k, v, dout, out,
                                              gate),
                          _backward_mma_call(spec, limit, var_type, bwd_values(runs_on_nonfinite=1), referenced, q, k,
                                             v, dout, lse, gate))


def _backward_mma_call(spec, limit, var_type, values, referenced, q, k, v, dout, lse, extra=(), dq_atomics=False):
    """The delta, dQ and dK/dV passes of the mma.sync and CUDA-core families; `extra`: BwdParams members
    whose addresses follow the scratch buffers'; `dq_atomics`: float64's dK/dV pass may add dq
    (_plan.backward)."""
    dtype = q.dtype.name
    delta_launch, dkdv_launch, dq_launch = _plan.backward(dtype, spec.headdim, var_type, _aligned(q, k, v, dout),
                                                          limit, dq_atomics=dq_atomics, **_math())
    acc = compute_dtype(q.dtype)
    # Wide inputs: the dQ pass leaves each row's renormalizer for the dK/dV pass (backward_mma.cu).
    buffers = ((lse.shape, acc),) * (2 if _plan.renormalizes(dtype) else 1)  # delta (and row_scale)
    members = ("delta", "row_scale")[:len(buffers)]
    params = _Readdressed(BWD_PARAMS, values, _BWD_ADDRESSES + members + extra)
    key_tiles = math.ceil(spec.seqlen_k / dkdv_launch.block_rows)
    launches = ((delta_launch, (math.ceil(lse.size / delta_launch.block_rows), 1, 1)),
                (dq_launch, (math.ceil(spec.seqlen_q / dq_launch.block_rows), spec.nheads, spec.batch)),
                (dkdv_launch, (key_tiles * dkdv_launch.column_slices, spec.nheads_kv, spec.batch)))
    return _Call(launches, params, var_type, (), buffers, referenced)


def _backward_sm90_call(spec, device_id, var_type, values, referenced, q, k, v, dout, out, extra=()):
    """The Hopper backward's launches: prepare (delta, lse in log2 units, the float32 dq accumulator's tiles
    marked unwritten), the main kernel over key tiles, kv heads and batches, and dq's conversion. float32
    sums each row's probabilities before the main kernel, for their renormalization, and its tensor maps
    are its parts' (_SplitBackward); `extra`: BwdParams members whose addresses follow the scratch
    buffers'."""
    dtype = q.dtype.name
    prepare, main, convert = _plan.backward_sm90(dtype, spec.headdim, var_type, _aligned(dout, out))
    split = dtype == "float32"
    if split:
        head_tile, _, query_rows, _ = _plan.sm90_split_backward_tiles(spec.headdim)
        operand_bytes = 2 * _plan.SM90_SPLIT_PARTS  # bfloat16 parts
    else:
        head_tile, query_rows, operand_bytes = _plan.sm90_backward_tiles(spec.headdim)[1], _plan.SM90_BWD_BLOCK_M, 2
    tile = _plan.SM90_BWD_BLOCK_M
    longest = -(-spec.seqlen_q // tile) * tile  # query rows of the longest sequence in whole tiles
    if spec.varlen:  # sequence b from row (cu_seqlens_q[b] // tile + b) * tile of each head (backward_sm90.cu)
        rows, shape = (spec.total_q // tile + spec.batch) * tile, (spec.nheads,)
    else:
        rows, shape = longest, (spec.batch, spec.nheads)
    buffers = (((*shape, rows), np.float32),) * 2 + (((*shape, rows, head_tile), np.float32),)  # delta, lse_log2, dq_accum
    members = ("bwd.delta", "lse_log2", "dq_accum")
    if split:  # and the rows' sums of probabilities, for their renormalization (flash_bwd_sm90_row_sums)
        buffers += (((*shape, rows), np.float32),)
        members += ("bwd.row_scale",)
    buffers += (((1,), np.int32),  # the main kernel's count of key blocks taken
                ((*shape, rows // _plan.SM90_SPLIT_BWD_BLOCK_M), np.int32))  # tiles written (the finest: split's)
    members += ("key_blocks_taken", "dq_tiles_written")
    map_rows = (query_rows, main.block_rows, main.block_rows, query_rows)
    maps = tuple(np.zeros((), _tma.TENSOR_MAP) if split else _tma.tensor_map(x, dtype, r)
                 for x, r in zip((q, k, v, dout), map_rows))
    key_tiles = math.ceil(spec.seqlen_k / main.block_rows)
    queries = spec.nheads // spec.nheads_kv * longest * head_tile * (2 * operand_bytes + 4)  # q, dout, dq
    section = _plan.l2_section(_l2_bytes(device_id), queries, spec.batch * spec.nheads_kv)
    parts_apart = 1 if spec.varlen else spec.batch  # split float32: a part's batch entries, or its one
    struct = (*maps, values, 0, 0, rows, head_tile, spec.batch, section, parts_apart, 0, 0)  # addresses filled per call
    params = _Readdressed(BWD_PARAMS_SM90, struct,
                          tuple(f"bwd.{m}" for m in _BWD_ADDRESSES) + members + tuple(f"bwd.{m}" for m in extra),
                          ("tma_q", "tma_k", "tma_v", "tma_do"))
    blocks = _plan.sm90_backward_blocks(key_tiles * spec.nheads_kv * spec.batch,
                                        spec.nheads // spec.nheads_kv * longest, _multiprocessors(device_id))
    quads = spec.nheads * longest * head_tile // 4  # the convert kernel takes four accumulator values per thread
    sums = ()
    if split:
        row_sums = _plan.row_sums_sm90(spec.headdim, var_type)
        sums = ((row_sums, (math.ceil(spec.seqlen_q / row_sums.block_rows), spec.nheads, spec.batch)),)
    launches = ((prepare, (math.ceil(spec.nheads * longest / prepare.block_rows), spec.batch, 1)),  # a grid row per
                *sums, (main, (blocks, 1, 1)),                                                      # sequence
                (convert, (math.ceil(quads / convert.block_rows), spec.batch, 1)))
    return _Call(launches, params, var_type, map_rows, buffers, referenced, reads_row_flags=False)


DECODE_DTYPES = ("float16", "bfloat16", "float32")


class CacheLengths(typing.NamedTuple):
    """Where the KV-cache kernels find each sequence's rows (DecodeParams): `device`, a CuPy int32 (batch,)
    of the rows cached before the append, or None for `uniform` rows in every sequence; `new` rows
    appended after them; `block_table` (CuPy int32 (batch, pages)) or None, sequence b on page b; pages of
    `page_size` rows."""
    device: typing.Optional[cupy.ndarray]
    uniform: int
    new: int
    block_table: typing.Optional[cupy.ndarray]
    page_size: int
    leftpad: typing.Optional[cupy.ndarray] = None  # int32 (batch,): the row of each sequence's first key


def _decode_values(spec, fwd, lengths, k_new=None, v_new=None, splits=1, per_split=0, part_out=0, part_lse=0,
                   split_counters=0, rotary=None):
    """DecodeParams' values (the split buffers as device addresses; the rotary tables' and q_rot's addresses
    are filled in per call)."""
    table = lengths.block_table
    rotation = (0, 0, 0) if rotary is None else (2 * rotary.cos.shape[1], int(rotary.interleaved), rotary.q_step)
    return (fwd, _ptr(lengths.device), _ptr(lengths.leftpad), lengths.uniform, lengths.new, _ptr(k_new), _ptr(v_new),
            *((0, 0, 0) if x is None else _strides(x) for x in (k_new, v_new)), 0, 0, 0, *rotation, _ptr(table),
            0 if table is None else table.strides[0] // table.itemsize, lengths.page_size, spec.batch, splits,
            per_split, part_out, part_lse, split_counters, *(np.zeros((), _tma.TENSOR_MAP) for _ in range(2)))


class _Params(cupy.cuda.function.CPointer):
    """A parameter struct's words as a launch takes them: by their address, without a conversion."""

    def __init__(self, words):
        super().__init__(words.ctypes.data)
        self.words = words


class _Readdressed:
    """A parameter struct built once, whose calls write new addresses in its pointer members (`members`,
    dotted paths) and new tensor maps (`maps`, TensorMap members, which hold their array's address): the
    calls of a training or decoding loop differ only in where their arrays are. Each thread writes its own
    copy in place; a call's struct is launched before the thread's next call of it (the driver copies a
    launch's parameters when the launch is made)."""

    def __init__(self, dtype, values, members, maps=()):
        self.words = np.array([values], dtype).view(np.uint64).copy()  # plain words: a structured copy is slow
        self.slots = np.array([self._offset(dtype, member) // 8 for member in members])
        self.map_slots = [self._offset(dtype, member) // 8 for member in maps]
        self.copies = {}  # by thread

    @staticmethod
    def _offset(dtype, member):
        offset, fields = 0, dtype
        for name in member.split("."):
            fields, at = fields.fields[name][:2]
            offset += at
        return offset

    def __call__(self, addresses, maps=()):
        """The struct with `addresses` in `members` and `maps` (_tma.tensor_map_words) in the TensorMaps."""
        thread = threading.get_ident()
        params = self.copies.get(thread)
        if params is None:
            params = self.copies[thread] = _Params(self.words.copy())
        params.words[self.slots] = addresses
        if maps:
            self._put(params.words, maps)
        return params

    def keep_maps(self, maps):
        """`maps` in every struct from now on: for a struct kept per array, whose maps do not change."""
        for words in (self.words, *(params.words for params in self.copies.values())):
            self._put(words, maps)

    def _put(self, words, maps):
        for slot, words_of_map in zip(self.map_slots, maps):
            words[slot:slot + words_of_map.size] = words_of_map


#: The decode kernels' workspace by (device, stream): counters, zero between launches (the last split of a
#: (sequence, kv head, slab) resets its counter), and room for the splits' partial outputs and lses, which the
#: kernel reads back within its own launch, and for the lse of a call that does not return it. A stream's
#: calls run in order, so one workspace, grown to the largest call's need, serves them all, and a call
#: allocates only its outputs.
_DECODE_WORKSPACES = {}


def _decode_workspace(device_id, counters, floats):
    """(address of room for `floats` float32, address of `counters` zeroed uint32 counters) of the current
    stream of device `device_id`."""
    key = (device_id, cupy.cuda.get_current_stream().ptr)
    room, zeros = _DECODE_WORKSPACES.get(key, (None, None))
    if room is None or room.size < floats:
        room = _empty(floats, np.float32)
    if zeros is None or zeros.size < counters:
        zeros = cupy.zeros(max(counters, 1024), np.uint32)
    _DECODE_WORKSPACES[key] = room, zeros
    return room.data.ptr, zeros.data.ptr


#: Each Spec's append structs (by what else a call may change), so that a decoding loop builds them once.
_APPEND_STRUCTS = weakref.WeakKeyDictionary()
_APPEND_ADDRESSES = ("fwd.k", "fwd.v", "cache_seqlens", "block_table", "k_new", "v_new", "fwd.q", "rotary_cos",
                     "rotary_sin", "q_rot")
_DECODE_ADDRESSES = ("fwd.q", "fwd.k", "fwd.v", "fwd.out", "fwd.lse", "cache_seqlens", "cache_leftpad", "block_table",
                     "part_out", "part_lse", "split_counters")


def append(k_cache, v_cache, k, v, spec, lengths, q=None, rotary=None):
    """Write k and v (batch, seqlen_new, nheads_kv, headdim) into the caches at each sequence's positions
    after its cached rows, in one launch (kvcache_append, decode.cu), on the current device: the caches'.
    With ``rotary`` (_kvcache.Rotary) the keys are rotated on their way in, and q's rows into a new array,
    which it returns."""
    k, v = (_rows_contiguous(x) for x in (k, v))
    table = lengths.block_table
    structs = _APPEND_STRUCTS.setdefault(spec, {})
    key = (k_cache.strides, v_cache.strides, k.strides, v.strides, *lengths[1:3], lengths.page_size,
           None if table is None else table.shape)
    q_rot = cos = sin = None
    if rotary is not None:
        q = _rows_contiguous(q)
        cos, sin = (_contiguous(t) for t in (rotary.cos, rotary.sin))
        q_rot = _empty(q.shape, q.dtype)
        key += (q.strides, cos.shape[1], rotary.interleaved, rotary.q_step)
    else:
        q = None
    struct = structs.get(key)
    if struct is None:
        values = _decode_values(spec, _fwd_values(spec, {}, q, k_cache, v_cache), lengths._replace(leftpad=None), k,
                                v, rotary=rotary)
        struct = structs[key] = _Readdressed(DECODE_PARAMS, values, _APPEND_ADDRESSES)
    p = struct([k_cache.data.ptr, v_cache.data.ptr, _ptr(lengths.device), _ptr(table), k.data.ptr, v.data.ptr,
                _ptr(q), _ptr(cos), _ptr(sin), _ptr(q_rot)])
    rows, heads = lengths.new, spec.nheads_kv
    if rotary is not None:  # and q's rows
        rows, heads = max(rows, spec.seqlen_q), heads + spec.nheads
    if rows:
        _launch(_plan.kvcache_append(spec.dtype.name), (rows, heads, spec.batch), p, k_cache.data.device_id)
    return q_rot


def _decode_aligned(k_cache, v_cache):
    """16-byte loads of cache rows: aligned bases, unit last strides, row strides multiples of 16 bytes."""
    (kb, ks, kh, kd), (vb, vs, vh, vd) = k_cache.strides, v_cache.strides
    return (k_cache.data.ptr | v_cache.data.ptr | kb | ks | kh | vb | vs | vh) % 16 == 0 and kd == vd == k_cache.itemsize


#: Structs a decode plan keeps (per layout and, where TMA may read the caches, per pair of caches: a decoding
#: loop's layers each keep one); more are dropped all at once.
_DECODE_STRUCTS = 256


class _DecodePlan(typing.NamedTuple):
    launch: _plan.Launch
    tma_launch: typing.Optional[_plan.Launch]  # Hopper: the kernel reading the caches by TMA (_decode_by_tma)
    variant: tuple  # VariantParams' values
    splits: int
    per_split: int
    slabs: int      # blocks a (split, kv head, sequence) takes for its rows (_plan.decode_slabs)
    structs: dict   # (launch, _Readdressed DecodeParams) by what else a call may change (strides, lengths, caches)


#: Decode plans by Spec (the calls of a decoding loop share one, _kvcache) and by what a plan depends on
#: (calls checked afresh, such as those with a page table, have equal Specs).
_DECODE_PLANS = weakref.WeakKeyDictionary()
_DECODE_PLANS_BY_CASE = {}


def _decode_plan(spec, device_id, num_splits):
    """The kernel, the variant and the split of a decode call, or None when the decode kernels do not take
    it (more than DECODE_MAX_ROWS[dtype] query rows per kv head, a call that the dense forward serves faster
    (_plan.dense_serves), a head dimension that is not a multiple of 8, or no block that fits the device's shared
    memory)."""
    plans = _DECODE_PLANS.setdefault(spec, {})
    key = (device_id, num_splits)
    if key not in plans:
        rows = spec.group * spec.seqlen_q
        if not (spec.dtype.name in DECODE_DTYPES and rows <= _plan.DECODE_MAX_ROWS[spec.dtype.name]
                and spec.headdim % 8 == 0 and not _plan.dense_serves(
                    spec.dtype.name, spec.seqlen_q, spec.batch * spec.nheads, _multiprocessors(device_id))):
            plans[key] = None
            return None
        var_type, var, _ = _variant(spec, device_id)  # no bool mask here: nothing classified
        case = (device_id, num_splits, spec.dtype.name, spec.batch, spec.seqlen_q, spec.seqlen_k, spec.nheads,
                spec.nheads_kv, spec.headdim, spec.scale, var_type, _values(VARIANT_PARAMS, var))
        if case not in _DECODE_PLANS_BY_CASE:
            if len(_DECODE_PLANS_BY_CASE) >= 256:
                _DECODE_PLANS_BY_CASE.clear()
            _DECODE_PLANS_BY_CASE[case] = _new_decode_plan(spec, device_id, num_splits, var_type, case[-1])
        plans[key] = _DECODE_PLANS_BY_CASE[case]
    return plans[key]


def _new_decode_plan(spec, device_id, num_splits, var_type, variant):
    limit, hopper = _device_info(device_id)
    rows = spec.group * spec.seqlen_q
    main = _plan.decode(spec.dtype.name, spec.headdim, rows, var_type, limit)
    if main.smem_bytes > limit:
        return None
    tma = _plan.decode(spec.dtype.name, spec.headdim, rows, var_type, limit, tma=True) if (
        hopper and spec.dtype.name in _plan.TENSOR_CORE_DTYPES) else None
    # the band of keys some row may see, in the longest sequence (mask.cuh, key_begin and key_end)
    left = spec.window[0]
    band = spec.seqlen_k if left < 0 else min(spec.seqlen_k, spec.seqlen_q + left)
    slots = _plan.decode_slots(main, _multiprocessors(device_id), lambda: _resident_blocks(main, device_id))
    slabs = _plan.decode_slabs(spec.dtype.name, spec.headdim, rows)
    splits, per_split = _plan.decode_splits(band, spec.batch * spec.nheads_kv * slabs, slots, main.block_rows,
                                            num_splits)
    return _DecodePlan(main, tma, variant, splits, per_split, slabs, {})


def decode_plan(spec, k_cache, v_cache, num_splits=0):
    """The split-KV decode kernels' plan of a KV-cache call with these caches (_decode_plan), or None where
    they do not take it."""
    return _decode_plan(spec, k_cache.data.device_id, num_splits) if _decode_aligned(k_cache, v_cache) else None


def decode(plan, q, k_cache, v_cache, spec, lengths, want_lse=True):
    """(out, lse) of q over each sequence's cache rows (CacheLengths, after the append) by decode_plan's
    `plan`, whose splits of the keys _plan.decode_splits chose, on the current device: q's. Several splits
    write their partial outputs and lses to the stream's workspace and count themselves on a counter per
    (sequence, kv head, slab) that tells the last of them to merge them. Without `want_lse` the lse goes to the
    workspace too, and comes back None."""
    device_id = q.data.device_id
    q = _rows_contiguous(q)
    out = spec.empty(_empty, q.shape, q.dtype)
    lse = _empty((spec.batch, spec.nheads, spec.seqlen_q), np.float32) if want_lse else None
    rows = plan.splits * spec.batch * spec.nheads * spec.seqlen_q if plan.splits > 1 else 0
    room = rows * (spec.headdim + 1)
    splits = (0, 0, 0)
    if room or lse is None:
        part_out, counters = _decode_workspace(device_id, spec.batch * spec.nheads_kv * plan.slabs,
                                               room + (0 if want_lse else spec.batch * spec.nheads * spec.seqlen_q))
        if room:
            splits = (part_out, part_out + 4 * rows * spec.headdim, counters)
    lse_ptr = lse.data.ptr if want_lse else part_out + 4 * room
    table = lengths.block_table
    k_ptr, v_ptr = k_cache.data.ptr, v_cache.data.ptr
    key = (q.strides, k_cache.strides, v_cache.strides, out.strides, lengths.uniform, lengths.new, lengths.page_size,
           None if table is None else table.shape, lengths.leftpad is None)
    if plan.tma_launch is not None:  # TMA's choice and tensor maps are per pair of caches, kept with the struct
        key += (k_ptr, v_ptr, k_cache.shape, v_cache.shape)
    entry = plan.structs.get(key)
    if entry is None:
        tma = plan.tma_launch is not None and _decode_by_tma(spec, k_cache, v_cache, lengths)
        fwd = _fwd_values(spec, None, q, k_cache, v_cache, out, None, variant=plan.variant)
        values = _decode_values(spec, fwd, lengths, None, None, plan.splits, plan.per_split, *splits)
        struct = _Readdressed(DECODE_PARAMS, values, _DECODE_ADDRESSES, ("tma_k", "tma_v"))
        if tma:
            struct.keep_maps([_tma.tensor_map_words(x, spec.dtype.name, _plan.DECODE_BLOCK_N) for x in (k_cache, v_cache)])
        if len(plan.structs) >= _DECODE_STRUCTS:
            plan.structs.clear()
        entry = plan.structs[key] = (plan.tma_launch if tma else plan.launch, struct)
    launch, struct = entry
    p = struct((q.data.ptr, k_ptr, v_ptr, out.data.ptr, lse_ptr, _ptr(lengths.device), _ptr(lengths.leftpad),
                _ptr(table), *splits))
    _launch(launch, (plan.splits, spec.nheads_kv * plan.slabs, spec.batch), p, device_id)
    return out, lse


def _decode_by_tma(spec, k_cache, v_cache, lengths):
    """Whether the Hopper decode reads these caches by TMA: boxes of a tile's rows, which must lie on one page
    (contiguous caches have one per sequence; a paged one's pages must hold whole tiles, from key 0: no
    left window) at addresses TMA takes; and no left padding, which moves the keys off the tiles."""
    whole_tiles = lengths.leftpad is None and (lengths.block_table is None or (
        lengths.page_size % _plan.DECODE_BLOCK_N == 0 and spec.window[0] < 0))
    return whole_tiles and _tma.supported(k_cache) and _tma.supported(v_cache)
