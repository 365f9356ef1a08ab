"""The tile table: which kernel instantiation, tile sizes and launch shape serve each case.

Every choice of block size, thread count and shared memory lives here, so the launch code
(`_cuda_backend`) and the CI compile test (`tests/test_compile.py`) ask the same questions.
A case is (dtype, head dimension, variant, load path, shared-memory limit); the variant is the
`Variant<FEATURES, MaskT>` type of `cuda_src/mask.cuh`, named by :func:`variant`. The feature bits
are read from that file (`_variants.FEATURES`), so a new variant needs no entry here: the covering
set of the compile test takes every bit.
"""
import functools
import math
from dataclasses import dataclass

from . import _csource
from ._variants import FEATURES, HIDES_KEYS

# Head dimensions are padded to the next tile width; the kernels mask the padded columns.
HEADDIM_TILES = (16, 32, 64, 96, 128, 160, 192, 224, 256)

# Shared memory one block may use, by compute capability (the opt-in maximum).
SMEM_LIMITS = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
               (9, 0): 227 * 1024}
DEFAULT_SMEM_LIMIT = 99 * 1024  # newer or unknown parts: the smallest of the supported ones

C_TYPES = {"float16": "half_t", "bfloat16": "bfloat16_t", "float32": "float", "float64": "double"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
TENSOR_CORE_DTYPES = ("float16", "bfloat16")
#: float32 and float64 also run on tensor cores (forward_mma.cu, backward_mma.cu): float32 exact through
#: three TF32 products per product, or in TF32 (`tf32`: the C type tf32_t), float64 in DMMA.
WIDE_DTYPES = ("float32", "float64")
MASK_C_TYPES = {"bool": "unsigned char", **C_TYPES}

#: NVRTC options of every kernel (the architecture is added at compile time, from the device).
OPTIONS = ("-std=c++17", "-default-device")  # -default-device: generic lambdas in kernels


@dataclass(frozen=True)
class Launch:
    source: str       # file in cuda_src/
    name: str         # template instantiation, used as the NVRTC name expression
    block_rows: int   # rows of the tiled sequence axis that one block covers
    threads: int
    smem_bytes: int
    options: tuple = OPTIONS  # NVRTC options; part of the module cache key
    column_slices: int = 1    # blocks per row tile, each computing a slice of the head dimension


def variant(features=0, mask_dtype="bool"):
    """The `Variant<FEATURES, MaskT>` type naming a kernel's variant (mask_dtype: 'bool' or a float name)."""
    return f"Variant<{features}, {MASK_C_TYPES[mask_dtype]}>"


def _features(var):
    """The FEATURES of a `variant()` type."""
    return int(var[len("Variant<"):var.index(",")])


def hides_keys(var):
    """Whether a variant may hide a key from a row that multiplies its data (Variant::hides_keys): its
    kernels then read which rows hold NaN or inf (nonfinite_rows)."""
    return bool(_features(var) & HIDES_KEYS)


def headdim_tile(headdim):
    for tile in HEADDIM_TILES:
        if headdim <= tile:
            return tile
    raise ValueError(f"headdim must be at most {HEADDIM_TILES[-1]}, got {headdim}")


def smem_limit(compute_capability):
    return SMEM_LIMITS.get(tuple(compute_capability), DEFAULT_SMEM_LIMIT)


def _acc_bytes(dtype):
    return 8 if dtype == "float64" else 4


def _row_pad(dtype):
    """Shared-memory row padding of the mma.sync family's tiles, in elements (row_pad in mma.cuh)."""
    return 8 if _ITEMSIZE[dtype] == 2 else 4


def _cbool(flag):
    return "true" if flag else "false"


def _element(dtype, tf32):
    """The kernels' C type of `dtype`: float32 data computed in TF32 is tf32_t."""
    return "tf32_t" if tf32 and dtype == "float32" else C_TYPES[dtype]


def _wide_mma(dtype, d, tensor_cores):
    """float32 and float64 on tensor cores, unless `tensor_cores` is off: float64 up to headdim 128, where
    a warp's float64 accumulators of a 16-row slab still fit in its registers."""
    return tensor_cores and dtype in WIDE_DTYPES and (dtype == "float32" or d <= 128)


def forward(dtype, headdim, var, aligned, limit, tensor_cores=True, tf32=False):
    """Forward kernel for `dtype` (a NumPy dtype name) at this head dimension; float32 and float64 take
    CUDA cores where `tensor_cores` is off or no tensor-core tile fits."""
    d = headdim_tile(headdim)
    if _wide_mma(dtype, d, tensor_cores):
        # (16-row slabs per warp, key tile), measured on an H100 (docs/performance.md): float32 takes two
        # slabs up to headdim 128 (each split B fragment feeds two products), float64 one
        slabs, block_n = ((2, 32) if d <= 64 else (2, 16) if d <= 128 else (1, 16)) if dtype == "float32" else (1, 32)
        warps, item = 4, _ITEMSIZE[dtype]
        block_m = 16 * slabs * warps
        smem = lambda bn: item * (block_m + 4 * bn) * (d + _row_pad(dtype))  # q + double-buffered k, v
        try:
            block_n = _shrink(block_n, 16, smem, limit)
            name = (f"flash_fwd_mma<{_element(dtype, tf32)}, {d}, {block_n}, {warps}, {slabs}, {var}, "
                    f"{_cbool(aligned)}>")
            return Launch("forward_mma.cu", name, block_m, 32 * warps, smem(block_n))
        except RuntimeError:
            pass
    if dtype in TENSOR_CORE_DTYPES:
        # (warps, 16-row slabs per warp, key tile): see docs/performance.md.
        warps, slabs, block_n = (4, 2, 128) if d <= 64 else (4, 2, 64) if d <= 128 else (4, 1, 32)
        block_m = 16 * slabs * warps
        smem = lambda bn: 2 * (block_m + 4 * bn) * (d + _row_pad(dtype))  # q + double-buffered k, v
        block_n = _shrink(block_n, 16, smem, limit)
        name = f"flash_fwd_mma<{C_TYPES[dtype]}, {d}, {block_n}, {warps}, {slabs}, {var}, {_cbool(aligned)}>"
        return Launch("forward_mma.cu", name, block_m, 32 * warps, smem(block_n))
    acc = _acc_bytes(dtype)
    block_m, threads = (32, 128) if acc == 4 else (32, 256)
    block_n = (64 if d <= 128 else 32) if acc == 4 else (32 if d <= 128 else 16)
    smem = lambda bn: acc * ((block_m + 2 * bn) * (d + 1) + block_m * (bn + 1))
    block_n = _shrink(block_n, threads // block_m, smem, limit)
    name = f"flash_fwd_simt<{C_TYPES[dtype]}, {d}, {block_m}, {block_n}, {threads}, {var}>"
    return Launch("forward.cu", name, block_m, threads, smem(block_n))


#: The Hopper family: sm_90a code (wgmma, setmaxnreg) for compute capability 9.x.
SM90_OPTIONS = (*OPTIONS, "-arch=sm_90a")
SM90_STAGES = 2
SM90_SCHEDULE_SLOTS = _csource.constant(_csource.source("forward_sm90.cu"), "SCHEDULE_SLOTS")


#: From this many keys seen by a query row on average (keys_seen) on, the Hopper forward at head tile 64
#: takes tiles of 192 keys, for the variants of SM90_WIDE_KEY_TILE_FEATURES. Measured on an H100 against 128
#: (bfloat16, FA2-protocol cells, tools/ab.py, docs/performance.md): 192 takes 3% less time non-causal at 2k,
#: 6% at 4k and 13% at 16k; causal, 4% less at 8k and 6% at 16k, the same at 4k, 7% more at 2k; 11% more
#: under a window of 1024 keys at 16k and 31% more under one of 256 (the diagonal's key tiles mostly
#: hidden). (64-key tiles took 10-25% more at every length.) Other variants keep 128: with a mask, a bias
#: or two of the score transforms their consumers spill at 192.
SM90_WIDE_KEY_TILE_FROM = 2048
SM90_WIDE_KEY_TILE_FEATURES = FEATURES["WINDOW"] | FEATURES["WINDOW_LEFT"] | FEATURES["PACKED"]


def keys_seen(seqlen_q, seqlen_k, window):
    """How many keys a query row sees on average under `window` ((left, right) keys, -1 unbounded; causal is
    (-1, 0)), the rows aligned bottom-right: row i sees keys max(0, c - left) ... min(seqlen_k - 1, c + right)
    of its diagonal key c = i + seqlen_k - seqlen_q, a count linear in c between four kinks, summed piece by
    piece."""
    if seqlen_q == 0:
        return 0.0
    left, right = (seqlen_q + seqlen_k if bound < 0 else bound for bound in window)

    def seen(c):
        return max(0, min(seqlen_k - 1, c + right) - max(0, c - left) + 1)

    first, last = seqlen_k - seqlen_q, seqlen_k - 1
    cuts = [first, *sorted(c for c in {-right - 1, left, seqlen_k - 1 - right, seqlen_k + left} if first < c < last),
            last]
    total = sum((b - a + 1) * (seen(a) + seen(b)) / 2 for a, b in zip(cuts, cuts[1:]))
    total -= sum(seen(c) for c in cuts[1:-1])  # each inner cut ends one piece and starts the next
    return total / seqlen_q


def sm90_tiles(headdim, keys=0, var=None):
    """(head tile, query rows, keys) of a Hopper forward block whose rows see `keys` keys on average
    (keys_seen) under variant `var` (None: plain): the head dimension padded to 64-column chunks (the TMA box
    width), 128 query rows in two consumer warpgroups, key tiles of 128 keys (192 at head tile 64 from
    SM90_WIDE_KEY_TILE_FROM keys on; 64 above headdim 128, so that SM90_STAGES K and V buffers fit in shared
    memory)."""
    d = -(-headdim // 64) * 64
    if d > HEADDIM_TILES[-1]:
        raise ValueError(f"headdim must be at most {HEADDIM_TILES[-1]}, got {headdim}")
    features = 0 if var is None else _features(var)
    if d == 64 and keys >= SM90_WIDE_KEY_TILE_FROM and features & ~SM90_WIDE_KEY_TILE_FEATURES == 0:
        return d, 128, 192
    return d, 128, (128 if d <= 128 else 64)


#: float32 on the Hopper kernels: its inputs in this many bfloat16 parts (cuda_src/split.cuh), up to this
#: head dimension (wider heads keep the mma.sync kernels).
SM90_SPLIT_PARTS = 3
SM90_SPLIT_HEADDIM = 128


def sm90_split_tiles(headdim):
    """(head tile, query rows, keys, stages) of the Hopper forward on split float32 operands, whose parts take
    three times the shared memory of a 16-bit tile: 64 keys at head tile 64, 32 at 128 (where 64 keys spill
    the fresh accumulator of p v), two stages of K and V."""
    d = -(-headdim // 64) * 64
    if d > SM90_SPLIT_HEADDIM:
        raise ValueError(f"the Hopper forward takes float32 up to headdim {SM90_SPLIT_HEADDIM}, got {headdim}")
    return d, 128, (64 if d == 64 else 32), 2


def sm90_forward_tiles(dtype, headdim, keys=0, var=None):
    """(head tile, query rows, keys, stages) of the Hopper forward of `dtype` (`keys`: as sm90_tiles)."""
    if dtype in TENSOR_CORE_DTYPES:
        return (*sm90_tiles(headdim, keys, var), SM90_STAGES)
    if dtype == "float32":
        return sm90_split_tiles(headdim)
    raise ValueError(f"the Hopper forward takes float16, bfloat16 and float32, got {dtype}")


#: Softcapped scores lie within +-cap log2(e) (log2 units); up to this bound a bfloat16 forward shifts them by
#: a constant instead of a running max (cuda_src/softmax.cuh, bounded_shift).
SM90_BOUNDED_LIMIT = _csource.constant(_csource.source("softmax.cuh"), "BOUNDED_LIMIT")


def sm90_bounded_scores(dtype, head_tile, var, softcap):
    """Whether the Hopper forward of `var` takes its scores as bounded (BOUNDED in forward_sm90.cu): bfloat16
    probabilities, a softcap with cap log2(e) <= SM90_BOUNDED_LIMIT, no ALiBi or bias to push a score past
    the cap, and a head tile of 128 or more. Such a forward takes no row max and rescales no o: at softcap 50
    2-6% less time at head tiles 128 and 256 (H100, docs/performance.md), 9-11% more at 64, where the consumers
    then hand K's buffers back later."""
    features = _features(var)
    return (dtype == "bfloat16" and head_tile >= 128 and bool(features & FEATURES["SOFTCAP"])
            and not features & (FEATURES["ALIBI"] | FEATURES["BIAS"])
            and 0 < softcap * math.log2(math.e) <= SM90_BOUNDED_LIMIT)


#: K and V stages of a Hopper forward on bounded scores (sm90_bounded_scores) with no other feature, whose rows
#: see SM90_BOUNDED_STAGES_FROM keys or more, where shared memory holds them (head tile 128, with one query
#: buffer); its consumer warpgroups then take turns to issue their products (TURNS in forward_sm90.cu).
#: Measured on an H100 against two stages (bfloat16, softcap 50, tools/ab.py, docs/performance.md): 1% less
#: time at 2k keys, 3-4% at 4k, 6% at 16k, the turns 2-4% more off and the early q release (one buffer) 2%
#: more; 3% more at 1k (before that release); float16 (running max), dropout and head tile 64 gained nothing
#: or lost 1-4%; causal 2% less at 4k (rows of about 2k keys), none at 8k, 1% more at 16k (turns: 4-5% more).
SM90_BOUNDED_STAGES = 3
SM90_BOUNDED_STAGES_FROM = 2048


def forward_sm90(dtype, headdim, var, keys=0, softcap=0.0):
    """Hopper forward (forward_sm90.cu) whose rows see `keys` keys on average (keys_seen): a producer warpgroup
    streams K/V tiles through shared-memory stages to two consumer warpgroups; two query buffers where
    shared memory holds them. float32 reads its operands as SM90_SPLIT_PARTS bfloat16 parts. `softcap`: the
    call's, for sm90_bounded_scores."""
    d, block_m, block_n, stages = sm90_forward_tiles(dtype, headdim, keys, var)
    parts = SM90_SPLIT_PARTS if dtype == "float32" else 1
    limit = SMEM_LIMITS[(9, 0)]
    features = _features(var)
    # ALiBi's key term on the tensor cores (AlibiKeyTerm): 16 rows of key offsets
    offsets = (2 * 16 * block_n if parts == 1 and features & FEATURES["ALIBI"] and not features & FEATURES["SOFTCAP"]
               and block_n % 64 == 0 else 0)
    smem = lambda q_stages, stages: (2 * parts * (q_stages * block_m + 2 * stages * block_n) * d + offsets
                                     # barriers (q_free only with two q buffers or more)
                                     + 8 * (q_stages + (q_stages if q_stages > 1 else 0) + 5 * stages
                                            + 2 * SM90_SCHEDULE_SLOTS)
                                     + 4 * (3 * stages + SM90_SCHEDULE_SLOTS)  # kinds (two copies), V flags, schedule
                                     + 1024)  # swizzle-atom alignment
    bounded = sm90_bounded_scores(dtype, d, var, softcap)
    if (bounded and features == FEATURES["SOFTCAP"] and keys >= SM90_BOUNDED_STAGES_FROM
            and smem(1, SM90_BOUNDED_STAGES) <= limit):
        stages = SM90_BOUNDED_STAGES
    q_stages = 2 if smem(2, stages) <= limit else 1
    name = f"flash_fwd_sm90<{C_TYPES[dtype]}, {d}, {block_n}, {stages}, {q_stages}, {var}, {_cbool(bounded)}>"
    return Launch("forward_sm90.cu", name, block_m, 384, smem(q_stages, stages), SM90_OPTIONS)


def work_list(block_m):
    """The kernel that builds a packed batch's Hopper forward work list on the device (work_list.cu): one
    block, before each forward of `block_m` query rows a tile."""
    return Launch("work_list.cu", f"work_list<{block_m}>", block_m, 1024, 0)


def split_float32():
    """The kernel that splits a float32 input into bfloat16 parts for the Hopper kernels (split.cu), a
    grid-stride loop of 256 threads per block."""
    return Launch("split.cu", "split_float32<float>", 256, 256, 0)


#: The share of L2 that the operands of a causal or windowed Hopper backward's running blocks may fill.
L2_SHARE = 0.5


def l2_section(l2_bytes, unit_bytes, units):
    """(batch, kv head) pairs per section of a causal or windowed Hopper backward (SectionedOrder in
    backward_sm90.cu): as many as fit in L2_SHARE of L2 the q, dout and dq accumulator of their query heads
    (unit_bytes per pair), which the section's key blocks read again and again; at least one."""
    return min(units, max(1, int(l2_bytes * L2_SHARE) // unit_bytes))


SM90_BWD_BLOCK_M = 64  # query rows per streamed tile (backward_sm90.cu)

#: Query rows (over the heads of a GQA group) up to which a key block of the Hopper backward is short enough
#: that a block's start and end weigh: there a block per multiprocessor takes key blocks in turn.
SM90_BWD_PERSISTENT_ROWS = 2048


def sm90_backward_blocks(key_blocks, query_rows, multiprocessors):
    """Blocks of the Hopper backward's main kernel, each taking key blocks in turn (for_each_key_block):
    one per multiprocessor where each key block streams at most SM90_BWD_PERSISTENT_ROWS query rows, so that
    a block's loads of its next key block overlap the end of its last; else one per key block, which the
    hardware hands out as multiprocessors free up. Measured on an H100 (bfloat16, against a block per key
    block): 1k and 2k causal 3-6% faster at headdims 64-256, 4k causal the same, 16k 0-5% slower."""
    if query_rows <= SM90_BWD_PERSISTENT_ROWS:
        return min(key_blocks, multiprocessors)
    return key_blocks


#: Stages of query tiles of the Hopper backward up to head tile 128 (three fit at 128).
SM90_BWD_STAGES = 3


def sm90_backward_tiles(headdim):
    """(kernel, head tile, keys per block, stages) of the Hopper backward: up to headdim 128 a block owns
    128 keys, 64 per consumer warpgroup, with dK and dV in registers, and SM90_BWD_STAGES stages of query
    tiles; wider heads take 64-key blocks whose warpgroups split the head's columns (flash_bwd_sm90_wide,
    head tile 256), with two stages."""
    d = -(-headdim // 64) * 64
    if d <= 128:
        return "flash_bwd_sm90", d, 128, SM90_BWD_STAGES
    if d <= HEADDIM_TILES[-1]:
        return "flash_bwd_sm90_wide", 256, 64, 2
    raise ValueError(f"headdim must be at most {HEADDIM_TILES[-1]}, got {headdim}")


#: Query rows per streamed tile of the Hopper backward on split float32 operands (backward_sm90.cu).
SM90_SPLIT_BWD_BLOCK_M = _csource.constant(_csource.source("backward_sm90.cu"), "SM90_SPLIT_BWD_BLOCK_M")


def sm90_split_backward_tiles(headdim):
    """(head tile, keys per block, query rows per tile, stages) of the Hopper backward on split float32
    operands: 64-key blocks (three parts of k and v take a third of shared memory at head tile 128) and
    32-row query tiles, four stages at head tile 64, two at 128."""
    d = -(-headdim // 64) * 64
    if d > SM90_SPLIT_HEADDIM:
        raise ValueError(f"the Hopper backward takes float32 up to headdim {SM90_SPLIT_HEADDIM}, got {headdim}")
    return d, 64, SM90_SPLIT_BWD_BLOCK_M, (4 if d == 64 else 2)


#: Query rows per block of the row sums of the Hopper backward on split float32 operands (backward_sm90.cu).
SM90_SUM_ROWS = _csource.constant(_csource.source("backward_sm90.cu"), "SUM_ROWS")


def row_sums_sm90(headdim, var):
    """The kernel that sums each query row's recomputed probabilities for the Hopper backward on split
    float32 operands (flash_bwd_sm90_row_sums, backward_sm90.cu): SM90_SUM_ROWS query rows of q's parts per
    block, and the split backward's stages of its 64-key tiles of k's."""
    d, block_n, _, stages = sm90_split_backward_tiles(headdim)
    parts, rows = SM90_SPLIT_PARTS, SM90_SUM_ROWS
    smem = (2 * parts * (rows + stages * block_n) * d + 4 * 5 * rows  # q, k stages; lse, the warps' sums
            + 8 * (1 + 2 * stages) + 4 * stages + 1024)  # barriers, kinds; alignment
    return Launch("backward_sm90.cu", f"flash_bwd_sm90_row_sums<{d}, {stages}, {var}>", rows, 384, smem, SM90_OPTIONS)


def sm90_backward_keys(dtype, headdim):
    """Keys per block of the Hopper backward of `dtype`."""
    return sm90_split_backward_tiles(headdim)[1] if dtype == "float32" else sm90_backward_tiles(headdim)[2]


def _barrier_bytes(stages):
    return 8 * (7 + 4 * stages) + 4 * (3 + 3 * stages)  # mbarriers; flags, kinds, scans, key blocks taken


def row_lanes(dtype, headdim, aligned):
    """(lanes, vec) of a kernel that reads a row of headdim columns over up to 32 lanes, vec columns a load:
    16 bytes where the rows are `aligned`, else one element (the prepare kernel of the Hopper backward, the sink
    gradient's)."""
    vec = 16 // _ITEMSIZE[dtype] if aligned else 1
    return min(32, 1 << (-(-headdim // vec) - 1).bit_length()), vec


def backward_sm90(dtype, headdim, var, aligned=True):
    """(prepare, main, dq convert) kernels of the Hopper backward (backward_sm90.cu); `aligned`: the rows
    of dout and out take 16-byte loads (the prepare kernel's, a row's columns over up to 32 lanes). float32
    takes flash_bwd_sm90_split on SM90_SPLIT_PARTS bfloat16 parts of its inputs."""
    bm = SM90_BWD_BLOCK_M
    if dtype == "float32":
        d, bn, tile_m, stages = sm90_split_backward_tiles(headdim)
        parts = SM90_SPLIT_PARTS
        own = bn * tile_m * 4 + parts * bn * 64 * 2 + 1024  # the scores' exchange; dx^T's parts; its barriers
        smem = (2 * parts * 2 * bn * d + stages * 2 * parts * 2 * tile_m * d  # k, v; stages of q and dout
                + own + stages * 3 * 4 * tile_m + _barrier_bytes(stages) + 1024)  # lse, delta, sums; alignment
        main = f"flash_bwd_sm90_split<{d}, {stages}, {var}>"
    elif dtype in TENSOR_CORE_DTYPES:
        kernel, d, bn, stages = sm90_backward_tiles(headdim)
        own = 2 * 2 * bn * bm if kernel == "flash_bwd_sm90" else 2 * 2 * 2 * bm * bn  # dx^T / pd and dx, two each
        if kernel == "flash_bwd_sm90" and _features(var) & FEATURES["DROPOUT"]:
            own += 2 * (bm // 8) * 32 * 4 * 4  # each consumer warpgroup's Philox words of a tile
        smem = (2 * 2 * bn * d + stages * 2 * 2 * bm * d  # k, v; stages of q and dout
                + stages * 2 * 4 * bm + own + _barrier_bytes(stages) + 1024)  # lse, delta; own buffers; alignment
        main = f"{kernel}<{C_TYPES[dtype]}, {d}, {stages}, {var}>"
    else:
        raise ValueError(f"the Hopper backward takes float16, bfloat16 and float32, got {dtype}")
    c, packed = C_TYPES[dtype], _cbool(_features(var) & FEATURES["PACKED"])
    lanes, vec = row_lanes(dtype, headdim, aligned)
    row_major = _cbool(dtype == "float32")  # the split kernel's dq accumulator
    return (Launch("backward_sm90.cu", f"flash_bwd_prepare_sm90<{c}, {packed}, {lanes}, {vec}>", 128 // lanes, 128, 0,
                   SM90_OPTIONS),
            Launch("backward_sm90.cu", main, bn, 384, smem, SM90_OPTIONS),
            Launch("backward_sm90.cu", f"flash_bwd_dq_convert<{c}, {packed}, {row_major}>", 256, 256, 0, SM90_OPTIONS))


def renormalizes(dtype):
    """Whether the backward of `dtype` renormalizes its recomputed probabilities (mask.cuh,
    row_renormalizer): float32 and float64, whose gradients would otherwise carry lse's rounding."""
    return dtype not in TENSOR_CORE_DTYPES


#: float64 rows whose |lse| log2 e is at most this are not renormalized (mask.cuh, renormalizes_row).
RENORMALIZED_LSE2 = _csource.constant(_csource.source("mask.cuh"), "RENORMALIZED_LSE2")


def backward(dtype, headdim, var, aligned, limit, tensor_cores=True, tf32=False, dq_atomics=False):
    """(delta, dK/dV, dQ) kernels of the backward pass, run delta, dQ, dK/dV. `dq_atomics` lets float64 on
    tensor cores, where a block holds a key tile's whole dK and dV, add dq in the dK/dV pass with float64
    atomics (five products, not seven): the delta kernel then zeroes dq and the dQ pass only sums the rows'
    probabilities for their renormalization (backward_mma.cu)."""
    d = headdim_tile(headdim)
    if dtype not in TENSOR_CORE_DTYPES and not _wide_mma(dtype, d, tensor_cores):
        return (_delta(dtype, False), _simt_backward("dkdv", dtype, d, var, limit),
                _simt_backward("dq", dtype, d, var, limit))
    # Parts whose shared memory is too small for a tensor-core tile take the CUDA-core kernels, which add no
    # atomics; so does the other pass then.
    def planned(make, *args):
        try:
            return make(dtype, d, var, aligned, limit, tf32, *args)
        except RuntimeError:
            return None

    dq_atomics = dq_atomics and dtype == "float64" and _dkdv_shape(dtype, d)[-1] == 1
    dkdv, dq = planned(_dkdv_mma, dq_atomics), planned(_dq_mma, dq_atomics)
    if dq_atomics and (dkdv is None or dq is None):
        dq_atomics = False
        dkdv, dq = planned(_dkdv_mma, False), planned(_dq_mma, False)
    return (_delta(dtype, dq_atomics), dkdv or _simt_backward("dkdv", dtype, d, var, limit),
            dq or _simt_backward("dq", dtype, d, var, limit))


def _delta(dtype, zero_dq):
    return Launch("backward.cu", f"flash_bwd_delta<{C_TYPES[dtype]}, {_cbool(zero_dq)}>", 4, 128, 0)


def _dkdv_shape(dtype, d):
    """(warps before roles, query tile, roles, column slices) of the tensor-core dK/dV pass. Registers hold
    dK and dV for 16 key rows per warp, at most 128 columns of each (64 in float64): wider heads split them,
    float64's between the two warps of a pair (roles), the others' into column slices (measured on an H100).
    Query tiles of 64 rows (16-bit) or fewer (float32, float64, whose s^T and dp^T take twice the registers
    or more) stream through."""
    if dtype in TENSOR_CORE_DTYPES:
        warps, widest, block_m = (4 if d <= 64 else 8), 128, 64
    elif dtype == "float32":
        warps, widest, block_m = 8, 128, (32 if d <= 64 else 16)
    else:
        warps, widest, block_m = 4, 64, 16
    roles = 2 if dtype == "float64" and d > widest else 1
    return warps, block_m, roles, -(-d // (widest * roles))


def _dkdv_mma(dtype, d, var, aligned, limit, tf32, dq_atomics):
    item, acc = _ITEMSIZE[dtype], _acc_bytes(dtype)
    warps, block_m, roles, slices = _dkdv_shape(dtype, d)
    warps *= roles
    key_rows = 16 * warps // roles
    # k, v + double-buffered q, dout and their lse, delta (and renormalizer); s^T handed over within pairs;
    # double-buffered scale dx for dq's atomics
    stats = 6 if renormalizes(dtype) else 4
    dx_buffers = int(dq_atomics)
    dx_buffer = lambda bm: acc * bm * (key_rows + _row_pad(dtype))
    smem = lambda bm: (item * (2 * key_rows + 4 * bm) * (d + _row_pad(dtype)) + stats * acc * bm
                       + (roles - 1) * acc * (warps // 2) * bm * 16 + dx_buffers * dx_buffer(bm))
    if dtype not in TENSOR_CORE_DTYPES and smem(16) > limit:
        warps = 4
        key_rows = 16 * warps // roles
    block_m = _shrink(block_m, 16, smem, limit)
    # With one dx buffer each tile's dq takes a barrier of its own; with a second it waits for the next tile's
    # barrier instead, where a block fills the multiprocessor anyway (at head tile 64 the second buffer
    # left room for one block of two: 1.54x the time, H100)
    if dq_atomics and 2 * smem(block_m) > limit and smem(block_m) + dx_buffer(block_m) <= limit:
        dx_buffers = 2
    name = (f"flash_bwd_dkdv_mma<{_element(dtype, tf32)}, {d}, {d // slices}, {block_m}, {warps}, {roles}, {var}, "
            f"{_cbool(aligned)}, {dx_buffers}>")
    return Launch("backward_mma.cu", name, key_rows, 32 * warps, smem(block_m), column_slices=slices)


def _dq_mma(dtype, d, var, aligned, limit, tf32, sums):
    item, acc = _ITEMSIZE[dtype], _acc_bytes(dtype)
    roles = 1
    if dtype in TENSOR_CORE_DTYPES:
        warps, block_n = (8 if d <= 64 else 4), 32
    elif dtype == "float32" or d <= 64:  # measured on an H100
        warps, block_n = 8, (32 if d <= 64 else 16)
    else:  # float64's wide heads: pairs of warps on 16 query rows, 8 warps where 4 would fill shared memory
        warps, block_n, roles = 8, 16, 2
    query_rows = 16 * warps // roles
    # q, dout + double-buffered k, v; s and dp handed over within pairs
    smem = lambda bn: (item * (2 * query_rows + 4 * bn) * (d + _row_pad(dtype))
                       + (roles - 1) * acc * (warps // 2) * 2 * bn * 16)
    if dtype not in TENSOR_CORE_DTYPES and smem(16) > limit:
        warps = 4
        query_rows = 16 * warps // roles
    block_n = _shrink(block_n, 16, smem, limit)
    name = (f"flash_bwd_dq_mma<{_element(dtype, tf32)}, {d}, {block_n}, {warps}, {roles}, {var}, {_cbool(aligned)}, "
            f"{_cbool(sums)}>")
    # the sums alone: a warp's 16 rows each, in the same shared memory
    return Launch("backward_mma.cu", name, 16 * warps if sums else query_rows, 32 * warps, smem(block_n))


def _simt_rows(dtype, d):
    """(rows per block, threads sharing a row) of the CUDA-core backward kernels."""
    acc = _acc_bytes(dtype)
    return (32 if acc == 4 else 16), (4 if acc == 4 else 8) * (1 if d <= 128 else 2)


def _simt_backward(kernel, dtype, d, var, limit):
    """CUDA-core "dkdv" (a block owns key rows, query tiles stream through) or "dq" (a block
    owns query rows, key tiles stream through)."""
    acc = _acc_bytes(dtype)
    tile, tpr = _simt_rows(dtype, d)
    stats = 3 if renormalizes(dtype) else 2  # per query row: lse, delta (and renormalizer)
    smem = (lambda r, s: _dkdv_smem(acc, d, r, s, stats)) if kernel == "dkdv" else (lambda r, s: _dq_smem(acc, d, r, s))
    rows, streamed = _fit(tile, tile, tpr, limit, smem)
    block_m, block_n = (streamed, rows) if kernel == "dkdv" else (rows, streamed)
    name = f"flash_bwd_{kernel}_simt<{C_TYPES[dtype]}, {d}, {block_m}, {block_n}, {rows * tpr}, {var}>"
    return Launch("backward.cu", name, rows, rows * tpr, smem(rows, streamed))


def _dkdv_smem(acc, d, rows, block_m, stats):
    return acc * ((2 * rows + 2 * block_m) * (d + 1) + 2 * rows * (block_m + 1) + stats * block_m)


def _dq_smem(acc, d, rows, block_n):
    return acc * ((2 * rows + 2 * block_n) * (d + 1) + rows * (block_n + 1))


def _fit(rows, streamed, tpr, limit, smem):
    """Shrinks the streamed tile (down to tpr rows), then the block's own rows (down to 8),
    until the block fits in `limit` bytes of shared memory."""
    try:
        return rows, _shrink(streamed, tpr, lambda b: smem(rows, b), limit)
    except RuntimeError:
        rows = _shrink(rows, 8, lambda r: smem(r, tpr), limit)
        return rows, tpr


def _shrink(block, smallest, smem, limit):
    """Halves a tile until the block fits in `limit` bytes of shared memory."""
    while smem(block) > limit and block // 2 >= smallest:
        block //= 2
    if smem(block) > limit:
        raise RuntimeError(f"no tile fits in {limit} bytes of shared memory (needs {smem(block)})")
    return block


#: Query rows per kv head the decode kernels are compiled for (the group's heads times seqlen_q); more rows
#: are cut into slabs, a block each (decode_slab in decode.cuh), up to DECODE_MAX_ROWS by dtype. Past it the
#: sequences run as one packed batch through the dense forward (measured on an H100, docs/performance.md).
DECODE_ROWS = (1, 2, 4, 8, 16)
DECODE_MAX_ROWS = {"float16": 1024, "bfloat16": 1024, "float32": 128}
DECODE_MAX_SPLITS = _csource.constant(_csource.source("decode.cuh"), "DECODE_MAX_SPLITS")
DECODE_WARPS = (8, 4)  # warps of a decode_mma.cu block, each streaming its own key tiles: the first that fits

#: The dense forward's query rows a tile (of one query head) that a KV-cache call must fill for dense_serves.
DENSE_TILE_ROWS = 128

#: A paged cache's keys reach the Hopper forward in place (FwdParamsSm90::block_table) in boxes of at least this
#: many rows, each within a page: page sizes and first keys in multiples of it (the key tiles are).
PAGE_BOX_ROWS = _csource.constant(_csource.source("forward_sm90.cu"), "PAGE_BOX_ROWS")


def dense_serves(dtype, seqlen_q, query_heads, multiprocessors):
    """Whether a 16-bit KV-cache call within DECODE_MAX_ROWS runs faster through the dense forward: where its
    seqlen_q fills the dense query tiles and the batch's query heads (batch x nheads) give a tile per
    multiprocessor. A dense tile reads each key tile once for 128 rows of a query head, a decode slab once for
    32 rows of a kv head (H100, docs/performance.md)."""
    return (dtype in TENSOR_CORE_DTYPES and seqlen_q >= DENSE_TILE_ROWS
            and query_heads * (seqlen_q // DENSE_TILE_ROWS) >= multiprocessors)


#: Keys of a decode_mma.cu warp's tile (one TMA box): a paged cache whose pages hold whole tiles is read by TMA.
DECODE_BLOCK_N = 16


def decode_slab_rows(dtype, headdim, rows):
    """The query rows of a decode block (a slab) for `rows` rows per kv head. The CUDA-core kernel: the fewest
    of DECODE_ROWS that hold them, 16 at most. The tensor-core kernel: mma tiles of 16 rows, two where one does
    not hold them and the head tile is at most 128 (o's registers): each slab reads every key and value tile,
    so wider slabs read less."""
    if dtype in TENSOR_CORE_DTYPES:
        return 32 if rows > 16 and headdim_tile(headdim) <= 128 else 16
    return next(r for r in DECODE_ROWS if r >= min(rows, DECODE_ROWS[-1]))


def decode_slabs(dtype, headdim, rows):
    """Blocks a decode takes for the `rows` query rows of a kv head (decode_slab_rows a block)."""
    return -(-rows // decode_slab_rows(dtype, headdim, rows))


@functools.lru_cache(maxsize=None)
def decode(dtype, headdim, rows, var, limit, tma=False):
    """The split-KV decode kernel for `rows` query rows per kv head, in slabs of decode_slab_rows. A 16-bit cache
    takes the tensor-core kernel (decode_mma.cu): key tiles of DECODE_BLOCK_N per warp in a ring of STAGES per
    warp, the first of DECODE_WARPS whose rings of two stages fit in `limit`, the rings as deep as half of
    `limit` holds, so that two blocks share a multiprocessor; with `tma` (Hopper) each tile arrives as TMA boxes
    of 64 columns in 128-byte swizzle. float32 takes the CUDA-core kernel (decode.cu), a key per thread.
    block_rows is the keys a block takes per step: splits are made of whole steps."""
    c, d, slab = C_TYPES[dtype], headdim_tile(headdim), decode_slab_rows(dtype, headdim, rows)
    if dtype in TENSOR_CORE_DTYPES:
        block_n = DECODE_BLOCK_N
        row = d + _row_pad(dtype)
        # q and the rings (TMA: boxes of 64 columns, from a 1024-byte boundary)
        ring_row = -(-d // 64) * 64 if tma else row
        smem = lambda warps, stages: 2 * (slab * row + warps * stages * 2 * block_n * ring_row) + (1024 if tma else 0)
        warps = next((w for w in DECODE_WARPS if smem(w, 2) <= limit), DECODE_WARPS[-1])
        stages = next((s for s in (4, 3) if smem(warps, s) <= limit // 2), 2)
        name = f"flash_decode_mma<{c}, {d}, {block_n}, {warps}, {stages}, {_cbool(tma)}, {slab // 16}, {var}>"
        return Launch("decode_mma.cu", name, warps * block_n, 32 * warps, smem(warps, stages),
                      SM90_OPTIONS if tma else OPTIONS)
    return Launch("decode.cu", f"flash_decode<{c}, {d}, {slab}, {var}>", 128, 128, 0)


def kvcache_append(dtype):
    """The in-place append of new key and value rows (decode.cu), with the rotary embedding of them and of q
    where it is asked: a block per (new row, kv head, sequence), and per (row, head, sequence) of q."""
    return Launch("decode.cu", f"kvcache_append<{C_TYPES[dtype]}>", 1, 128, 0)


def decode_splits(band, blocks, slots, step, requested=0):
    """(splits, keys per split) of a decode whose sequences see at most `band` keys, with `blocks` (batch x
    kv heads x slabs) blocks per split and `slots` blocks resident on the device at once; splits are whole steps of
    `step` keys. `requested` splits at most; 0 chooses: no split once the blocks fill 80% of the slots (as
    flash-attn), else the fewest splits whose waves are within 95% of the best use of the slots (a pass
    bound by memory wants every slot busy; each split costs its share of the combine)."""
    steps = max(1, -(-band // step))
    if requested:
        splits = min(requested, steps, DECODE_MAX_SPLITS)
    elif blocks >= 0.8 * slots:
        splits = 1
    else:
        def efficiency(n):
            waves = blocks * n / slots
            return waves / -(-waves // 1)
        candidates = range(1, min(steps, DECODE_MAX_SPLITS) + 1)
        best = max(efficiency(n) for n in candidates)
        splits = next(n for n in candidates if efficiency(n) >= 0.95 * best)
    per_split = -(-steps // splits) * step
    return max(1, -(-band // per_split)), per_split


def decode_slots(launch, multiprocessors, resident):
    """Blocks a decode of `launch` spreads its work over; `resident()` tells how many of its blocks fit on a
    multiprocessor (asked of the CUDA-core kernel only: the driver's answer needs the compiled kernel).
    The tensor-core kernel (decode_mma.cu): one per multiprocessor. Measured on an H100 (bfloat16, headdim 128,
    docs/performance.md), one block of warps each streaming its own tiles keeps enough of the cache in
    flight; a second block per multiprocessor only doubles the splits to merge. The CUDA-core kernel
    (decode.cu), whose threads keep a few loads of a key row in flight each: every block that fits (float32,
    1 x 32k, headdim 128: 622 us at one block per multiprocessor, 190 at eight)."""
    return multiprocessors * (1 if launch.source == "decode_mma.cu" else resident())


#: A bool mask is classified in cells of 2**MASK_CELL_LOG2 queries x keys before a call's kernels run.
MASK_CELL_LOG2 = 6


def mask_cells():
    """The kernel that classifies a bool mask's cells (mask_cells.cu): a block per cell."""
    return Launch("mask_cells.cu", "classify_mask_cells", 1, 128, 0)


#: Rows per flag of nonfinite.cu (RowFlags in params.cuh), read from cuda_src/mask.cuh.
NONFINITE_ROWS = _csource.constant(_csource.source("mask.cuh"), "NONFINITE_ROWS")


def nonfinite_rows(dtype, vector):
    """The kernel that flags rows holding NaN or inf (nonfinite.cu) for variants that hide keys: a warp per
    NONFINITE_ROWS rows of a head, 16-byte loads when `vector`."""
    vec = 16 // _ITEMSIZE[dtype] if vector else 1
    return Launch("nonfinite.cu", f"flag_nonfinite_rows<{C_TYPES[dtype]}, {vec}>", 8, 256, 0)  # 8 flags a block


#: Warps a block of sink_grad.cu's partial sums, and of their sum (its constant).
SINK_GRAD_WARPS = 8
SINK_SUM_WARPS = _csource.constant(_csource.source("sink_grad.cu"), "SINK_SUM_WARPS")


@functools.lru_cache(maxsize=None)
def sink_gradient(dtype, headdim, aligned=True):
    """The learnable sinks' gradient (sink_grad.cu): the blocks' partial sums, a row's columns over up to 32
    lanes, 16-byte loads where the rows of dout and out are `aligned` (block_rows: the rows a block takes at a
    time); then their sum, a block a head."""
    lanes, vec = row_lanes(dtype, headdim, aligned)
    c = C_TYPES[dtype]
    return (Launch("sink_grad.cu", f"sink_gradient<{c}, {lanes}, {vec}, {SINK_GRAD_WARPS}>",
                   32 * SINK_GRAD_WARPS // lanes, 32 * SINK_GRAD_WARPS, 0),
            Launch("sink_grad.cu", f"sink_gradient_sum<{c}>", 1, 32 * SINK_SUM_WARPS, 0))


def dropout_mask():
    """The kernel of `cupyflash.dropout_mask(..., xp=cupy)`: one thread per Philox call."""
    return Launch("dropout_mask.cu", "dropout_mask_kernel", 1, 256, 0)


def clock_probe():
    """The benchmark's reading of the SM clock (clock_probe.cu): one thread."""
    return Launch("clock_probe.cu", "sm_clock_probe", 1, 1, 0)


def _launches(dtype, d, var, aligned, limit, tensor_cores=True, tf32=False, dq_atomics=False):
    return (forward(dtype, d, var, aligned, limit, tensor_cores, tf32),
            *backward(dtype, d, var, aligned, limit, tensor_cores, tf32, dq_atomics))


def covering_launches():
    """A set of instantiations that covers every kernel family, both load paths, both shared-memory
    tables and every feature at least once, for the CI compile test (the full product is far too
    large to compile on every change). A feature's code compiles in the instantiations with every
    feature on (a bool mask and a bias of each dtype cannot go together); its absence, in the plain
    ones.
    """
    big, small = SMEM_LIMITS[(9, 0)], DEFAULT_SMEM_LIMIT
    plain = variant()
    cases = [(dtype, d, plain, True, big) for dtype in C_TYPES for d in (64, 256)]
    cases += [("float16", 96, plain, False, big), ("bfloat16", 128, plain, True, big)]
    cases += [("bfloat16", d, plain, True, small) for d in (128, 256)] + [("float32", 256, plain, True, small)]
    # a packed batch has no mask: PACKED goes with every other feature
    packed, bias, bool_mask = FEATURES["PACKED"], FEATURES["BIAS"], FEATURES["BOOL_MASK"]
    every = sum(FEATURES.values()) - packed
    cases += [(dtype, 64, variant(every - bias, "bool"), True, big) for dtype in C_TYPES]
    cases += [(dtype, 64, variant(every - bool_mask, mask), True, big)
              for dtype, mask in zip(C_TYPES, C_TYPES)]
    # float64's backward pairs warps from head tile 96 on, one of each pair adding to the bias gradient
    cases += [("float16", 128, variant(every - bool_mask, "float32"), True, big),
              ("float64", 128, variant(every - bool_mask, "float64"), True, big)]
    cases += [(dtype, 128, variant(every - bias - bool_mask + packed), True, big) for dtype in C_TYPES]
    cases += [("bfloat16", 96, variant(packed), False, big)]
    # float32 and float64 on CUDA cores (forced, or past float64's tensor-core head dimensions) and in TF32
    cuda_cores = [(dtype, d, var, True, limit) for dtype in WIDE_DTYPES
                  for d, var, limit in ((64, plain, big), (256, plain, small), (64, variant(every - bias, "bool"), big),
                                        (64, variant(every - bool_mask, dtype), big),
                                        (128, variant(every - bias - bool_mask + packed), big))]
    tf32 = [("float32", d, var, aligned, big) for d, var, aligned in
            ((64, plain, True), (96, variant(every - bias, "bool"), False), (128, variant(packed), True))]
    # float64's dq added by the dK/dV pass: one warp a slab and pairs, every feature
    dq_atomics = [("float64", d, var, True, big) for d, var in
                  ((64, plain), (128, plain), (64, variant(every - bias, "bool")),
                   (128, variant(every - bool_mask, "float64")), (128, variant(every - bias - bool_mask + packed)))]
    seen = {}
    for case, math in ([(case, {}) for case in cases] + [(case, {"tensor_cores": False}) for case in cuda_cores]
                       + [(case, {"tf32": True}) for case in tf32]
                       + [(case, {"dq_atomics": True}) for case in dq_atomics]):
        for launch in _launches(*case, **math):
            seen[(launch.source, launch.name)] = launch
    sm90 = [("bfloat16", d, plain) for d in (64, 128, 192, 256)] + [("float16", 128, plain)]
    sm90 += [(dtype, 64, variant(every - bias, "bool")) for dtype in TENSOR_CORE_DTYPES]
    sm90 += [("float16", 128, variant(every - bool_mask, "float32")), ("bfloat16", 256, variant(every - bool_mask, "bfloat16"))]
    sm90 += [(dtype, d, variant(every - bias - bool_mask + packed)) for dtype, d in zip(TENSOR_CORE_DTYPES, (64, 256))]
    sm90 += [("bfloat16", 128, variant(packed))]
    causal = variant(FEATURES["WINDOW"])  # no left bound
    sm90 += [("bfloat16", d, causal) for d in (64, 128)]
    sm90_launches = [forward_sm90(*case) for case in sm90]
    sm90_launches += [forward_sm90("bfloat16", d, variant(every - bias - bool_mask - FEATURES["ALIBI"]), softcap=50.0)
                      for d in (128, 256)]  # bounded scores
    sm90_launches += [forward_sm90("bfloat16", 128, variant(FEATURES["SOFTCAP"]), SM90_BOUNDED_STAGES_FROM,
                                   softcap=50.0)]  # and their deeper ring
    sm90_launches += [forward_sm90(dtype, 64, var, SM90_WIDE_KEY_TILE_FROM)  # 192-key tiles
                      for dtype, var in (("bfloat16", plain), ("float16", variant(SM90_WIDE_KEY_TILE_FEATURES)),
                                         ("bfloat16", causal))]
    sm90_launches += [launch for case in sm90 for launch in backward_sm90(*case)]
    sm90_launches += [work_list(block_m) for block_m in {sm90_forward_tiles(dtype, d)[1] for d in (64, 128)
                                                         for dtype in TENSOR_CORE_DTYPES + ("float32",)}]
    # float32 on split operands (the split kernel, both head tiles, every feature)
    split_cases = ((64, plain), (128, plain), (64, variant(every - bias, "bool")),
                   (128, variant(every - bool_mask, "float32")), (128, variant(every - bias - bool_mask + packed)))
    sm90_launches += [split_float32()] + [forward_sm90("float32", d, var) for d, var in split_cases]
    sm90_launches += [launch for d, var in split_cases
                      for launch in (*backward_sm90("float32", d, var), row_sums_sm90(d, var))]
    sm90_launches += backward_sm90("float16", 96, plain, aligned=False)[:1]  # the prepare kernel's element loads
    decode_features = variant(FEATURES["WINDOW"] | FEATURES["WINDOW_LEFT"] | FEATURES["SOFTCAP"] | FEATURES["ALIBI"])
    decodes = [decode(dtype, d, rows, var, big) for dtype in ("float16", "bfloat16", "float32")
               for rows, var in ((1, plain), (16, decode_features)) for d in ((128, 64) if rows == 1 else (256,))]
    decodes += [decode(dtype, d, rows, var, big, tma=True)
                for dtype, d, rows, var in (("bfloat16", 128, 4, plain), ("float16", 64, 16, decode_features),
                                            ("bfloat16", 128, 40, decode_features))]
    decodes += [decode("float16", 64, 40, plain, big)]  # two mma tiles a block
    decodes += [kvcache_append(dtype) for dtype in C_TYPES]
    decodes = list({launch.name: launch for launch in decodes}.values())
    flags = [nonfinite_rows(dtype, vector) for dtype in C_TYPES for vector in (True, False)]
    sinks = [launch for dtype in C_TYPES for aligned in (True, False) for launch in sink_gradient(dtype, 128, aligned)]
    return [*seen.values(), *sm90_launches, *decodes, *flags, *sinks, mask_cells(), dropout_mask(), clock_probe()]
